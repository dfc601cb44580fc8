"""`python -m sn_lightning.sweep`: check W&B sweep YAMLs offline; run a sweep without a W&B server.

    python -m sn_lightning.sweep validate sweeps/x.yaml [more.yaml ...]
    python -m sn_lightning.sweep run sweeps/x.yaml [--count N] [--out DIR] [--wandb-mode offline]
                                 [--dry-run] [-- --trainer.max_epochs=1 ...]

``validate`` checks the schema with the W&B sweeps engine (the ``sweeps`` package) and asks the
engine for a run (so a grid over a continuous range, or bayes without a metric, is caught), then
renders runs into the exact argv ``wandb agent`` would start and parses each with the fit CLI's
own parser: every parameter must be a config key of the command's base config(s) and every value
must parse; the metric must be one the run logs. Last, each listed value and each bound of a
range is instantiated as the fit CLI does before training (model, data module, callbacks,
attacks; no training, no data loaded), so a value their constructors reject is reported too.
One line per problem, exit 2.

``run`` validates, then proposes runs with the same engine (grid, random, or bayes fed with the
finished runs' metric), starts each exactly as ``wandb agent`` would (wandb's own command-building
functions), each in ``<out>/<run id>/`` with ``WANDB_MODE=offline`` by default, then writes
``<out>/runs.csv`` (one row per run) and ``<out>/metric_vs_<param>.png`` for each swept parameter.
A failed run is reported with the last error line of its ``output.log``. Arguments after ``--``
are appended to every run's command (later options win) and checked before the first run starts;
runs.csv and the plots record the values the runs used (an option after ``--`` wins over the
sweep's value). ``--dry-run`` prints the commands and writes nothing (the swept values appear
inline, ``--config '{...}'``, where a real run gets the agent's JSON file). Hyperband early
termination is applied only by the W&B server: locally every run goes to completion. Running it
again with the same ``--out`` resumes: earlier rows of runs.csv count as finished runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import fnmatch
import importlib
import inspect
import json
import logging
import math
import os
import platform
import re
import secrets
import shlex
import string
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from sn_lightning._metrics import logged_metric_names
from sn_lightning.config_keys import KeyIndex, flatten

PROG = "python -m sn_lightning.sweep"
FIT_MODULE = "sn_lightning.fit"
RUNS_CSV = "runs.csv"
PARAM_FIELDS = (
    "value",
    "values",
    "distribution",
    "min",
    "max",
    "mu",
    "sigma",
    "q",
    "probabilities",
    "parameters",
)
_BOUNDED = ("uniform", "int_uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values")
_MAX_CHECKED_RUNS = 1000  # grid points parsed by `validate` (each parse takes milliseconds)
_RANDOM_CHECKS = 5  # proposals parsed by `validate` for random / bayes sweeps


class SweepError(Exception):
    """A problem with a sweep file or a local run; each line of the message is one problem."""


# -- the sweeps engine --------------------------------------------------------------------------
def _sweeps() -> Any:
    """The W&B sweeps engine, or a one-line error saying how to install it."""
    try:
        with warnings.catch_warnings():  # its pydantic models use v1 config names
            warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
            return importlib.import_module("sweeps")
    except ImportError:
        raise SweepError(
            'the W&B sweeps engine (package `sweeps`) is missing: pip install "sn-lightning[sweeps]"'
        ) from None


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML into a dict.

    Raises:
        SweepError: the file is missing, is not YAML, or is not a mapping.
    """
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise SweepError(f"{path}: cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(cfg, dict):
        raise SweepError(f"{path}: a sweep config must be a mapping, got {type(cfg).__name__}")
    return cfg


def _param_field_errors(cfg: Mapping[str, Any], prefix: str = "parameters") -> list[str]:
    """Unknown fields in parameter specs (the engine's own message does not name them)."""
    params = cfg.get("parameters")
    if not isinstance(params, Mapping):
        return []
    errors = []
    for name, spec in params.items():
        where = f"{prefix}.{name}"
        if not isinstance(spec, Mapping):
            errors.append(f"{where}: must be a mapping with one of value, values, min/max")
            continue
        unknown = sorted(set(spec) - set(PARAM_FIELDS))
        if unknown:
            errors.append(
                f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(PARAM_FIELDS)}"
            )
        if "parameters" in spec:  # W&B's nested form renders as --model={...}: one dict
            inner = spec["parameters"]
            example = f"{name}.{next(iter(inner))}" if isinstance(inner, Mapping) and inner else ""
            errors.append(
                f"{where}: nested parameters are not supported; write dotted keys"
                + (f" such as {prefix}.{example}" if example else " such as parameters.model.beta")
            )
    return errors


def schema_errors(cfg: Mapping[str, Any]) -> list[str]:
    """Schema violations from the W&B sweeps engine (plus unknown parameter fields), one per line."""
    sweeps = _sweeps()
    errors = _param_field_errors(cfg)
    if errors:
        return errors
    detail: dict[str, str] = {}
    # The engine returns bare messages; its jsonschema validator also knows where each one is, and
    # for a parameter spec that matches none of the distributions, which field broke which rule.
    with contextlib.suppress(ImportError, AttributeError):
        from sweeps.config.schema import validator

        for error in validator.iter_errors(cfg):
            detail.setdefault(error.message, _schema_message(error))
    try:
        messages = sweeps.schema_violations_from_proposed_config(dict(cfg))
    except ValueError as err:
        return [_one_line(err)]
    names = [str(n) for n in _params(cfg)]
    lines = list(dict.fromkeys(_parameter_prefix(detail.get(m, m), names) for m in messages))
    # ... and follows a bad parameter spec with "invalid hyperparameter configuration: <name>".
    named = re.compile(r"invalid hyperparameter configuration: (.+)")
    return [
        line
        for line in lines
        if not (
            (match := named.fullmatch(line))
            and any(other.startswith(f"parameters.{match[1]}:") for other in lines)
        )
    ]


def _parameter_prefix(line: str, names: Sequence[str]) -> str:
    """``parameters.x: ...`` for the engine's ``x: min 1 is not ...`` and ``Parameter x: ...``."""
    for name in names:
        for form in (f"{name}: ", f"Parameter {name}: "):
            if line.startswith(form):
                return f"parameters.{name}: {line[len(form) :]}"
    return line


_BOUND_RULES = {"exclusiveMinimum": ">", "minimum": ">=", "exclusiveMaximum": "<", "maximum": "<="}


