"""Run many ``python -m <module> ...`` command lines for the price of one interpreter start.

Usage (from a test): ``python tests/forked_cli.py`` with a JSON list of ``[module, argv]`` on
stdin; prints a JSON list of ``{"code": exit code, "output": stdout + stderr}``.

The parent imports the CLIs once, with its own output captured (an import that prints is
reported as an ``"import"`` entry), then forks one child per command line. Each child starts
from the same freshly imported state (warning registries, loggers and handlers untouched by
the other command lines) and runs the module as ``__main__`` the way ``python -m`` does, with
file descriptors 1 and 2 sent to a file, so everything it prints is seen, Lightning's logging
and C-level writes included.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
from pathlib import Path


def _redirect(path: Path) -> None:
    """Send fds 1 and 2 (and Python's streams on them) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _run_child(module: str, argv: list[str], path: Path, preloaded: bool) -> None:
    _redirect(path)
    sys.argv = [module, *argv]
    if not preloaded:  # as under ``python -m``: the package imported, the module not yet
        sys.modules.pop(module, None)
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            sys.stderr.write(f"{e.code}\n")
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    cases = json.loads(sys.stdin.read())
    real_stdout = os.dup(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        imports = Path(tmp) / "import.txt"
        saved_err = os.dup(2)
        _redirect(imports)
        modules = sorted({module for module, _ in cases})
        for module in modules:
            __import__(module.rpartition(".")[0] or module)
        preloaded = {module: module in sys.modules for module in modules}
        for module in modules:
            __import__(module)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_err, 2)
        printed = imports.read_text()
        if printed:
            results.append({"import": printed})
        for i, (module, argv) in enumerate(cases):
            path = Path(tmp) / f"case{i}.txt"
            pid = os.fork()
            if pid == 0:
                _run_child(module, argv, path, preloaded[module])
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            results.append({"code": code, "output": path.read_text()})
    os.write(real_stdout, json.dumps(results).encode())


if __name__ == "__main__":
    main()