def _schema_message(error: Any) -> str:
    """``parameters.x: min must be > 0 (distribution log_uniform_values), got 0`` for one error."""
    depth = len(error.absolute_path)
    where = ".".join(map(str, error.absolute_path))
    prefix = f"{where}: " if where else ""
    if error.validator not in ("anyOf", "oneOf"):
        return prefix + error.message
    leaves = _schema_leaves(error)
    if not leaves:
        return prefix + error.message
    reasons = dict.fromkeys(_leaf_message(leaf, depth) for leaf in leaves)
    spec = error.instance
    dist = spec.get("distribution") if isinstance(spec, Mapping) else None
    return prefix + "; ".join(reasons) + (f" (distribution {dist})" if dist else "")


def _schema_leaves(error: Any) -> list[Any]:
    """The errors of the schema branch meant (no wrong distribution, field missing or extra)."""
    branches: dict[Any, list[Any]] = {}
    for sub in error.context or ():
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    best: list[Any] = []
    for subs in branches.values():
        if any(
            sub.validator in ("additionalProperties", "required")
            or (sub.validator == "enum" and list(sub.path)[-1:] == ["distribution"])
            for sub in subs
        ):
            continue
        leaves = []
        for sub in subs:
            leaves += _schema_leaves(sub) if sub.validator in ("anyOf", "oneOf") else [sub]
        if leaves and (not best or len(leaves) < len(best)):
            best = leaves
    return best


def _leaf_message(error: Any, depth: int) -> str:
    field = ".".join(map(str, list(error.absolute_path)[depth:]))
    if error.validator in _BOUND_RULES:
        rule = f"{_BOUND_RULES[error.validator]} {error.validator_value}"
        return f"{field} must be {rule}, got {error.instance!r}"
    if error.validator == "minItems":
        return f"{field} must have at least {error.validator_value} item(s), got {error.instance!r}"
    if error.validator == "type":
        return f"{field} must be of type {error.validator_value}, got {error.instance!r}"
    return f"{field}: {error.message}" if field else error.message


def sweep_config(cfg: Mapping[str, Any]) -> Any:
    """The engine's `SweepConfig` (schema-checked, defaults filled in)."""
    errors = schema_errors(cfg)
    if errors:
        raise SweepError("\n".join(errors))
    return _sweeps().SweepConfig(dict(cfg))


def propose(config: Any, runs: Sequence[Any], n: int = 1) -> list[dict[str, Any]]:
    """Up to ``n`` new parameter assignments from the engine (fewer when a grid runs out).

    Raises:
        SweepError: the engine cannot propose runs for this config (one line saying why).
    """
    try:
        proposed = _sweeps().next_runs(config, list(runs), n=n)
    except Exception as err:  # the engine raises bare ValueError / TypeError / KeyError ...
        raise SweepError(_engine_failure(err, config)) from None
    return [
        {k: _plain(v["value"]) for k, v in run.config.items()}
        for run in proposed
        if run is not None
    ]


_GRID_OK = "values: [...] or value: x (or distribution int_uniform / q_uniform with min and max)"


def _engine_failure(err: BaseException, config: Mapping[str, Any]) -> str:
    """The engine's exception as one line naming the config entry (it names none, or oddly)."""
    text = _one_line(err)
    method = config.get("method")
    grid = re.match(r"Parameter (\S+) is a disallowed type with grid search", text)
    if grid:
        parts = re.split(r"\.wbnest\[[0-9a-f]+\]\.", grid[1])  # the engine's nesting delimiter
        spec: Any = {"parameters": config.get("parameters") or {}}
        for part in parts:
            spec = (spec.get("parameters") or {}).get(part) or {}
        kind = (
            "values with probabilities"
            if "probabilities" in spec
            else f"distribution {spec.get('distribution', '?')}"
        )
        return (
            f"parameters.{'.'.join(parts)}: method grid cannot enumerate {kind}; grid takes "
            f"{_GRID_OK}; use method random or bayes for a continuous range"
        )
    if 'requires "metric" section' in text:
        section = "early_terminate" if text.startswith("early terminate") else "metric"
        return (
            f"{section}: {'early termination' if section != 'metric' else f'method {method}'} "
            "needs a metric: add `metric: {name: <logged metric>, goal: maximize or minimize}`"
        )
    if text.startswith("Need at least one searchable parameter"):
        return (
            "parameters: method bayes needs at least one parameter with values or a "
            "distribution (every parameter here is a single `value`)"
        )
    return f"the W&B sweeps engine cannot propose runs ({method}): {text}"


def _engine_errors(config: Any) -> list[str]:
    """What the engine raises for this config only when asked for runs (not a schema error)."""
    try:
        propose(config, [], n=1)
        if config.get("early_terminate"):
            try:
                _sweeps().stop_runs(config, [])
            except Exception as err:  # as in propose
                raise SweepError(_engine_failure(err, config)) from None
    except SweepError as err:
        return [str(err)]
    return []


def _plain(value: Any) -> Any:
    """Plain Python values, as they reach the agent from the W&B server (through JSON)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else o))


# -- the command `wandb agent` starts -------------------------------------------------------------
def agent_command(
    cfg: Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    run_id: str,
    sweep_id: str,
    wandb_dir: str | Path,
    inline_json: bool = False,
) -> list[str]:
    """The argv ``wandb agent`` starts for one run (``wandb.wandb_agent.Agent._command_run``).

    The template comes from wandb's ``create_sweep_command`` (``${envvar:X}`` expanded) and the
    argument forms (``${args}``, ``${args_json}``, ...) from its ``create_sweep_command_args``;
    the macro substitution below is the agent's own loop. ``${args_json_file}`` is written, as by
    the agent, to ``<wandb_dir>/wandb/sweep-<sweep_id>/config-<run_id>.json``.

    Args:
        cfg: the sweep config (``command``, ``program``).
        params: parameter name -> value for this run.
        run_id: the run's id.
        sweep_id: the sweep's id (names the JSON file's folder).
        wandb_dir: the agent's ``WANDB_DIR``.
        inline_json: write nothing; ``${args_json_file}`` becomes the JSON text itself, which the
            fit CLI's ``--config`` reads the same way (a value that is not a file is config text).

    Returns:
        The command line, ``${env}`` being ``/usr/bin/env`` and ``${interpreter}`` ``python``.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    template = sweep_utils.create_sweep_command(copy.deepcopy(cfg.get("command")) or None)
    command = {"args": {k: {"value": v} for k, v in params.items()}, "program": cfg.get("program")}
    sweep_vars: dict[str, Any] = sweep_utils.create_sweep_command_args(command)
    json_file = Path(wandb_dir) / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.json"
    if "${args_json_file}" in template and not inline_json:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(sweep_vars["args_json"][0])
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [command["program"]]
    sweep_vars["args_json_file"] = [sweep_vars["args_json"][0] if inline_json else str(json_file)]
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    argv: list[str] = []
    for chunk in template:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += [str(c) for c in sweep_vars.get(chunk[2:-1]) or []]
        else:
            argv.append(chunk)
    return argv


def fit_args(argv: Sequence[str]) -> list[str]:
    """The arguments after ``-m sn_lightning.fit`` (or ``sn_lightning/fit.py``) in ``argv``.

    Raises:
        SweepError: the command does not run the fit entry point.
    """
    for i, token in enumerate(argv):
        runs_module = token == FIT_MODULE and i > 0 and argv[i - 1] == "-m"
        if runs_module or token.endswith(("sn_lightning/fit.py", "sn-lightning-fit")):
            return list(argv[i + 1 :])
    raise SweepError(
        f"command must run `python -m {FIT_MODULE}`, got: {shlex.join(argv) or '(empty)'}"
    )


def _command_errors(cfg: Mapping[str, Any]) -> list[str]:
    """Problems with the command template that no parse would explain well."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    template = [str(c) for c in (cfg.get("command") or sweep_utils.DEFAULT_SWEEP_COMMAND)]
    program = str(cfg.get("program") or "")
    try:
        fit_args([program if c == "${program}" else c for c in template])
    except SweepError as err:
        return [f"command: {err}"]
    macros = [c for c in template if c.startswith("${args")]
    errors = []
    if not macros:
        errors.append(
            "command: no ${args} or ${args_json_file}: the swept values would not reach the run"
        )
    if "${args_no_hyphens}" in template:
        errors.append(
            "command: ${args_no_hyphens} renders name=value, which the fit CLI rejects; "
            "use `--config ${args_json_file}` (or ${args})"
        )
    if "${program}" in template and not cfg.get("program"):
        errors.append("program: missing, and the command uses ${program}")
    if "${args}" in template:
        nulls = [name for name, spec in _params(cfg).items() if None in _declared_values(spec)]
        if nulls:
            errors.append(
                f"parameters.{nulls[0]}: null renders as `--{nulls[0]}=None` under ${{args}}, which "
                "does not parse; put `--config ${args_json_file}` in the command instead"
            )
    return errors


# -- parsing runs with the fit CLI ----------------------------------------------------------------
def _params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    params = cfg.get("parameters")
    return dict(params) if isinstance(params, Mapping) else {}


def _declared_values(spec: Mapping[str, Any]) -> list[Any]:
    if "value" in spec:
        return [spec["value"]]
    return list(spec.get("values") or [])


def _base_display(cfg: Mapping[str, Any]) -> str:
    """``python -m sn_lightning.fit --config base.yaml ...``: the command without its macros."""
    template = [str(c) for c in cfg.get("command") or []]
    try:
        tokens = fit_args(template)
    except SweepError:
        return f"python -m {FIT_MODULE}"
    kept = [
        t
        for i, t in enumerate(tokens)
        if not t.startswith("${") and not (i + 1 < len(tokens) and tokens[i + 1].startswith("${"))
    ]
    return shlex.join(["python", "-m", FIT_MODULE, *kept])


def _candidate_values(name: str, spec: Mapping[str, Any]) -> list[Any]:
    """Values of one parameter worth parsing: all listed ones, else bounds and engine samples."""
    if "value" in spec or "values" in spec:
        return _declared_values(spec)
    config = _sweeps().SweepConfig({"method": "random", "parameters": {name: dict(spec)}})
    samples = propose(config, [], n=3)
    return [*(v for _, v in _bounds(name, spec)), *(s[name] for s in samples)]


def _bounds(name: str, spec: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``[("min", lo), ("max", hi)]`` of a bounded distribution (in value space), else []."""
    config = _sweeps().SweepConfig({"method": "random", "parameters": {name: dict(spec)}})
    filled = config["parameters"][name]
    if filled.get("distribution") in _BOUNDED and "min" in filled:
        return [("min", filled["min"]), ("max", filled["max"])]
    return []


def _checked_values(name: str, spec: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(label, value)`` pairs to instantiate: each listed value once, else the bounds."""
    if "parameters" in spec:  # nested parameters: their leaves are not fit keys of their own
        return []
    if "value" not in spec and "values" not in spec:
        return _bounds(name, spec)
    unique = {json.dumps(v, sort_keys=True, default=str): v for v in _declared_values(spec)}
    return [("value", v) for v in unique.values()]


def _one_line(message: object, limit: int = 500) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _FitParser:
    """The fit CLI's parser for one base command, parsing candidate runs without training."""

    def __init__(self, base_args: list[str]) -> None:
        from sn_lightning.data import ImageDataModule
        from sn_lightning.fit import SNLightningCLI, _OneLineErrorParser
        from sn_lightning.lit import SNClassifier

        class _ParseOnlyCLI(SNLightningCLI):
            def before_instantiate_classes(self) -> None:
                """No W&B preparation: nothing will run."""

            def instantiate_classes(self) -> None:
                """Parse only: no trainer, model or data."""

        seed_log = logging.getLogger("lightning.fabric.utilities.seed")
        level = seed_log.level
        seed_log.setLevel(logging.WARNING)  # no "Seed set to 0": nothing will run
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                cli = _ParseOnlyCLI(
                    SNClassifier,
                    ImageDataModule,
                    run=False,
                    args=base_args,
                    parser_class=_OneLineErrorParser,
                    parser_kwargs={"prog": f"python -m {FIT_MODULE}", "exit_on_error": False},
                    auto_configure_optimizers=False,
                )
        finally:
            seed_log.setLevel(level)
        self.parser, self.keys = cli.parser, KeyIndex.from_config(cli.config)
        self._instantiator = _CheckInstantiator()
        # jsonargparse >= 4.49 takes instantiators per call; older ones only per parser.
        method = getattr(self.parser, "instantiate", None)
        self._per_call = (
            method is not None and "instantiators" in inspect.signature(method).parameters
        )
        if not self._per_call:
            self.parser.add_instantiator(self._instantiator, object, subclasses=True, prepend=True)

    def parse(self, args: list[str]) -> Any:
        """The parsed config namespace (raises jsonargparse's ArgumentError)."""
        return self.parser.parse_args(args)

    def instantiate(self, config: Any, *, build_model: bool = True) -> None:
        """Create what the fit CLI creates before training, and drop it; raises what they raise.

        See Note [checking values without training]. ``build_model=False`` skips the model (the
        one costly object: backbone and spectral-norm surgery) for keys that cannot change it.
        """
        from sn_lightning.data.datamodule import missing_data_deferred

        self._instantiator.build_model = build_model
        with missing_data_deferred():  # files are checked per complete run: _runs_without_data
            if self._per_call:
                self.parser.instantiate(config, instantiators=[(self._instantiator, object, True)])
            else:
                self.parser.instantiate_classes(config)


def _is_logger(class_type: type) -> bool:
    """A Lightning logger class (found by name: this module does not import Lightning)."""
    return any(
        c.__name__ == "Logger" and c.__module__.startswith(("lightning.", "lightning_fabric."))
        for c in class_type.__mro__
    )


# Note [checking values without training]
# A value that parses can still be rejected before training: SNClassifier, the data module, the
# callbacks and their attacks check ranges in __init__ (ConfigError). `validate` (and `run`, which
# validates first) therefore instantiates what the fit CLI instantiates before training, through
# the fit CLI's own parser, links and classes, and throws the objects away. Differences, so that
# the check is quick and does not depend on this machine: loggers are not created (fit prepares
# them for W&B first); data files missing on this machine are no error here and stop none of the
# data module's other checks or the model's (`missing_data_deferred`: an imagefolder without its
# folder stands in with STAND_IN_CLASSES classes); the model gets pretrained=False (no weights
# download) and is built only for model.* and data.* keys (the data module's facts are linked
# into it). The Trainer is not built: trainer.* values are only parsed. Whether a run's data is
# here is asked of complete runs only (`_runs_without_data`; one value alone, e.g. data.dataset
# without the data.data_dir another parameter sets, would point at the wrong folder): `validate`
# and `run --dry-run` note it, `run` stops before the first run (with the options after --).
# Nothing is downloaded: with download=true the files' absence is not an error (prepare_data
# downloads them in the run), as in fit.
class _CheckInstantiator:
    """The parser's instantiator for the checks of Note [checking values without training]."""

    def __init__(self) -> None:
        self.build_model = True

    def __call__(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
        from sn_lightning.lit import SNClassifier

        if _is_logger(class_type):
            return None
        if issubclass(class_type, SNClassifier):
            if not self.build_model:
                return None
            kwargs["pretrained"] = False
        return class_type(*args, **kwargs)


def _reason(error: Exception) -> str:
    """The useful part of a jsonargparse message: the valid choices or the expected types."""
    from sn_lightning.fit import _class_init_error

    text = _one_line(error, limit=100_000)
    in_class = _class_init_error(text)  # an attack's class or init_arg
    if in_class is not None:
        return in_class.removeprefix("--")
    choices = re.findall(r"Expected a typing\.Literal\[([^\]]*)\]", text)
    if choices:
        return f"valid choices: {choices[-1]}"
    inner = text[text.rfind('Parser key "') :] if 'Parser key "' in text else text
    types = re.search(r"Subtypes: \[([^\]]*)\]", inner)
    if types:
        names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", types.group(1))
        names = ["null" if n == "NoneType" else n for n in names]
        return f"expected {' or '.join(names)}"
    return _one_line(inner.split(" Given value type:")[0])


def _parse_error(error: Exception, assignment: Mapping[str, Any], keys: KeyIndex, base: str) -> str:
    """One line naming the bad key (with suggestions) or the bad value (with the parser's reason)."""
    if len(assignment) == 1:
        ((key, value),) = assignment.items()
        if not keys.knows(key):
            return f"parameters.{key}: unknown config key of `{base}`; {keys.explain(key)}"
        return f"parameters.{key}: value {value!r} does not parse: {_reason(error)}"
    return f"run {dict(assignment)!r} does not parse: {_reason(error)}"


def _check_run(
    parse: Callable[[Mapping[str, Any]], Any],
    keys: KeyIndex,
    assignment: Mapping[str, Any],
    base: str,
    metric: str | None,
) -> str | None:
    """Parse one run; an error line, or None when it parses and logs the metric."""
    from jsonargparse import ArgumentError

    from sn_lightning.errors import ConfigError

    try:
        config = parse(assignment)
        logged = logged_metric_names(config) if metric else []
    except (ArgumentError, SystemExit) as err:
        return _parse_error(err, assignment, keys, base)
    except (ConfigError, ValueError, TypeError) as err:
        return f"run {dict(assignment)!r}: {_one_line(err)}"
    if metric and not _logs(metric, logged):
        return (
            f"metric.name: {metric!r} is not logged by run {dict(assignment)!r}; it logs: "
            f"{', '.join(logged)}"
        )
    return None


def _logs(metric: str, logged: Iterable[str]) -> bool:
    """Whether ``metric`` matches one of the names (fnmatch patterns) a run logs."""
    return any(fnmatch.fnmatchcase(metric, pattern) for pattern in logged)


def _runs_to_check(config: Any) -> list[dict[str, Any]]:
    """Every grid point (up to a cap), or a few random proposals for random / bayes."""
    if config["method"] == "grid":
        return propose(config, [], n=_MAX_CHECKED_RUNS)
    sample = _sweeps().SweepConfig({**dict(config), "method": "random"})
    return propose(sample, [], n=_RANDOM_CHECKS)


def _cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions of its ``__cause__`` chain, outermost first."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and all(cause is not seen for seen in chain):
        chain.append(cause)
        cause = cause.__cause__
    return chain


def _rejection(error: BaseException) -> str:
    """Why instantiation failed, in one line: the constructor's own ConfigError where there is one.

    jsonargparse wraps an attack's error in its union message ("Does not validate against any of
    the Union subtypes ..."); the constructor's exception is in the ``__cause__`` chain.
    """
    from sn_lightning.errors import ConfigError

    chain = _cause_chain(error)
    chosen = next((e for e in chain if isinstance(e, ConfigError)), None)
    if chosen is not None:
        return _one_line(chosen)
    return f"{type(chain[-1]).__name__}: {_one_line(chain[-1])}"


def _value_errors(
    parser: _FitParser,
    parse: Callable[[Mapping[str, Any]], Any],
    cfg: Mapping[str, Any],
    reference: Mapping[str, Any],
) -> list[str]:
    """Values that parse but that the classes reject before training; one line per parameter.

    Each listed value and each bound of a ranged distribution is instantiated on the base command
    with that one value set (Note [checking values without training]); a failure the base command
    shows without the value is not the value's. Unless a value already went through with the
    model built, one proposed run (``reference``) is instantiated as a whole, which catches a base
    config every run would fail with. Data files missing on this machine are not checked here
    (Note [checking values without training]).
    """
    base: dict[bool, str | None] = {}
    model_built = False

    def rejection(params: Mapping[str, Any], build_model: bool) -> str | None:
        try:
            parser.instantiate(parse(params), build_model=build_model)
        except Exception as err:  # anything fit would stop on before training
            return _rejection(err)
        return None

    lines = []
    for name, spec in _params(cfg).items():
        build_model = name.split(".")[0] in ("model", "data")
        for label, value in _checked_values(name, spec):
            reason = rejection({name: value}, build_model)
            if reason is None:
                model_built = model_built or build_model
                continue
            if build_model not in base:
                base[build_model] = rejection({}, build_model)
            if reason != base[build_model]:
                lines.append(
                    f"parameters.{name}: {label} {value!r} is rejected before training: {reason}"
                )
                break  # one line per parameter
    if lines or model_built:
        return lines
    reason = rejection(reference, True)
    return [f"run {dict(reference)!r} is rejected before training: {reason}"] if reason else []


def _runs_without_data(
    runs: Iterable[Mapping[str, Any]], parse: Callable[[Mapping[str, Any]], Any]
) -> list[tuple[dict[str, Any], Exception]]:
    """Complete runs whose data files are not on this machine: ``(params, MissingDataError)``.

    One entry per distinct data section (``data.*`` as parsed); a run that does not parse or
    whose data values are rejected is left to the other checks.
    """
    from sn_lightning.data import ImageDataModule
    from sn_lightning.data.datamodule import missing_data_deferred

    seen: set[str] = set()
    found = []
    for params in runs:
        try:
            data = parse(params).data.as_dict()
        except Exception:  # reported by the parse checks
            continue
        key = json.dumps(data, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        with missing_data_deferred() as missing:
            try:
                ImageDataModule(**data)
            except Exception:  # a rejected data value: reported by the value checks
                continue
        if missing:
            found.append((dict(params), missing[0]))
    return found


def _cannot_start(
    path: str | Path, missing: Iterable[tuple[dict[str, Any], Exception]]
) -> list[str]:
    """``run``'s error lines for runs whose data is missing here (:func:`_runs_without_data`)."""
    return [f"{path}: run {params!r} cannot start: {_one_line(err)}" for params, err in missing]


def _missing_data_note(err: Exception) -> str:
    """The note of a check made without the data: what is missing and what stood in for it."""
    assumed = getattr(err, "assumed", None)
    stand_in = f" ({assumed})" if assumed else ""
    return (
        f"the data is not on this machine ({_one_line(err)}); every value was checked without "
        f"it{stand_in}, but not the files themselves"
    )


def validate_sweep(path: str | Path, notes: list[str] | None = None) -> list[str]:
    """Every problem with one sweep YAML, one line each (empty: valid).

    Schema (the W&B sweeps engine), what the engine raises when asked for runs, the command, then
    each parameter value alone and each proposed run, rendered as ``wandb agent`` renders them and
    parsed by the fit CLI's parser; last, each listed value (and each bound of a range)
    instantiated as the fit CLI does before training, without training or loading data.

    Args:
        path: the sweep YAML.
        notes: a list that gets one line for each dataset whose files are missing on this
            machine (a sweep checked on a laptop before it runs in the cloud): not an error
            here, every value is checked without the files (``run`` decides).
    """
    errors, missing = _validate(path)
    if notes is not None:
        notes += [_missing_data_note(err) for _, err in missing]
    return errors


def _validate(path: str | Path) -> tuple[list[str], list[tuple[dict[str, Any], Exception]]]:
    """:func:`validate_sweep`'s errors, and the checked runs whose data is missing here."""
    try:
        cfg = load_sweep(path)
    except SweepError as err:
        return [str(err)], []
    errors = schema_errors(cfg)
    if errors:
        return [f"{path}: {e}" for e in errors], []
    errors = _command_errors(cfg)
    if errors:
        return [f"{path}: {e}" for e in errors], []
    config = sweep_config(cfg)
    errors = _engine_errors(config)
    if errors:
        return [f"{path}: {e}" for e in errors], []
    metric = (cfg.get("metric") or {}).get("name")
    with tempfile.TemporaryDirectory() as tmp:

        def render(params: Mapping[str, Any], run_id: str) -> list[str]:
            argv = agent_command(cfg, params, run_id=run_id, sweep_id="validate", wandb_dir=tmp)
            return fit_args(argv)

        try:
            base_args = render({}, "base")
        except SweepError as err:
            return [f"{path}: {err}"], []
        base = _base_display(cfg)
        try:
            parser = _FitParser(base_args)
        except Exception as err:
            return [f"{path}: command: `{base}` does not parse: {_one_line(err)}"], []
        parsed: dict[str, Any] = {}

        def parse(params: Mapping[str, Any]) -> Any:
            """The parsed config of the run with ``params`` (each run parsed once)."""
            key = json.dumps(params, sort_keys=True, default=str)
            if key not in parsed:
                parsed[key] = parser.parse(render(params, f"r{len(parsed)}"))
            return parsed[key]

        lines = []
        for name, spec in _params(cfg).items():
            for value in _candidate_values(name, spec):
                line = _check_run(parse, parser.keys, {name: value}, base, None)
                if line:
                    lines.append(line)
                    break  # one line per parameter
        if lines:
            return [f"{path}: {line}" for line in lines], []
        runs = _runs_to_check(config)
        for params in runs:
            line = _check_run(parse, parser.keys, params, base, metric)
            if line:
                return [f"{path}: {line}"], []
        lines = _value_errors(parser, parse, cfg, runs[0] if runs else {})
        missing = _runs_without_data(runs, parse)
    return [f"{path}: {line}" for line in lines], missing


def describe(cfg: Mapping[str, Any]) -> str:
    """``grid, 24 runs, maximize val/robust_acc/...`` for the validation summary line."""
    method = cfg.get("method")
    if method == "grid":
        size = len(propose(sweep_config(cfg), [], n=_MAX_CHECKED_RUNS))
        runs = f"{size} runs" if size < _MAX_CHECKED_RUNS else f">= {size} runs"
    else:
        runs = f"run_cap {cfg['run_cap']}" if "run_cap" in cfg else "unbounded"
    metric = cfg.get("metric") or {}
    target = (
        f"{metric.get('goal', 'minimize')} {metric['name']}" if "name" in metric else "no metric"
    )
    extra = ", hyperband" if (cfg.get("early_terminate") or {}).get("type") == "hyperband" else ""
    return f"{method}, {runs}, {target}{extra}"


# -- the local runner -------------------------------------------------------------------------------
@dataclass
class LocalRun:
    """One run of a local sweep: what was started and what came back."""

    run_id: str
    params: dict[str, Any]  # as the engine proposed them (fed back to it; resuming matches them)
    command: list[str] = field(default_factory=list)
    status: str = "pending"  # finished | failed | dry-run
    returncode: int | None = None
    seconds: float = 0.0
    metric: float | None = None
    results_path: str | None = None
    key_results: dict[str, Any] = field(default_factory=dict)
    used: dict[str, Any] = field(default_factory=dict)  # what the run got: options after -- win
    error: str = ""  # why a failed run failed: the last error line of its output.log

    def __post_init__(self) -> None:
        """``used`` defaults to the proposed values."""
        self.used = self.used or dict(self.params)

    def sweep_run(self, metric_name: str | None) -> Any:
        """This run as the engine's `SweepRun` (its metric fed back to bayes)."""
        sweeps = _sweeps()
        state = {"finished": "finished", "failed": "failed"}.get(self.status, "running")
        summary = {metric_name: self.metric} if metric_name and self.metric is not None else {}
        return sweeps.SweepRun(
            name=self.run_id,
            state=sweeps.RunState(state),
            config={k: {"value": v} for k, v in self.params.items()},
            summary_metrics=summary,
        )


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def metric_value(results: Mapping[str, Any], name: str) -> float | None:
    """The metric's last logged value (``results["metrics"]``), else a results.json path (a/b/c)."""
    value = (results.get("metrics") or {}).get(name)
    if value is None:
        value = flatten({k: v for k, v in results.items() if k != "metrics"}).get(name)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def key_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of runs.csv besides the parameters and the metric."""
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        if isinstance(results.get(split), Mapping):
            out[f"{split}_acc"] = results[split].get("acc")
    for key in ("gap", "lipschitz_bound", "train_time_s"):
        if key in results:
            out[key] = results[key]
    for name, entry in (results.get("adversarial") or {}).items():
        out[f"{name}/test_acc"] = entry.get("test", {}).get("acc")
        out[f"{name}/gap"] = entry.get("gap")
    for eps, entry in ((results.get("certified") or {}).get("eps") or {}).items():
        out[f"certified/{eps}/test"] = entry.get("test")
    return out


def _execute(argv: list[str], env: Mapping[str, str], log: Path) -> int:
    """Start one run (output to ``log``) and wait for it; its exit code."""
    with log.open("w") as out:
        return subprocess.run(
            argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode


def _run_env(run_id: str, out: Path, wandb_mode: str, cfg: Mapping[str, Any]) -> dict[str, str]:
    """The agent's environment for one run, offline unless asked otherwise."""
    env = dict(os.environ)
    env["WANDB_RUN_ID"] = run_id
    env["WANDB_DIR"] = str(out)
    if wandb_mode != "online":
        env["WANDB_MODE"] = wandb_mode
    if cfg.get("project") and "WANDB_PROJECT" not in env:
        env["WANDB_PROJECT"] = str(cfg["project"])
    # `python` (the agent's ${interpreter}) is this interpreter: its folder goes first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _write_sweep_params(path: Path, params: Mapping[str, Any]) -> None:
    """The agent's ``config-<run>.yaml`` (``WANDB_SWEEP_PARAM_PATH``): run.config gets the values."""
    from wandb.sdk.lib import config_util

    path.parent.mkdir(parents=True, exist_ok=True)
    config_util.save_config_file_from_dict(str(path), {k: {"value": v} for k, v in params.items()})


_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b|: error: |^Killed\b")


def last_error_line(log: Path, limit: int = 300) -> str:
    """The last line of a run's output that reads as an error, else its last line ("": none).

    An error line is an exception's (``ValueError: ...``) or a CLI's (``prog: error: ...``).
    """
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    line = next((x for x in reversed(lines) if _ERROR_LINE.search(x)), lines[-1] if lines else "")
    return _one_line(line, limit)


def _finish(run: LocalRun, out: Path, metric: str | None) -> None:
    found = (out / run.run_id).rglob("results.json")  # not the copy inside the W&B run folder
    results_files = sorted(
        (p for p in found if "wandb" not in p.relative_to(out).parts),
        key=lambda p: p.stat().st_mtime,
    )
    if run.returncode != 0 or not results_files:
        run.status = "failed"
        run.error = last_error_line(out / run.run_id / "output.log") or (
            f"exit code {run.returncode}" if run.returncode else "no results.json was written"
        )
        return
    run.status = "finished"
    run.results_path = str(results_files[-1])
    results = json.loads(results_files[-1].read_text())
    run.key_results = key_results(results)
    run.metric = metric_value(results, metric) if metric else None


def _cell(value: Any) -> Any:
    if value is None:
        return "null"
    return value if isinstance(value, (int, float, str)) else json.dumps(value)


def write_csv(
    runs: Sequence[LocalRun], path: Path, param_names: Sequence[str], metric: str
) -> None:
    """One row per run: id, status, parameters, the metric, key results, the command."""
    extra: list[str] = []
    for run in runs:
        extra += [k for k in run.key_results if k not in extra]
    header = ["run_id", "status", "returncode", "seconds", *param_names, metric, *extra]
    header += ["results", "error", "params_json", "used_json", "command"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for run in runs:
            row = {
                "run_id": run.run_id,
                "status": run.status,
                "returncode": run.returncode,
                "seconds": round(run.seconds, 2),
                **{name: _cell(run.used.get(name)) for name in param_names},
                metric: run.metric if run.metric is not None else "",
                **{k: "" if v is None else v for k, v in run.key_results.items()},
                "results": run.results_path or "",
                "error": run.error,
                "params_json": json.dumps(run.params),
                "used_json": json.dumps(run.used),
                "command": shlex.join(run.command),
            }
            writer.writerow(row)


def read_csv(path: Path, metric: str) -> list[LocalRun]:
    """Runs of an earlier invocation (for resuming), from its runs.csv."""
    if not path.is_file():
        return []
    runs = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            value = row.get(metric) or ""
            results = Path(row.get("results") or "")
            known = key_results(json.loads(results.read_text())) if results.is_file() else {}
            runs.append(
                LocalRun(
                    run_id=row["run_id"],
                    params=json.loads(row["params_json"]),
                    command=shlex.split(row.get("command") or ""),
                    status=row["status"],
                    returncode=int(row["returncode"]) if row.get("returncode") else None,
                    seconds=float(row.get("seconds") or 0.0),
                    metric=float(value) if value else None,
                    results_path=row.get("results") or None,
                    key_results=known,
                    used=json.loads(row.get("used_json") or "{}"),
                    error=row.get("error") or "",
                )
            )
    return runs


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, json.dumps(value))


def _label(param: str, value: Any) -> str:
    if value is None:
        return "no SN (inf)" if param.endswith("beta") else "null"
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_metric(
    runs: Sequence[LocalRun],
    param: str,
    metric: str,
    path: Path,
    group_by: str | None = None,
    connect: bool = True,
) -> None:
    """The metric against one parameter (one line per value of ``group_by``); PNG via Agg.

    Non-numeric values (``null`` beta: no SN) sit at the right end of a categorical axis;
    ``connect=False`` draws points only (random / bayes samples).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.metric is not None and param in r.used]
    values = sorted({json.dumps(r.used[param]) for r in done})
    xs = sorted((json.loads(v) for v in values), key=_sort_key)
    categorical = any(_sort_key(x)[0] for x in xs)
    position = {json.dumps(x): (i if categorical else x) for i, x in enumerate(xs)}
    groups: dict[str, list[LocalRun]] = {}
    for run in done:
        groups.setdefault(json.dumps(run.used.get(group_by)) if group_by else "", []).append(run)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted(groups, key=lambda k: _sort_key(json.loads(k)) if k else (0, 0)):
        members = sorted(groups[key], key=lambda r: _sort_key(r.used[param]))
        x = [position[json.dumps(r.used[param])] for r in members]
        y = [r.metric for r in members]
        label = _label(group_by, json.loads(key)) if group_by else None
        ax.plot(x, y, marker="o", linestyle="-" if connect else "none", label=label)
    if categorical:
        ax.set_xticks(range(len(xs)), [_label(param, x) for x in xs])
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({len(done)} runs)", fontsize="medium")
    ax.grid(alpha=0.3)
    if group_by and groups:
        ax.legend(fontsize="small", title=group_by, title_fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _swept(cfg: Mapping[str, Any]) -> list[str]:
    """Parameters that vary: a list of values or a distribution."""
    return [name for name, spec in _params(cfg).items() if "value" not in spec]


def plot_all(
    runs: Sequence[LocalRun], cfg: Mapping[str, Any], metric: str, out: Path
) -> list[Path]:
    """``metric_vs_<param>.png`` for each swept parameter, grouped by another swept one."""
    swept = _swept(cfg)
    paths = []
    for param in swept:
        others = [p for p in swept if p != param]
        distinct = {p: len({json.dumps(r.used.get(p)) for r in runs}) for p in others}
        group = min((p for p in others if 1 < distinct[p] <= 8), key=distinct.get, default=None)
        path = out / f"metric_vs_{param}.png"
        plot_metric(runs, param, metric, path, group_by=group, connect=cfg["method"] == "grid")
        paths.append(path)
    return paths


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_sweep(
    path: str | Path,
    *,
    count: int | None = None,
    out: str | Path | None = None,
    fit_overrides: Sequence[str] = (),
    wandb_mode: str = "offline",
    dry_run: bool = False,
) -> list[LocalRun]:
    """Run a sweep locally; see the module docstring.

    Args:
        path: the sweep YAML.
        count: new runs to start (default: the rest of a grid; required for random / bayes).
        out: folder for runs, runs.csv and plots (default ``runs/sweeps/<yaml name>``).
        fit_overrides: extra fit options appended to every run's command.
        wandb_mode: ``offline`` (default), ``online`` (the environment decides) or ``disabled``.
        dry_run: print the commands, start nothing.

    Returns:
        Every run in ``out`` (earlier invocations' first), in order.
    """
    cfg = load_sweep(path)
    method = cfg.get("method")
    if method == "custom":
        raise SweepError(f"{path}: method custom needs a W&B scheduler; use grid, random or bayes")
    if count is None and method in ("random", "bayes"):
        raise SweepError(f"{path}: --count is required for method {method}")
    errors, missing = _validate(path)
    if errors:  # with the runs whose data is missing: all that stops this sweep at once
        raise SweepError("\n".join(errors + ([] if dry_run else _cannot_start(path, missing))))
    config = sweep_config(cfg)
    out = Path(out or Path("runs") / "sweeps" / Path(path).stem).resolve()
    metric = (cfg.get("metric") or {}).get("name") or "val/acc"
    sweep_id = f"local-{Path(path).stem}"
    parser = None
    if fit_overrides:  # they may change swept values: each run's command is parsed to record them
        base = agent_command(
            cfg, {}, run_id="base", sweep_id=sweep_id, wandb_dir=out, inline_json=True
        )
        parser = _FitParser(fit_args(base))

        def parse_run(params: Mapping[str, Any]) -> Any:
            command = agent_command(
                cfg, params, run_id="check", sweep_id=sweep_id, wandb_dir=out, inline_json=True
            )
            return parser.parse(fit_args([*command, *fit_overrides]))

        # the options may set data.*: ask the runs again, with them
        checked = _runs_to_check(config)
        missing = _runs_without_data(checked, parse_run)
        for params in checked:  # ... and change what the runs log
            try:
                logged = logged_metric_names(parse_run(params))
            except Exception:  # a bad option: named below, with its run (_used_values)
                break
            if not _logs(metric, logged):
                raise SweepError(
                    f"{path}: with the options after -- (`{shlex.join(fit_overrides)}`), run "
                    f"{dict(params)!r} does not log metric.name {metric!r}; it logs: "
                    f"{', '.join(logged)}"
                )
    if missing and not dry_run:  # Note [checking values without training]
        raise SweepError("\n".join(_cannot_start(path, missing)))
    for _, err in missing:  # a dry run needs no data here
        _say(f"{path}: note: {_missing_data_note(err)}")
    noted: set[str] = set()
    runs = read_csv(out / RUNS_CSV, metric)
    if runs:
        _say(f"resuming: {len(runs)} earlier runs in {out / RUNS_CSV}")
    if cfg.get("early_terminate"):
        _say(
            "note: early_terminate (hyperband) is applied by the W&B server only; local runs finish"
        )
    limit = count if count is not None else math.inf
    if "run_cap" in cfg:
        limit = min(limit, cfg["run_cap"] - len(runs))
    started = 0
    while started < limit:
        proposal = propose(config, [r.sweep_run(metric) for r in runs])
        if not proposal:
            _say("the grid is complete")
            break
        run = LocalRun(run_id=_new_run_id(), params=proposal[0])
        run_dir = out / run.run_id
        ids = {"run_id": run.run_id, "sweep_id": sweep_id, "wandb_dir": out}
        tail = [f"--trainer.default_root_dir={run_dir}", *fit_overrides]
        # checked with the values inline: a rejected first run leaves no files behind
        run.command = [*agent_command(cfg, run.params, **ids, inline_json=True), *tail]
        if parser is not None:
            run.used = _used_values(parser, run, fit_overrides, check=started == 0)
            changed = [k for k, v in run.used.items() if v != run.params[k] and k not in noted]
            if changed:
                noted.update(changed)
                _say(
                    f"note: the options after -- set {', '.join(changed)}; runs.csv and the "
                    "plots record the values the runs used"
                )
        started += 1
        runs.append(run)
        if dry_run:  # a dry run writes nothing: no folder, no JSON files, no runs.csv
            run.status = "dry-run"
            _say(shlex.join(run.command))
            continue
        run.command = [*agent_command(cfg, run.params, **ids), *tail]  # the agent's JSON file
        out.mkdir(parents=True, exist_ok=True)
        _start(run, cfg, out, sweep_id, wandb_mode, metric)
        value = "n/a" if run.metric is None else f"{run.metric:.4f}"
        line = (
            f"[{started}] {run.run_id} {run.status} ({run.seconds:.0f} s): "
            f"{_swept_values(run, cfg)} -> {metric} = {value}"
        )
        if run.status == "failed":
            line += f"; {run.error} ({run_dir / 'output.log'})"
        _say(line)
        write_csv(runs, out / RUNS_CSV, list(_params(cfg)), metric)
    if not dry_run and runs:
        plots = plot_all(runs, cfg, metric, out)
        _say(f"runs: {out / RUNS_CSV}; plots: {', '.join(p.name for p in plots) or 'none'}")
        target = cfg.get("metric") or {}
        goal = target.get("goal", "minimize")
        best = best_run(runs, goal) if target.get("name") else None  # no metric: no "best"
        if best is not None:
            _say(
                f"best ({goal} {metric}): {best.run_id}: {_swept_values(best, cfg)} -> {metric} "
                f"= {best.metric:.4f}" + (f" ({best.results_path})" if best.results_path else "")
            )
    return runs


def _swept_values(run: LocalRun, cfg: Mapping[str, Any]) -> str:
    """``model.beta=1 adversarial...eps=0.05``: the values ``run`` used for the swept keys."""
    return " ".join(f"{k}={_label(k, v)}" for k, v in run.used.items() if k in _swept(cfg))


def best_run(runs: Sequence[LocalRun], goal: str = "minimize") -> LocalRun | None:
    """The finished run with the best metric for ``goal`` (maximize / minimize), first on ties."""
    scored = [r for r in runs if r.status == "finished" and r.metric is not None]
    if not scored:
        return None
    sign = -1.0 if goal == "maximize" else 1.0
    return min(scored, key=lambda r: sign * r.metric)  # type: ignore[operator]


_MISSING = object()


def _config_value(config: Any, key: str) -> Any:
    """A parsed fit config's value for a sweep key (``init_args`` may be left out); _MISSING."""
    from jsonargparse import Namespace

    node = config
    for part in key.split("."):
        if node is None:  # e.g. adversarial.attack null: the run has no attack, hence no eps
            return None
        fields = vars(node) if isinstance(node, Namespace) else {}
        inner = fields.get("init_args")
        if part in fields:
            node = fields[part]
        elif isinstance(inner, Namespace) and part in vars(inner):
            node = vars(inner)[part]
        else:
            return _MISSING
    if isinstance(node, Namespace):  # a whole section (a class_path value): keep the proposal
        return _MISSING
    try:
        return _plain(node)
    except (TypeError, ValueError):
        return _MISSING


def _used_values(
    parser: _FitParser, run: LocalRun, overrides: Sequence[str], *, check: bool
) -> dict[str, Any]:
    """The values ``run`` gets for its sweep parameters with ``overrides`` (options after --).

    With ``check``, what the fit CLI instantiates before training is instantiated too
    (Note [checking values without training]): bad options fail here, before any run starts.

    Raises:
        SweepError: the command does not parse, or its values are rejected.
    """
    from jsonargparse import ArgumentError

    from sn_lightning.errors import ConfigError

    where = f"options after --: `{shlex.join(overrides)}`"
    try:
        config = parser.parse(fit_args(run.command))
    except (ArgumentError, SystemExit, ConfigError, ValueError, TypeError) as err:
        reason = _reason(err)
        unknown = re.search(r"unrecognized arguments: --([\w.]+)", reason)
        if unknown and not parser.keys.knows(unknown[1]):
            reason = f"unknown config key {unknown[1]}; {parser.keys.explain(unknown[1])}"
        raise SweepError(f"{where} do not parse with run {run.params!r}: {reason}") from None
    if check:
        try:
            parser.instantiate(config)
        except Exception as err:  # anything fit would stop on before training
            raise SweepError(
                f"{where}: run {run.params!r} is rejected before training: {_rejection(err)}"
            ) from None
    used = {}
    for name, value in run.params.items():
        got = _config_value(config, name)
        used[name] = value if got is _MISSING else got
    return used


def _start(
    run: LocalRun, cfg: Mapping[str, Any], out: Path, sweep_id: str, wandb_mode: str, metric: str
) -> None:
    run_dir = out / run.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    env = _run_env(run.run_id, out, wandb_mode, cfg)
    params_file = out / "wandb" / f"sweep-{sweep_id}" / f"config-{run.run_id}.yaml"
    _write_sweep_params(params_file, run.used)  # W&B's config: options after -- win there too
    env["WANDB_SWEEP_PARAM_PATH"] = str(params_file)
    start = time.perf_counter()
    run.returncode = _execute(run.command, env, run_dir / "output.log")
    run.seconds = time.perf_counter() - start
    _finish(run, out, metric)


# -- command line -------------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (no usage block), exit 2; ``--help`` as usual."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="check sweep YAMLs offline (schema, keys, values)")
    check.add_argument("sweeps", nargs="+", help="sweep YAML files")
    local = sub.add_parser(
        "run",
        help="run a sweep locally, as `wandb agent` would",
        epilog="Options after `--` are appended to every run's command, e.g. "
        "`-- --trainer.max_epochs=1 --trainer.accelerator=gpu`.",
    )
    local.add_argument("sweep", help="the sweep YAML")
    local.add_argument("--count", type=int, default=None, help="new runs (default: the whole grid)")
    local.add_argument("--out", default=None, help="output folder (default runs/sweeps/<name>)")
    local.add_argument(
        "--wandb-mode",
        choices=("offline", "online", "disabled"),
        default="offline",
        help="WANDB_MODE of the runs; online: leave it to the environment",
    )
    local.add_argument("--dry-run", action="store_true", help="print the commands only")
    return parser


def _validate_all(paths: Iterable[str]) -> int:
    failed = False
    for path in paths:
        notes: list[str] = []
        errors = validate_sweep(path, notes)
        for line in errors:
            sys.stderr.write(f"{PROG}: error: {line}\n")
        if not errors:
            _say(f"{path}: ok ({describe(load_sweep(path))})")
            for note in notes:
                _say(f"{path}: note: {note}")
        failed = failed or bool(errors)
    return 2 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; the exit code (0 ok, 1 a run failed, 2 a bad sweep or usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, fit_overrides = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return _validate_all(args.sweeps)
        if args.count is not None and args.count < 1:
            raise SweepError(f"--count must be >= 1, got {args.count}")
        runs = run_sweep(
            args.sweep,
            count=args.count,
            out=args.out,
            fit_overrides=fit_overrides,
            wandb_mode=args.wandb_mode,
            dry_run=args.dry_run,
        )
    except SweepError as err:
        for line in str(err).splitlines():
            sys.stderr.write(f"{PROG}: error: {line}\n")
        return 2
    except BrokenPipeError:  # `... --dry-run | head`: the reader left; no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 1 if any(r.status == "failed" for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
