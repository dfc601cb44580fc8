"""`python -m sn_lightning.fit --config configs/x.yaml [--a.b=value ...]`: train, evaluate, write results.json.

Every option can be overridden in the ``--a.b=value`` form that ``wandb agent`` produces (or by a
later ``--config`` layer, such as the agent's ``${args_json_file}``); ``--print_config`` prints the
resolved config without training; ``--ckpt_path`` resumes.

W&B: with ``--trainer.logger=lightning.pytorch.loggers.WandbLogger`` each run gets its own directory
``<save_dir>/<project>/<run id>/`` (config.yaml, results.json, checkpoints), ``save_dir`` defaulting
to ``trainer.default_root_dir``; the run id is ``WANDB_RUN_ID`` (set by ``wandb agent``), the one a
resumed checkpoint was saved under, or a new one, shared with every DDP rank; when W&B cannot be
reached (no API key, no network) the run goes on offline with a one-line warning; results.json
also goes to the W&B run summary (``results/...``).
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import functools
import importlib
import inspect
import json
import logging
import math
import netrc
import os
import pickle
import re
import secrets
import string
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    Checkpoint,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    ProgressBar,
    Timer,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from sn_lightning._metrics import logged_metric_names
from sn_lightning._net import unreachable_reason
from sn_lightning.callbacks import (
    AdversarialTraining,
    DataGrad,
    LayerwiseTraining,
    RobustEvaluation,
)
from sn_lightning.callbacks.adversarial import attack_precision, check_attack_precision
from sn_lightning.callbacks.robust_eval import attack_name
from sn_lightning.config_keys import KeyIndex, flatten
from sn_lightning.data import ImageDataModule
from sn_lightning.errors import ConfigError, ConfigWarning, first_line
from sn_lightning.evaluation import evaluate
from sn_lightning.lit import SNClassifier
from sn_lightning.lit.classifier import objective_conflict

RESULTS_FILE = "results.json"
DESCRIPTION = (
    "Train an image classifier with exact spectral normalization, adversarial or certified "
    "training; evaluate it (clean, PGD and certified accuracy) and write results.json."
)
_OFFLINE_MODES = ("offline", "dryrun", "disabled")
_log = logging.getLogger(__name__)


class _OneLineErrorParser(LightningArgumentParser):
    """Parser errors (unknown key, bad value, malformed YAML) as one line, no usage dump, exit 2.

    Flags must be spelled out: argparse's prefix matching would take ``--trainer.max_epoch``
    as ``max_epochs`` and ``--adversarial.eps`` as ``eps_warmup_epochs``, silently.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []
        self._cwd = Path.cwd()

    def parse_args(self, args: Sequence[str] | None = None, *a: Any, **kw: Any) -> Namespace:  # type: ignore[override]
        """As jsonargparse's; remembers the arguments so that errors can name a config file."""
        self._argv = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
        self._cwd = Path.cwd()  # jsonargparse parses a config file from inside its folder
        return super().parse_args(args, *a, **kw)

    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        """Print one line and exit 2; raise as usual where jsonargparse handles the error itself."""
        if not getattr(self, "exit_on_error", True):
            super().error(message, ex)
        first = " ".join(str(message).split())  # collapse jsonargparse's multi-line explanations
        sys.stderr.write(f"{self.prog}: error: {self._plain(first)}\n")
        raise SystemExit(2)

    def _plain(self, message: str) -> str:
        """The message in plain words; an unknown key gets suggestions and its section's keys."""
        in_class = (
            _class_init_error(message)
            or _unset_class_error(message)
            or _class_problem(message)
            or _linked_key_error(message)
        )
        if in_class is not None:
            return in_class
        if message.startswith(("Problems parsing config", "Unexpected config")):
            return malformed_config(self._argv, self._cwd) or message
        key = _unknown_key(message)
        if key is None:
            return _plain_parser_error(message)
        try:
            index = KeyIndex.from_config(self.get_defaults())
        except Exception:  # the message as it is, rather than a second error
            return message
        return f"{message}; {index.explain(key)}" if not index.knows(key) else message


def malformed_config(argv: Sequence[str], cwd: Path | None = None) -> str | None:
    """``--config <file>: ...`` for the first ``--config`` file that is not a YAML mapping.

    jsonargparse reports a YAML syntax error against ``"<unicode string>"``, without the file,
    and from inside the file's folder: relative paths are taken from ``cwd`` (the caller's).
    """
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for path in paths:
        try:
            file = Path(cwd or Path.cwd()) / path
            if not file.is_file():
                continue  # missing (jsonargparse says so)
        except (OSError, ValueError):  # an inline YAML string too long or odd for a path
            continue
        try:
            with file.open(encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"--config {path}: malformed YAML{where}: {problem}"
        except (OSError, UnicodeDecodeError) as err:
            return f"--config {path}: cannot be read: {err}"
        if loaded is not None and not isinstance(loaded, dict):
            kind = type(loaded).__name__
            return f"--config {path}: expected a mapping of keys (model:, data:, trainer: ...), got a {kind}"
    return None


def _unknown_key(message: str) -> str | None:
    """The dotted key a jsonargparse 'unknown option' message names (flag or YAML), else None."""
    flag = re.search(r"unrecognized arguments: --([\w.]+)", message)
    if flag:
        return flag.group(1)
    group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    if group:
        return f"{group.group(1)}.{group.group(2)}"
    option = re.search(r"Option '([\w.]+)' is not accepted", message)
    return option.group(1) if option else None


_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "str": "a string",
    "NoneType": "null",
    "sn_lightning.attacks.base.Attack": "an attack: FGM, PGD, WRM (or a full class path)",
    "lightning.pytorch.callbacks.callback.Callback": (
        "a callback class path (e.g. lightning.pytorch.callbacks.EarlyStopping)"
    ),
    "lightning.pytorch.loggers.logger.Logger": (
        "a logger class (WandbLogger, CSVLogger or TensorBoardLogger, from lightning.pytorch.loggers)"
    ),
}


_LIST_WORDS = {
    "list[float]": "a list of numbers like [0.1, 0.2]",
    "list[int]": "a list of integers like [1, 2]",
    "list[str]": "a list like ['layer1.*', 'fc']",
    "list[sn_lightning.attacks.base.Attack]": (
        "a list of attacks (FGM, PGD, WRM or full class paths; append one with "
        "--robust_eval.attacks+=PGD)"
    ),
    "list[lightning.pytorch.callbacks.callback.Callback]": "a list of callbacks",
    "dict[str, typing.Any]": "a mapping like {drop_rate: 0.1}",
}


_NON_FINITE = ("nan", "inf", "infinity", ".nan", ".inf")


def _finite(words: str, value: str) -> str:
    """``a number`` -> ``a finite number`` where the refused value is nan or inf."""
    if value.strip().strip("'\"").lower().lstrip("+-") in _NON_FINITE:
        return words.replace("a number", "a finite number", 1)
    return words


def _type_words(types: str) -> str:
    """``Literal[...]`` and ``<class ...>`` items of a jsonargparse message as words.

    ``typing.Literal['linf', 'l2'], <class 'NoneType'>`` -> ``one of linf, l2 or null``.
    """
    values: list[str] = []
    words = []
    pattern = r"typing\.Literal\[[^\]]*\]|<class '[\w.]+'>|list\[[\w.]+\]|dict\[[\w., ]+\]"
    for item in re.findall(pattern, types):
        if item.startswith("dict["):
            words.append(_LIST_WORDS.get(item, "a mapping like {key: value}"))
        elif item.startswith("list["):
            words.append(_LIST_WORDS.get(item, "a list like [a, b]"))
        elif item.startswith("typing.Literal["):
            try:
                literal = ast.literal_eval(f"[{item[len('typing.Literal[') : -1]}]")
            except (ValueError, SyntaxError):
                return ""
            values += [str(v) for v in literal if str(v) not in values]
        else:
            name = item[len("<class '") : -2]
            words.append(_TYPE_WORDS.get(name, name.rsplit(".", 1)[-1]))
    if values:
        words.insert(0, f"one of {', '.join(values)}")
    return " or ".join(words)


def _init_args(class_path: str) -> list[str]:
    """The keyword arguments of the class at ``class_path`` (empty if it cannot be resolved)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds]


def _class_init_error(message: str) -> str | None:
    """A bad class or init_arg under a ``class_path`` key (attacks) in plain words, else None.

    jsonargparse reports these as 'Does not validate against any of the Union subtypes' with the
    class's own problem inside: an unknown class (``PDG``), an unknown init_arg (``epss``) or a
    bad init_arg value (``norm: l3``), from a nested flag or a YAML file, for one class
    (``adversarial.attack``) or a list of them (``robust_eval.attacks``).
    """
    key = re.match(r'Parser key "([^"]+)":', message)
    union = re.search(
        r"Does not validate against any of the Union subtypes Subtypes: \[(.*?)\] Errors: - "
        r"(.*) - Expected a <class 'NoneType'> Given value type: "
        r"<class '(?:dict|list|str|jsonargparse\._util\.NestedArg)'>",
        message,
    )
    if key is None or union is None:
        return None
    subtypes, problem = union.groups()
    is_list = "list[" in subtypes
    flag = f"--{key.group(1)}"
    unknown = re.fullmatch(r"Expected a dot import path string: (\S+)", problem)
    given = re.match(r"Problem with given class_path '([\w.]+)': (.*)", problem)
    if (
        unknown is None
        and given is not None
        and re.search(
            r"has no attribute|No module named|is not a subclass|does not correspond",
            given.group(2),
        )
    ):
        unknown = given
    if unknown is not None:
        words = _type_words(re.sub(r"list\[([\w.]+)\]", r"<class '\1'>", subtypes))
        return f"{flag}: invalid value {unknown.group(1)!r}; expected {words}" if words else None
    if given is None:
        return None
    class_path, inner = given.groups()
    short = class_path.rsplit(".", 1)[-1]
    option = re.fullmatch(r"Option '([\w.]+)' is not accepted", inner)
    if option:
        valid = _init_args(class_path)
        listed = f"; valid: {', '.join(valid)}" if valid else ""
        return f"{flag}: {short} has no option {option.group(1)!r}{listed}"
    plain = _plain_parser_error(inner)
    if not plain.startswith("--"):
        return None
    return f"{flag}: {short} {plain[2:]}" if is_list else f"{flag}.init_args.{plain[2:]}"


def _class_problem(message: str) -> str | None:
    """A class under a ``class_path`` key refusing its init_args at parse time, else None.

    The cases :func:`_class_init_error` leaves: a Lightning callback or logger missing a required
    argument (``EarlyStopping`` without ``monitor``), or whose import fails (``TensorBoardLogger``
    without tensorboard): ``--trainer.callbacks: EarlyStopping: the following arguments are
    required: monitor``.
    """
    found = re.match(
        r'Parser key "([^"]+)": .*? - Problem with given class_path \'([\w.]+)\': (.*?)'
        r" - (?:Not a valid subclass|Expected a )",
        message,
    )
    if found is None:
        return None
    key, class_path, problem = found.groups()
    return f"--{key}: {class_path.rsplit('.', 1)[-1]}: {problem}"


def _instantiation_error(err: BaseException) -> str | None:
    """A Lightning callback or logger refusing its init_args while jsonargparse builds it, else None.

    jsonargparse wraps the class's own error (``ModelCheckpoint``'s exclusive options,
    ``EarlyStopping(mode="maxx")``, ``TensorBoardLogger`` without tensorboard) in a union error
    that lists every subtype; this is the class's first line, named by its key and class.
    """
    if not isinstance(err, ValueError) or not _raised_in(err, "jsonargparse."):
        return None
    text = str(err)
    if "callbacks.callback.Callback" in text:
        key = "trainer.callbacks"
    elif "loggers.logger.Logger" in text:
        key = "trainer.logger"
    else:
        return None
    cause = err.__cause__
    while cause is not None and _raised_in(cause, "jsonargparse."):
        cause = cause.__cause__
    if cause is not None:
        owner = _init_owner(cause)
        return f"{key}: {owner}: {first_line(cause)}" if owner else None
    found = re.search(r"Problem with given class_path '([\w.]+)':\s*(\S[^\n]*)", text)
    if found is None:
        return None
    return f"{key}: {found.group(1).rsplit('.', 1)[-1]}: {found.group(2).strip()}"


def _init_owner(err: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``err`` (its outermost ``__init__`` frame), else None."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return None


def _plain_parser_error(message: str) -> str:
    """A jsonargparse type error as ``--key: invalid value 'v'; expected ...`` (else unchanged).

    Handles a single type (``Expected a <class 'float'>. Got value: x``), a union ('Does not
    validate against any of the Union subtypes', string values only: another is e.g. a bad
    init_arg of a valid class) and an init_arg of a class given as a nested flag
    (``--adversarial.attack.init_args.norm=l3``: the error of the init_arg itself).
    """
    nested = re.search(
        r"^Parser key \"([^\"]+)\": .*?Problem with given class_path '[\w.]+': "
        r"(Parser key \".*?) - Expected a <class 'NoneType'> Given value type: "
        r"<class 'jsonargparse\._util\.NestedArg'> Given value: NestedArg\(key='[\w.]+'",
        message,
    )
    if nested:
        inner = _plain_parser_error(nested.group(2))
        if inner.startswith("--"):
            return f"--{nested.group(1)}.init_args.{inner[2:]}"
        return message
    single = re.fullmatch(
        r"Parser key \"([^\"]+)\": Expected a (typing\.Literal\[[^\]]*\]|<class '[\w.]+'>)\. "
        r"Got value: (.*)",
        message,
    )
    if single:
        key, types, value = single.groups()
        words = _finite(_type_words(types), value)
        return f"--{key}: invalid value {value!r}; expected {words}" if words else message
    key = re.match(r'Parser key "([^"]+)":', message)
    union = "Does not validate against any of the Union subtypes Subtypes: "
    subtypes = re.search(re.escape(union) + r"\[(.*?)\] Errors:", message)
    given = re.search(r" Given value type: <class '(\w+)'> Given value: (.*)$", message)
    if not (key and subtypes and given) or "Given value type:" in given.group(2):
        return message
    kind, value = given.groups()
    if kind != "str" and re.search(r"<class '\w+\.[\w.]+'>", subtypes.group(1)):
        return message  # a class key (attacks): _class_init_error's case
    words = _finite(_type_words(subtypes.group(1)), value)
    if not words:
        return message
    hint = ""
    if key.group(1) == "model.beta" and kind == "dict":
        hint = "; a per-layer beta mapping is for apply_spectral_norm(model, beta={...}) in Python"
    return f"--{key.group(1)}: invalid value {value!r}; expected {words}{hint}"


def _linked_key_error(message: str) -> str | None:
    """A model key that the data module sets (``add_arguments_to_parser``'s links), given directly.

    jsonargparse says ``Linked "model.num_classes" must be given via "data"``, or for a list
    ``argument mean_of(data) --> model.mean: invalid Optional value``.
    """
    found = re.search(r'Linked "model\.(\w+)" must be given via', message) or re.search(
        r"argument \w+_of\(data\) --> model\.(\w+):", message
    )
    if found is None:
        return None
    key = found.group(1)
    if key in ("mean", "std"):
        return f"--model.{key} is set from the data module; set --data.{key} instead"
    source = {
        "num_classes": "the dataset's classes; imagefolder: its class folders",
        "input_shape": "the dataset's image shape; imagefolder: data.image_size",
    }.get(key, "the dataset's")
    return f"--model.{key} is set from the data module ({source}); it cannot be given"


def _unset_class_error(message: str) -> str | None:
    """An init_arg flag for a class key that is still null (``--adversarial.attack.eps`` alone)."""
    found = re.match(
        r'Parser key "([^"]+)": .*Expected an instantiatable class, but ([\w.]+) is abstract'
        r".*NestedArg\(key='([\w.]+)'",
        message,
    )
    if found is None:
        return None
    key, base, arg = found.groups()
    words = next(
        (w for k, w in _TYPE_WORDS.items() if k.rsplit(".", 1)[-1] == base.rsplit(".", 1)[-1]), ""
    )
    choice = f" to {words}" if words else ""
    return f"--{key}.{arg}: no class is set for --{key}; set --{key} first{choice}"


def config_error_in(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err``, if any (jsonargparse wraps errors raised in ``__init__``).

    A wrapped error is prefixed with the class that raised it (``PGD: steps must be >= 1``).
    """
    chain, seen = [], set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConfigError):
            if "\nOriginal Traceback" in str(e):  # re-raised from a DataLoader worker
                # its last line is "sn_lightning.errors.<ConfigError or a subclass>: message"
                last = str(e).rstrip().splitlines()[-1]
                return ConfigError(re.sub(r"^[\w.]*Error: ", "", last))
            for outer in chain:
                found = re.search(r"class_path='([\w.]+)'", str(outer))
                if found:
                    return ConfigError(f"{found.group(1).rsplit('.', 1)[-1]}: {e}")
            return e
        chain.append(e)
        e = e.__cause__  # not __context__: an error raised while handling one is its own
    return None


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Bad user input as one line on stderr and exit status 2, no traceback.

    Catches a ConfigError, also one wrapped by jsonargparse while it instantiates the classes.
    """
    try:
        yield
    except Exception as err:
        cause = config_error_in(err)
        if cause is None:
            raise
        sys.stderr.write(f"{prog}: error: {cause}\n")
        raise SystemExit(2) from None


# Note [quiet runs]
# Lightning prints lines on every run that say nothing about the run: two advertisements for its
# cloud products ("Tip: ... litlogger", "... litmodels"), a note that `logger=True` is a CSVLogger
# without tensorboard (the README says where metrics go), with torch >= 2.10 a FutureWarning
# from its own pytree helper, and with data.val_size=0 a warning that the (empty, as asked)
# validation loader is empty. `quiet_lightning` drops exactly these for the duration
# of a `fit`/`evaluate` run; every other info line and warning is kept.
_NOISE_WARNINGS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Total length of `list` across ranks is zero",  # data.val_size=0: no validation, as asked
)
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" advertisements."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


@contextlib.contextmanager
def quiet_lightning(prog: str = "python -m sn_lightning.fit") -> Iterator[None]:
    """Silence Lightning's per-run advertisements and known-harmless warnings (Note [quiet runs]).

    Warnings print on one line; a :class:`ConfigWarning` as ``{prog}: warning: {message}``, like
    the CLI's errors.
    """
    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in _TIP_LOGGERS]
    for logger in loggers:
        logger.addFilter(tips)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = functools.partial(_one_line_warning, prog=prog)
    try:
        with warnings.catch_warnings():
            for pattern in _NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            if rank_zero_only.rank > 0:  # a DDP rank re-running the command: rank 0 warns
                warnings.filterwarnings("ignore", category=ConfigWarning)
            yield
    finally:
        warnings.formatwarning = formatwarning
        for logger in loggers:
            logger.removeFilter(tips)


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
    *,
    prog: str,
) -> str:
    """``file:line: Category: message`` without Python's echo of the source line.

    A configuration warning is raised where jsonargparse or Lightning instantiates the class, so
    its place (and the echoed line) would be theirs: it prints as ``{prog}: warning: {message}``.
    """
    if issubclass(category, ConfigWarning):
        return f"{prog}: warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


class _HoldRecords(logging.Filter):
    """Keeps the records a handler would emit, and lets none through."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(r is record for r in self.records):
            self.records.append(record)
        return False


@contextlib.contextmanager
def held_startup_lines() -> Iterator[Any]:
    """Hold Lightning's start-up lines ("Seed set to 0", "GPU available: ...") until released.

    Yields ``release()``: it prints the held lines and lets later ones through. A bad config
    found before it is called (the CLI's trainer keys, :func:`check_run`) stops the run with its
    one line alone; the held lines are dropped.
    """
    hold = _HoldRecords()
    handlers = [
        h
        for name in ("lightning.pytorch", "lightning.fabric")
        for h in logging.getLogger(name).handlers
    ]
    for handler in handlers:
        handler.addFilter(hold)

    def release() -> None:
        for handler in handlers:
            handler.removeFilter(hold)
        records, hold.records = hold.records, []
        for record in records:
            logging.getLogger(record.name).handle(record)

    try:
        yield release
    finally:
        for handler in handlers:
            handler.removeFilter(hold)


def build_cli(cli_class: type[LightningCLI], **kwargs: Any) -> Any:
    """``cli_class(**kwargs)``, with Lightning's errors on bad trainer keys as a ConfigError."""
    try:
        return cli_class(**kwargs)
    except _TRAINER_ERRORS as err:
        if config_error_in(err) is None:  # ours: one_line_errors names the class
            refused = _instantiation_error(err)
            if refused is not None:
                raise ConfigError(refused) from err
        if not _is_trainer_error(err):
            raise
        raise ConfigError(f"trainer: {_trainer_message(err)}") from err


_TRAINER_ERRORS = (MisconfigurationException, ValueError, TypeError, ImportError)


def _is_trainer_error(err: BaseException) -> bool:
    """Whether ``err`` is Lightning refusing a trainer key.

    A MisconfigurationException, or an error raised in the Trainer's connectors or the
    accelerators they build (an unknown strategy name, devices=-3, accelerator=tpu without
    torch_xla).
    """
    return isinstance(err, MisconfigurationException) or _raised_in(err, _TRAINER_MODULES)


_TRAINER_MODULES = (
    "lightning.pytorch.trainer.",
    "lightning.pytorch.accelerators.",
    "lightning.fabric.accelerators.",
)
_DEVICES_HINT = "devices takes a count >= 1, a list of device indices or auto"
_TRAINER_HINTS = {
    "No supported gpu backend found": "valid here: --trainer.accelerator=cpu or auto",
    "value is not a valid input using": _DEVICES_HINT,
    "should be an int > 0": _DEVICES_HINT,
}


def _trainer_message(err: BaseException, trainer: Any = None) -> str:
    """Lightning's first line for a bad trainer key, with the valid choices where it names none.

    ``trainer``: the trainer's config (a mapping); a key the line names in backquotes
    (```devices```) is quoted with its given value unless the line shows that value already.
    """
    line = first_line(err)
    hint = next((h for key, h in _TRAINER_HINTS.items() if key in line), None)
    given = ""
    if trainer is not None:
        values = [
            f"{k}={v!r}"
            for k in _TRAINER_QUOTED
            if f"`{k}`" in line and (v := trainer.get(k)) is not None and repr(v) not in line
        ]
        given = f" (given {', '.join(values)})" if values else ""
    text = f"{line.rstrip('.!')}{given}"
    return f"{text}; {hint}" if hint else (text if given else line)


# trainer keys whose given value a Lightning error is quoted with when its line names them
_TRAINER_QUOTED = ("accelerator", "strategy", "devices", "num_nodes", "precision")


def _raised_in(err: BaseException, module_prefix: str | tuple[str, ...]) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in a module named ``module_prefix*``."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith(
        module_prefix
    )


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A checkpoint path must name a file (Lightning's keywords and URLs pass through).

    ``best`` names the best checkpoint of a fit that ran in this process, so it resumes nothing;
    ``last`` is resolved across runs by :func:`check_run`.
    """
    if ckpt_path == "best":
        raise ConfigError(
            "ckpt_path 'best' names the best checkpoint of an earlier fit in this process; to "
            "resume, pass the .ckpt file (e.g. <run dir>/checkpoints/epoch=...ckpt) or last / hpc"
        )
    if ckpt_path is None or ckpt_path in ("last", "hpc") or "://" in ckpt_path:
        return
    if ckpt_path.startswith("registry"):
        return
    if not Path(ckpt_path).expanduser().is_file():
        raise ConfigError(f"ckpt_path {ckpt_path!r} is not a file (a .ckpt path, or last / hpc)")


def _last_checkpoint(root: str | os.PathLike[str]) -> str:
    """``ckpt_path: last``: the newest ``last*.ckpt`` of any run under ``root``.

    Lightning looks for it only in this run's own ``version_N/checkpoints``, a fresh folder, so
    it would start from scratch with a warning.
    """
    found = [
        p
        for p in Path(root).expanduser().rglob("last*.ckpt")
        if p.is_file() and re.fullmatch(r"last(-v\d+)?\.ckpt", p.name)  # ModelCheckpoint's names
    ]
    if not found:
        raise ConfigError(
            f"ckpt_path 'last': no last.ckpt under {root} (a run saves one with "
            "--trainer.callbacks+=ModelCheckpoint --trainer.callbacks.save_last=true); pass a "
            ".ckpt file instead"
        )
    return str(max(found, key=lambda p: p.stat().st_mtime))  # Lightning prints which


_SEED_MAX = 2**32 - 1  # numpy's range, which Lightning's seed_everything enforces


def _read_from_data(key: str) -> Callable[[Any], Any]:
    """``dm -> dm.<key>``, named ``<key>_of`` (``--help`` shows ``num_classes_of(data)``)."""

    def read(dm: Any) -> Any:
        return getattr(dm, key)

    read.__name__ = read.__qualname__ = f"{key}_of"
    return read


class SNLightningCLI(LightningCLI):
    """LightningCLI with the data module's facts linked into the model and a ``--ckpt_path`` key."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link num_classes, input_shape, mean, std from the data module; add --ckpt_path."""
        for key in ("num_classes", "input_shape", "mean", "std"):
            parser.link_arguments(
                "data", f"model.{key}", compute_fn=_read_from_data(key), apply_on="instantiate"
            )
        parser.add_lightning_class_args(AdversarialTraining, "adversarial")
        parser.add_lightning_class_args(LayerwiseTraining, "layerwise")
        parser.add_lightning_class_args(DataGrad, "datagrad")
        parser.add_lightning_class_args(RobustEvaluation, "robust_eval")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="checkpoint to resume from"
        )
        _count_before_fraction(parser)

    def _set_seed(self) -> None:
        """``seed_everything``: an int in [0, 2^32 - 1], false, or true for a random seed.

        Lightning 2 seeds ``true`` with 0 (its ``seed_everything(None)``); here it draws one.
        DDP ranks re-run this argv in the launching process's environment and take its seed
        from ``PL_GLOBAL_SEED``, as Lightning's own ``true`` does.
        """
        key = f"{self.subcommand}.seed_everything" if self.subcommand else "seed_everything"
        seed = self.config.get(key)
        if seed is True:
            env = os.environ.get("PL_GLOBAL_SEED")
            seed = int(env) if env is not None else secrets.randbelow(_SEED_MAX + 1)
            self.config[key] = seed
        elif seed is not False and not 0 <= seed <= _SEED_MAX:
            raise ConfigError(
                f"seed_everything {seed} is out of range; valid: an int in [0, {_SEED_MAX}], "
                "true (a random seed) or false (no seeding)"
            )
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        """Give each configured WandbLogger a run id, a save_dir and, if W&B is unreachable, offline."""
        root_dir = self.config.get("trainer.default_root_dir")
        loggers = _wandb_logger_init_args(self.config)
        explicit = os.environ.get("WANDB_RUN_ID") or any(
            a.get("id") or a.get("version") for a in loggers
        )
        resumed = None
        if loggers and not explicit:
            resumed = _resumed_wandb_run(self.config.get("ckpt_path"), root_dir)
        for init_args in loggers:
            _prepare_wandb_logger(init_args, root_dir, resumed)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer; Lightning's error on a bad key also names the value that was given."""
        try:
            return super().instantiate_trainer(**kwargs)
        except _TRAINER_ERRORS as err:
            if not _is_trainer_error(err):
                raise
            trainer = self._get(self.config_init, "trainer", default={})
            raise ConfigError(f"trainer: {_trainer_message(err, trainer)}") from err


# -- W&B ----------------------------------------------------------------------------------------
# Note [one W&B run per process tree]
# `wandb agent` passes the run id in WANDB_RUN_ID; DDP ranks re-run this argv with the launching
# process's environment. The id is fixed in the config before instantiation (and exported, so DDP
# ranks read the same one); only rank 0 starts the W&B run (WandbLogger's rank_zero_experiment) and
# only rank 0 writes to its summary. `main` restores WANDB_RUN_ID / WANDB_MODE when it returns.


_BATCH_LIMITS = tuple(f"trainer.limit_{s}_batches" for s in ("train", "val", "test", "predict"))


def _count_before_fraction(parser: LightningArgumentParser) -> None:
    """Read ``--trainer.limit_*_batches=1`` as one batch, not 100 %.

    Lightning types these ``float | int | None``, so jsonargparse tries float first and turns
    ``1`` into ``1.0``, which Lightning reads as the whole epoch. Trying int first keeps integers
    as counts and ``0.5`` a fraction (the order is jsonargparse's ``_typehint``; left alone if
    that ever changes).
    """
    for action in parser._actions:
        if action.dest in _BATCH_LIMITS and getattr(action, "_typehint", None) == (
            float | int | None
        ):
            action._typehint = int | float | None


def _is_wandb_logger(class_path: object) -> bool:
    """Whether a logger ``class_path`` names WandbLogger or a subclass of it."""
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, WandbLogger)


def _wandb_logger_init_args(config: Namespace) -> list[Namespace]:
    """The ``init_args`` of every WandbLogger in ``trainer.logger`` (a logger or a list of them)."""
    logger = config.get("trainer.logger")
    items = logger if isinstance(logger, list) else [logger]
    return [
        item.init_args
        for item in items
        if isinstance(item, Namespace) and _is_wandb_logger(item.get("class_path"))
    ]


def _new_run_id() -> str:
    """An 8-character id in W&B's alphabet (what ``wandb.util.generate_id`` makes)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _offline_requested(init_args: Namespace) -> bool:
    mode = init_args.get("mode") or ("offline" if init_args.get("offline") else None)
    mode = mode or os.environ.get("WANDB_MODE", "")
    disabled = os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1")
    return disabled or str(mode).lower() in _OFFLINE_MODES


def _wandb_base_url() -> str:
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    import wandb

    return str(wandb.Settings().base_url)


def _has_wandb_credentials(host: str) -> bool:
    """An API key in the environment, an identity token file, or a netrc entry for ``host``."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why a W&B run could not start online (no credentials, server not reachable), or None.

    The reachability check is one TCP connection to the W&B host; behind an HTTP(S) proxy it is
    skipped (a failure of ``wandb.init`` itself still falls back to offline, see `run`).
    """
    url = _wandb_base_url()
    parsed = urlparse(url)
    host = parsed.hostname or url
    if not _has_wandb_credentials(host):
        return f"no W&B API key for {host} (set WANDB_API_KEY or run `wandb login`)"
    return unreachable_reason(url, timeout)


@rank_zero_only
def _warn(message: str) -> None:
    """One line on stderr (rank 0), through logging so that it can be silenced."""
    _log.warning("python -m sn_lightning.fit: warning: %s", message)


# A checkpoint keeps the W&B run id it was saved under (RunDirSaveConfig.on_save_checkpoint), so
# that resuming it continues that run and its folder. WANDB_RUN_ID or an explicit id wins.
_WANDB_RUN_KEY = "wandb_run_id"


def _resumed_wandb_run(ckpt_path: str | None, root_dir: str | None) -> str | None:
    """The W&B run id the checkpoint ``ckpt_path`` was saved under, or None (none recorded)."""
    if ckpt_path is None:
        return None
    check_ckpt_path(ckpt_path)
    if ckpt_path == "last":
        ckpt_path = _last_checkpoint(root_dir or Path.cwd())
    checkpoint = _read_checkpoint(ckpt_path)
    run_id = checkpoint.get(_WANDB_RUN_KEY) if checkpoint else None
    return run_id if isinstance(run_id, str) and run_id else None


def _prepare_wandb_logger(
    init_args: Namespace, root_dir: str | None, resumed: str | None = None
) -> None:
    """Fix the run id and save_dir in the config; switch to offline when W&B is unreachable.

    The id: ``WANDB_RUN_ID``, else the logger's ``id``/``version``, else ``resumed`` (the run a
    resumed checkpoint was saved under), else a new one.
    """
    run_id = os.environ.get("WANDB_RUN_ID") or init_args.get("id") or init_args.get("version")
    run_id = str(run_id or resumed or _new_run_id())
    init_args.id, init_args.version = run_id, None
    os.environ["WANDB_RUN_ID"] = run_id  # Note [one W&B run per process tree]
    if init_args.get("save_dir") in (None, ".") and init_args.get("dir") is None:
        init_args.save_dir = str(root_dir or ".")
    if _offline_requested(init_args):
        return
    reason = wandb_unreachable_reason()
    if reason is None:
        return
    # Explicit: wandb ignores environment changes once it is set up in this process. Lightning
    # refuses log_model with its own offline flag, but wandb's offline mode keeps checkpoint
    # artifacts for `wandb sync`: with log_model only wandb's mode is set.
    init_args.mode = "offline"
    if not init_args.get("log_model"):
        init_args.offline = True
    os.environ["WANDB_MODE"] = "offline"
    _warn(
        f"W&B unreachable: {reason}; this run goes on offline in {init_args.save_dir}/wandb "
        "(upload later with `wandb sync`)"
    )


def _wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _start_wandb(trainer: Trainer, settings: dict[str, Any] | None = None) -> None:
    """Start each W&B run now (rank 0); if ``wandb.init`` fails, go on offline with a warning.

    ``settings`` (:func:`_key_settings`) go into the run's config under dotted keys, the CLI's
    (``model.beta``, ``adversarial.attack.init_args.eps``, ``trainer.max_epochs``,
    ``seed_everything``), as a sweep names them; Lightning adds the model's and data module's
    hyperparameters under their own names.
    """
    loggers = _wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    for logger in loggers:
        try:
            logger.experiment  # noqa: B018  (starts the run; a no-op dummy on ranks other than 0)
        except wandb.errors.Error as err:
            first = " ".join(str(err).split())[:300]
            _warn(f"W&B run could not start ({type(err).__name__}: {first}); going on offline")
            os.environ["WANDB_MODE"] = "offline"
            wandb.teardown()  # a fresh wandb session reads WANDB_MODE again
            logger.experiment  # noqa: B018
        if settings and trainer.is_global_zero:
            logger.experiment.config.update(flatten(settings, sep="."), allow_val_change=True)


def _log_results_to_wandb(trainer: Trainer, results: dict[str, Any], path: Path) -> None:
    """Put results.json into each W&B run: summary ``results/...`` and the file itself (rank 0)."""
    if not trainer.is_global_zero:
        return
    skip = ("settings", "metrics", "path")
    summary = flatten({k: v for k, v in results.items() if k not in skip}, "results")
    for logger in _wandb_loggers(trainer):
        experiment = logger.experiment
        experiment.summary.update(summary)
        experiment.save(str(path), base_path=str(path.parent), policy="now")


def _finish_wandb(trainer: Trainer, exit_code: int) -> None:
    """Close this process's W&B runs so that a next run in the same process starts a new one."""
    if not trainer.is_global_zero:
        return
    for logger in _wandb_loggers(trainer):
        logger.experiment.finish(exit_code=exit_code)  # started by `_start_wandb`


# Set by Lightning's ``seed_everything`` (the CLI's ``seed_everything`` key) and read by
# ``ReseedEachBatch`` and DDP ranks: restored when an entry point returns, so a later
# ``seed_everything: false`` run in the same process is not reseeded from this run's seed.
SEED_ENVIRON = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def _restored_environ(*names: str) -> Iterator[None]:
    """Put the environment variables ``names`` back as they were on entry."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_dir(trainer: Trainer) -> Path:
    """The run's own directory, the same on every rank (call it on all of them).

    CSV/TensorBoard loggers: their ``log_dir`` (``.../version_N``); WandbLogger:
    ``<save_dir>/<project>/<run id>`` (where its checkpoints go); no logger: ``default_root_dir``.
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, WandbLogger):
        path = str(Path(logger.save_dir or ".") / str(logger.name) / str(logger.version))
        return Path(trainer.strategy.broadcast(path))
    return Path(trainer.log_dir or trainer.default_root_dir)


def _keep_nulls_kwarg() -> dict[str, bool]:
    """``parser.save`` keyword that keeps null entries (renamed in jsonargparse 4.49)."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("jsonargparse").split(".")[:2])
    return {"skip_unset": False} if (major, minor) >= (4, 49) else {"skip_none": False}


_KEEP_NULLS = _keep_nulls_kwarg()


class RunDirSaveConfig(SaveConfigCallback):
    """Save config.yaml into `run_dir` (one per run, also under W&B), overwriting a previous copy.

    Checkpoints also keep the W&B run id, so that ``--ckpt_path`` continues the same W&B run.
    """

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: Any, checkpoint: dict[str, Any]
    ) -> None:
        """Record the W&B run id (the first WandbLogger's) in the checkpoint."""
        loggers = _wandb_loggers(trainer)
        if loggers:
            checkpoint[_WANDB_RUN_KEY] = str(loggers[0].version)

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Write the config once, on rank 0, into the run's directory."""
        if self.already_saved:
            return
        directory = run_dir(trainer)  # collective: every rank
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config,
                str(directory / self.config_filename),
                overwrite=True,
                multifile=self.multifile,
                **_KEEP_NULLS,
            )
        self.already_saved = True


def _key_settings(config: Any, trainer: Trainer) -> dict[str, Any]:
    """The resolved settings worth keeping next to the numbers (model, data, seed, trainer basics).

    ``trainer.precision`` is the one that ran: Lightning replaces some (16-mixed on a CPU runs
    bf16-mixed, with a warning).
    """
    as_dict = config.as_dict()
    given = as_dict.get("trainer", {})
    return {
        "seed_everything": as_dict.get("seed_everything"),
        "model": as_dict.get("model"),
        "data": as_dict.get("data"),
        "trainer": {
            **{k: given.get(k) for k in ("max_epochs", "max_steps", "devices", "accelerator")},
            "precision": str(trainer.precision),
        },
        **{k: as_dict.get(k) for k in ("adversarial", "layerwise", "datagrad", "robust_eval")},
    }


def _callback(trainer: Any, kind: type) -> Any:
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


def _adversarial_results(trainer: Any, model: SNClassifier, dm: ImageDataModule) -> dict[str, Any]:
    """Train/val/test accuracy under the training attack and each robust-evaluation attack.

    The adversarial generalization gap (train minus test adversarial accuracy) is the seed paper's
    headline; the training attack is evaluated as the paper did, with the attack it trained on.
    """
    adversarial = _callback(trainer, AdversarialTraining)
    robust = _callback(trainer, RobustEvaluation)
    attacks = {}
    if adversarial is not None and adversarial.attack is not None:
        attacks[f"train_attack/{attack_name(adversarial.attack)}"] = adversarial.attack
    if robust is not None:
        attacks.update(robust.named_attacks())
    cap = robust.final_max_examples if robust is not None else None
    loaders = _split_loaders(dm)
    out: dict[str, Any] = {}
    for name, attack in attacks.items():
        entry: dict[str, Any] = {"attack": repr(attack)}
        for split, loader in loaders.items():
            with attack_precision(trainer):
                entry[split] = evaluate(
                    model, loader(), model.device, attack=attack, max_examples=cap
                )
        entry["gap"] = entry["train"]["acc"] - entry["test"]["acc"]
        out[name] = entry
    return out


def _check_strategy(trainer: Trainer, model: SNClassifier) -> None:
    """Spawned DDP pickles the model; parametrized (spectral-norm) modules cannot be pickled.

    ``sync_batchnorm=true`` makes SyncBatchNorms, which DistributedDataParallel refuses off GPUs.
    """
    from torch.nn.utils import parametrize

    strategy = trainer.strategy
    if (
        getattr(strategy, "_layer_sync", None) is not None
        and strategy.root_device.type == "cpu"
        and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    ):
        raise ConfigError(
            "trainer.sync_batchnorm true needs GPUs (DistributedDataParallel runs torch's "
            "SyncBatchNorm only on CUDA); use --trainer.sync_batchnorm=false on CPU"
        )
    method = getattr(trainer.strategy, "_start_method", None)
    if method in ("spawn", "forkserver") and any(
        parametrize.is_parametrized(m) for m in model.modules()
    ):
        raise ConfigError(
            f"strategy ddp_{method} pickles the model, and spectral-norm (parametrized) layers "
            "cannot be pickled; use --trainer.strategy=ddp"
        )


def _check_training_length(trainer: Trainer, model: SNClassifier) -> None:
    """Counts that would train nothing, forever under a planned schedule, or divide by zero.

    A run that trains nothing would report an untrained model; Lightning divides by
    ``accumulate_grad_batches``, ``check_val_every_n_epoch`` and ``val_check_interval``.
    """
    for key, value, valid in (
        ("accumulate_grad_batches", trainer.accumulate_grad_batches, "a count >= 1"),
        ("check_val_every_n_epoch", trainer.check_val_every_n_epoch, "a count >= 1 or null"),
        ("val_check_interval", trainer.val_check_interval, "a fraction in (0, 1] or a count >= 1"),
    ):
        if value is not None and value <= 0:
            raise ConfigError(f"trainer.{key} {value}: give {valid}")
    unbounded = trainer.max_epochs in (-1, None) and trainer.max_steps == -1
    if unbounded and model.hparams.lr_schedule == "cosine":
        raise ConfigError(
            "model.lr_schedule cosine decays over the whole run, and this run has no end "
            "(trainer.max_epochs -1, or null with max_time, and max_steps -1); give "
            "trainer.max_epochs or trainer.max_steps, or --model.lr_schedule=step or none"
        )
    limit = trainer.limit_train_batches
    for key, value in (
        ("max_epochs", trainer.max_epochs),
        ("max_steps", trainer.max_steps),
        ("limit_train_batches", limit),
    ):
        if value == 0:
            raise ConfigError(
                f"trainer.{key} 0 trains nothing, and the results would be those of an untrained "
                f"model; give it a count >= 1 (or, to evaluate a checkpoint, use "
                f"python -m sn_lightning.evaluate --ckpt_path ...)"
            )


_HALF_WEIGHTS = ("16-true", "bf16-true")  # precisions that cast the weights (Lightning reads
# the legacy "16" and "bf16" as the mixed ones)


def _check_callbacks(cli: SNLightningCLI) -> None:
    """Each of our callbacks' settings against the model and the data (``check_config``)."""
    for callback in cli.trainer.callbacks:
        check = getattr(callback, "check_config", None)
        if callable(check):
            check(cli.model, cli.datamodule)
    claims = [cb for cb in cli.trainer.callbacks if getattr(cb, "claims_objective", False)]
    if len(claims) > 1:  # before the ranks start; set_objective would say it in setup()
        raise objective_conflict(claims)
    robust = _callback(cli.trainer, RobustEvaluation)
    adversarial = _callback(cli.trainer, AdversarialTraining)
    datagrad = _callback(cli.trainer, DataGrad)
    if (
        (robust is not None and robust.attacks)
        or (adversarial is not None and adversarial.attack is not None)
        or (datagrad is not None and datagrad.lam > 0)
    ):
        check_attack_precision(cli.trainer)
    if cli.model.hparams.certify_eps and str(cli.trainer.precision) in _HALF_WEIGHTS:
        raise ConfigError(
            f"model.certify_eps with trainer.precision {cli.trainer.precision!r}: certificates "
            "need float32 margins, and these weights are half precision; use 32-true, "
            "16-mixed or bf16-mixed (certified accuracy is computed in float32 under AMP)"
        )
    _check_monitors(cli, robust, adversarial)
    dm = cli.datamodule
    if robust is not None and robust.attacks and getattr(dm, "val_size", None) == 0:
        _warn(
            "data.val_size is 0 (no validation split), so robust_eval reports no per-epoch "
            "numbers; its final train/test evaluation still runs"
        )


# Lightning callbacks that log no metric (LearningRateMonitor's lr-* names are known)
_SILENT = (
    Checkpoint, EarlyStopping, ProgressBar, ModelSummary, LearningRateMonitor, Timer,
    SaveConfigCallback,
)  # fmt: skip


def _check_monitors(cli: SNLightningCLI, robust: Any, adversarial: Any) -> None:
    """Refuse a ModelCheckpoint/EarlyStopping ``monitor`` the run will not log at every check.

    Lightning finds out after the first validation epoch, with a traceback: a misspelled name,
    ``train/acc`` under adversarial training (it logs ``train/adv_acc``), or a metric logged only
    every few epochs (``robust_eval.every_n_epochs``). EarlyStopping with ``strict=False``
    accepts a missing metric and is left alone.
    """
    names = [n for n in logged_metric_names(cli.config) if n != "final/*"]  # after fit
    callbacks = cli.trainer.callbacks
    if any(isinstance(cb, LearningRateMonitor) for cb in callbacks):
        names.append("lr-*")
    # callbacks that may log metrics of their own (DeviceStatsMonitor, a user's): an unknown
    # name then only warns
    others = [
        type(cb).__name__
        for cb in callbacks
        if not type(cb).__module__.startswith("sn_lightning.") and not isinstance(cb, _SILENT)
    ]
    # robust accuracy: at validation epochs e with (e + 1) % every_n_epochs == 0
    val_every = cli.trainer.check_val_every_n_epoch or 1
    robust_every = robust.every_n_epochs if robust is not None else 1
    start = adversarial.start_epoch if adversarial is not None and adversarial.attack else 0
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if not isinstance(callback, (ModelCheckpoint, EarlyStopping)) or monitor is None:
            continue
        if isinstance(callback, EarlyStopping) and not callback.strict:
            continue
        who = f"trainer.callbacks: {type(callback).__name__} monitors {monitor!r}"
        known = names + (["step"] if isinstance(callback, ModelCheckpoint) else [])
        if isinstance(callback, EarlyStopping):
            known = [n for n in known if n != "epoch"]  # not a callback metric
        if not any(fnmatch.fnmatchcase(monitor, n) for n in known):
            if others:
                _warn(
                    f"{who}, which neither the model nor sn-lightning's callbacks log (they log "
                    f"{', '.join(known)}); fine if {', '.join(others)} logs it"
                )
                continue
            raise ConfigError(f"{who}, which this run does not log; it logs {', '.join(known)}")
        if fnmatch.fnmatchcase(monitor, "val/robust_acc/*") and val_every % robust_every:
            raise ConfigError(
                f"{who}, which is logged every {robust_every} epochs "
                f"(robust_eval.every_n_epochs={robust_every}), and Lightning fails on a "
                "validation without it; set robust_eval.every_n_epochs=1 or monitor val/acc"
            )
        if start > 0 and monitor in ("train/acc", "train/adv_acc"):
            raise ConfigError(
                f"{who}, which is logged only {'before' if monitor == 'train/acc' else 'from'} "
                f"adversarial.start_epoch {start} (train/acc on clean batches, train/adv_acc on "
                "attacked ones); monitor val/acc or train/loss"
            )


def _check_unversioned_run_dir(cli: SNLightningCLI) -> None:
    """Refuse to overwrite another run's results.json when no logger gives runs their own folder.

    Loggers write each run into a new ``version_N`` (or W&B run) folder; with
    ``trainer.logger=false`` results.json and config.yaml go into ``default_root_dir`` itself.
    A resumed run (``ckpt_path``) continues its own, so it may. Only the launching process
    checks: DDP ranks started later would find the config.yaml that rank 0 has just written.
    """
    if cli.trainer.loggers or cli.config.ckpt_path is not None or rank_zero_only.rank != 0:
        return
    root = Path(cli.trainer.default_root_dir)
    taken = [name for name in (RESULTS_FILE, "config.yaml") if (root / name).exists()]
    if taken:
        raise ConfigError(
            f"trainer.logger=false writes results.json and config.yaml into "
            f"trainer.default_root_dir {str(root)!r}, which holds another run's "
            f"{' and '.join(taken)}; set another --trainer.default_root_dir, or keep a logger "
            "(each run then gets its own version_N folder)"
        )


def check_run(cli: SNLightningCLI) -> None:
    """The checks that need the built trainer and model, before anything starts.

    Once per cli: ``main`` checks before releasing the run lock and :func:`run` again, so each
    warning shows once.
    """
    if getattr(cli, "_sn_run_checked", False):
        return
    _check_strategy(cli.trainer, cli.model)
    _check_training_length(cli.trainer, cli.model)
    clip = cli.trainer.gradient_clip_val
    if clip is not None and not (math.isfinite(clip) and clip >= 0):  # Lightning skips < 0
        raise ConfigError(
            f"trainer.gradient_clip_val must be a finite number >= 0 (0 or null: no clipping), "
            f"got {clip!r}"
        )
    check_ckpt_path(cli.config.ckpt_path)
    _check_unversioned_run_dir(cli)
    if cli.config.ckpt_path == "last":
        cli.config.ckpt_path = _last_checkpoint(cli.trainer.default_root_dir)
    checkpoint = _read_checkpoint(cli.config.ckpt_path)
    _check_data(cli, checkpoint)
    _check_callbacks(cli)
    if checkpoint is not None:
        why = state_dict_mismatch(cli.model, checkpoint.get("state_dict"))
        if why is not None:
            raise ConfigError(
                f"checkpoint {cli.config.ckpt_path} does not fit the model built from this config "
                f"(resume with the training run's config.yaml): {why}"
            )
        changed = settings_mismatch(cli.model, cli.datamodule, checkpoint)
        if changed:
            _warn(
                f"resuming {cli.config.ckpt_path} with other settings than it was trained with: "
                f"{', '.join(changed)}; the run goes on with this config's"
            )
    cli._sn_run_checked = True


# Model settings that change neither the function a checkpoint computes nor the images it is
# evaluated on: the optimizer, the schedule, the training losses, speed switches and logging.
_TRAINING_ONLY_MODEL_KEYS = frozenset(
    {
        "optimizer", "lr", "momentum", "nesterov", "weight_decay", "lr_schedule",
        "lr_step_epochs", "lr_gamma", "label_smoothing", "pretrained", "sn_init_iterations",
        "sn_cuda_graph", "sn_batch_fold", "sn_refresh_iterations", "sn_bound_every_n_epochs",
        "crm_lambda", "crm_r0", "crm_t", "crm_start_epoch", "lip_n_iter", "certify_eps",
    }
)  # fmt: skip


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (a YAML round trip turns one into the other)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def settings_mismatch(
    model: torch.nn.Module, datamodule: object, checkpoint: dict[str, Any]
) -> list[str]:
    """The settings this config changes against a checkpoint's, as ``model.beta 2.0 (this config: 1.0)``.

    Model keys that define the evaluated function (backbone, normalization, beta and the SN
    options that act in eval mode, ...), every model key but ``_TRAINING_ONLY_MODEL_KEYS``; data
    keys that decide the test images (``dataset``, ``image_size``, and with ``val_source: test``
    the draw: ``val_size``, ``seed``). Keys missing on either side are not compared.
    """
    changed = []
    theirs = checkpoint.get("hyper_parameters")
    ours = getattr(model, "hparams", {})
    if isinstance(theirs, dict):
        for key, value in ours.items():
            if key.startswith("_") or key in _TRAINING_ONLY_MODEL_KEYS or key not in theirs:
                continue
            if _plain(theirs[key]) != _plain(value):
                changed.append(f"model.{key} {theirs[key]!r} (this config: {value!r})")
    theirs = checkpoint.get("datamodule_hyper_parameters")
    ours = getattr(datamodule, "hparams", {})
    if isinstance(theirs, dict):
        keys = ["dataset", "image_size"]
        if "test" in (theirs.get("val_source"), ours.get("val_source")):
            keys += ["val_source", "val_size", "seed"]
        for key in keys:
            if key in theirs and key in ours and _plain(theirs[key]) != _plain(ours[key]):
                changed.append(f"data.{key} {theirs[key]!r} (this config: {ours[key]!r})")
    return changed


def state_dict_mismatch(model: torch.nn.Module, state_dict: object) -> str | None:
    """Why ``state_dict`` does not load strictly into ``model`` (keys, shapes), or None if it does.

    Compares without loading anything; a spectral-norm difference is named as such.
    """
    if not isinstance(state_dict, dict):
        return "it has no 'state_dict' (not a Lightning checkpoint)"
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        sn_in = [k for k in unexpected if ".parametrizations." in k]
        sn_out = [k for k in missing if ".parametrizations." in k]
        why = ""
        if sn_in and not sn_out:
            why = "the checkpoint's model has spectral normalization and this config's has not "
        elif sn_out and not sn_in:
            why = "this config adds spectral normalization the checkpoint's model has not "
        why += "(model.beta, model.sn_*); " if why else ""
        return (
            f"{why}{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}"
        )
    for key, value in own.items():
        theirs = state_dict[key]
        if isinstance(theirs, torch.Tensor) and theirs.shape != value.shape:
            return f"{key} has shape {tuple(theirs.shape)} there and {tuple(value.shape)} here"
    return None


_SPLIT_KEYS = ("dataset", "seed", "val_size", "val_source")  # what the validation split is


def _check_data(cli: SNLightningCLI, checkpoint: dict[str, Any] | None) -> None:
    """The data against a checkpoint's (same split and position) and batch_size, before it runs.

    Skipped where the files are still to be downloaded (Lightning's ``prepare_data``, rank 0
    only): the data module then raises the same errors inside the fit.
    """
    dm = cli.datamodule
    if not isinstance(dm, ImageDataModule):
        return
    saved = checkpoint.get("datamodule_hyper_parameters") if checkpoint is not None else None
    if isinstance(saved, dict):
        keys = _SPLIT_KEYS if saved.get("val_size") or dm.hparams["val_size"] else ("dataset",)
        changed = [
            f"data.{k} {saved[k]!r} (this run: {dm.hparams[k]!r})"
            for k in keys
            if k in saved and k in dm.hparams and saved[k] != dm.hparams[k]
        ]
        if changed:
            raise ConfigError(
                f"the checkpoint was trained with another split: {', '.join(changed)}; a "
                "resumed run would mix training and held-out images (resume with the training "
                "run's config.yaml)"
            )
    if not dm.files_present():
        return
    state = checkpoint.get(type(dm).__qualname__) if checkpoint is not None else None
    dm.check_fit(cli.trainer.world_size, state if isinstance(state, dict) else None)


def _read_checkpoint(ckpt_path: str | None) -> dict[str, Any] | None:
    """A local checkpoint file's contents, or None (no path, or one of Lightning's keywords / URLs).

    Loaded as Lightning will load it (torch's default ``weights_only``), memory-mapped where the
    file allows (tensors are read only where compared).

    Raises:
        ConfigError: the file is not a checkpoint torch can load.
    """
    if ckpt_path is None or not Path(ckpt_path).expanduser().is_file():
        return None
    path = Path(ckpt_path).expanduser()
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True)
        except RuntimeError as err:  # a legacy (not zip) file cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu")
    except (
        RuntimeError,
        OSError,
        EOFError,
        pickle.UnpicklingError,
        KeyError,  # a text file read as a legacy pickle: a byte as a persistent id
        IndexError,  # ... or an opcode on an empty stack (e.g. a metrics.csv)
        ValueError,
    ) as err:
        # torch's messages are a page of advice; the cause is one sentence of it
        text = str(err)
        if "WeightsUnpickler error:" in text:
            detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
            cause = f"weights-only unpickler: {detail[0] if detail else 'refused'}"
        elif isinstance(err, (KeyError, IndexError, ValueError)):
            cause = "not a file torch.save writes"  # the unpickler chokes on a text file
        else:
            cause = first_line(err).split(". ")[0]
        raise ConfigError(
            f"ckpt_path {ckpt_path!r} is not a checkpoint that torch.load reads as Lightning "
            f"loads it ({cause})"
        ) from err
    return checkpoint if isinstance(checkpoint, dict) else {}


def run(cli: SNLightningCLI) -> dict[str, Any]:
    """Fit, then evaluate on the full train / val / test splits; write results.json (rank 0).

    results.json goes into `run_dir`; with W&B also into the run (summary ``results/...``), and
    the W&B run is finished when this returns.
    """
    trainer = cli.trainer
    check_run(cli)
    _start_wandb(trainer, _key_settings(cli.config, trainer))
    try:
        results = _fit_and_evaluate(cli)
    except BaseException:
        _finish_wandb(trainer, exit_code=1)
        raise
    _finish_wandb(trainer, exit_code=0)
    return results


def _split_loaders(dm: ImageDataModule) -> dict[str, Callable[[], Any]]:
    """``{split: () -> its whole DataLoader}`` for train (unaugmented), val (if any) and test."""
    splits = ("train", "val", "test") if dm.val_set is not None else ("train", "test")
    return {split: functools.partial(dm.split_dataloader, split) for split in splits}


def _leave_process_group() -> None:
    """Destroy the process group on every rank after its last collective.

    Lightning destroys it at exit only for NCCL. A gloo group left alive has a C++ thread that can
    free a finished work object while the interpreter shuts down, which aborts the process
    ("terminate called without an active exception"); Lightning then killed rank 0 before it
    wrote results.json (about 1 run in 45 on 2 CPU ranks; a standalone gloo repro aborted in 5 of
    12 exits without this and in 0 of 12 with it).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _fit_and_evaluate(cli: SNLightningCLI) -> dict[str, Any]:
    start = time.perf_counter()
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    if getattr(trainer.strategy, "_start_method", None) == "fork":
        # ddp_fork / ddp_notebook train in forked children; each logger's version (its run
        # folder) is fixed here first, or the children write version_0 and this process, which
        # evaluates afterwards, a fresh version_1
        for logger in trainer.loggers:
            logger.version  # noqa: B018
    trainer.fit(model, datamodule=dm, ckpt_path=cli.config.ckpt_path)
    train_time = time.perf_counter() - start
    # run_dir broadcasts under DDP: every rank must ask, before the others return.
    log_dir = run_dir(trainer)
    _leave_process_group()  # the last collective; rank 0 evaluates alone from here
    if not trainer.is_global_zero:
        return {}
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    dm.setup("test")
    # Lightning's teardown moved the module to the CPU; evaluate where it trained (GPU runs
    # would otherwise attack every split on the CPU).
    device = trainer.strategy.root_device
    model.to(device)
    model.refresh_spectral_norm()  # a no-op unless training stopped after the last epoch end
    results: dict[str, Any] = {"train": evaluate(model, dm.split_dataloader("train"), device)}
    if dm.val_set is not None:
        results["val"] = evaluate(model, dm.split_dataloader("val"), device)
    results["test"] = evaluate(model, dm.split_dataloader("test"), device)
    results["gap"] = results["train"]["acc"] - results["test"]["acc"]
    results["adversarial"] = _adversarial_results(trainer, model, dm)
    if model.hparams.certify_eps:
        results["certified"] = _certified_results(model, dm)
    results.update(_final_extras(model))
    results["settings"] = _key_settings(cli.config, trainer)
    results["train_time_s"] = train_time
    results["wall_time_s"] = time.perf_counter() - start
    summary = {
        f"final/{split}_acc": results[split]["acc"]
        for split in ("train", "val", "test")
        if split in results
    }
    summary["final/gap"] = results["gap"]
    for name, entry in results["adversarial"].items():
        # the training attack under one key in every run: its name holds the radius resolved
        # from the data (pgd15_l2_0.809285), so an eps grid would scatter it over columns
        key = "train_attack" if name.startswith("train_attack/") else name
        summary[f"final/{key}/test_acc"] = entry["test"]["acc"]
        summary[f"final/{key}/gap"] = entry["gap"]
    for logger in trainer.loggers:
        logger.log_metrics(summary, step=trainer.global_step)
        logger.save()  # the fit has ended, so nothing else flushes a CSV/TensorBoard logger now
    # The last logged value of every metric (what a W&B sweep reads from the run summary).
    results["metrics"] = {**logged, **summary}
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    _log_results_to_wandb(trainer, results, path)
    results["path"] = str(path)
    lines = [
        f"train acc {results['train']['acc']:.4f}  test acc {results['test']['acc']:.4f}  gap {results['gap']:+.4f}"
    ]
    for name, entry in results["adversarial"].items():
        lines.append(
            f"{name}: train adv acc {entry['train']['acc']:.4f}  test adv acc {entry['test']['acc']:.4f}  "
            f"gap {entry['gap']:+.4f}"
        )
    for eps, entry in results.get("certified", {}).get("eps", {}).items():
        lines.append(
            f"certified (l2, eps {eps}): train {entry['train']:.4f}  test {entry['test']:.4f}"
        )
    if results.get("lipschitz_bound") is not None:
        lines.append(
            f"Lipschitz bound (l2, sound, product of layer bounds): {results['lipschitz_bound']:.4g}"
        )
    else:  # said, not left out: a missing line reads as "not computed" rather than "not sound"
        reason = results.get("spectral", {}).get("reason") or "not computed"
        lines.append(f"Lipschitz bound: none, no sound bound for this network ({reason})")
    if "certified" in results:
        lines.append(
            f"LipLT bound (l2, sound, used for the certificates): "
            f"{results['certified']['lipschitz_liplt']:.4g}"
        )
    sys.stdout.write("\n".join([*lines, f"results: {path}"]) + "\n")
    return results


def _certified_results(model: SNClassifier, dm: ImageDataModule) -> dict[str, Any]:
    """Certified accuracy (l2, pairwise LipLT rule) per eps on train/val/test, and the bounds."""
    import torch

    from sn_lightning.lipschitz import liplt_bound, naive_bound

    shape = tuple(model.hparams.input_shape)
    L = model.certified_lipschitz().to(model.device)
    with torch.no_grad():
        out: dict[str, Any] = {
            "rule": "pairwise LipLT, sound (converged iterations + guaranteed upper bounds)",
            "lipschitz_naive": naive_bound(model.model, shape),
            "lipschitz_liplt": float(liplt_bound(model.model, shape, certify=True)),
        }
    out["eps"] = certified_accuracy_by_split(model, dm, L, model.hparams.certify_eps)
    return out


def certified_accuracy_by_split(
    model: SNClassifier, dm: ImageDataModule, L_pairwise: Any, eps: Sequence[float]
) -> dict[str, dict[str, float]]:
    """``{f"{e:g}": {split: certified accuracy}}`` on train/val/test (eval mode, l2 radii).

    Args:
        model: the classifier (its device is used).
        dm: the set-up data module.
        L_pairwise: ``(C, C)`` sound bounds on ``Lip(f_p - f_q)`` (see ``certified_radius``).
        eps: radii in pixel units.
    """
    import torch

    from sn_lightning.lipschitz import certified_logits, certified_radius

    loaders = _split_loaders(dm)
    out: dict[str, dict[str, float]] = {f"{e:g}": {} for e in eps}
    model.eval()
    for split, loader in loaders.items():
        radii = []
        for x, y in loader():
            logits = certified_logits(model, x)  # the model's dtype (64-true), TF32 off
            radii.append(certified_radius(logits, y.to(logits.device), L_pairwise).cpu())
        r = torch.cat(radii)
        for e in eps:
            out[f"{e:g}"][split] = float((r > e).float().mean())
    return out


def _final_extras(model: SNClassifier) -> dict[str, Any]:
    """The spectral-norm report (per layer σ, upper bound, β) and the network Lipschitz bound."""
    from sn_lightning.spectral import spectral_norm_report

    report = spectral_norm_report(
        model.model, n_iter=100, input_shape=tuple(model.hparams.input_shape)
    )
    return {"lipschitz_bound": report.lipschitz_bound, "spectral": report.as_dict()}


_SUBCOMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's, which this CLI has not


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the results dict (empty on ranks other than 0)."""
    prog = "python -m sn_lightning.fit"
    with (
        quiet_lightning(prog),
        one_line_errors(prog),
        _restored_environ("WANDB_RUN_ID", "WANDB_MODE", *SEED_ENVIRON),
    ):
        argv = sys.argv[1:] if args is None else args
        if not argv:  # not 1000 epochs of defaults into .
            raise ConfigError(
                "nothing to run: pass a config, e.g. --config configs/quickstart.yaml, and keys "
                "such as --model.beta=1.0 (--help lists them)"
            )
        if argv[0] in _SUBCOMMANDS:
            raise ConfigError(
                f"{prog} takes no subcommand ({argv[0]!r}): it trains, then evaluates the "
                f"final model and writes results.json; run {prog} --config ... (without "
                f"{argv[0]!r}), and python -m sn_lightning.evaluate --config ... --ckpt_path ... "
                "to evaluate a checkpoint"
            )
        with held_startup_lines() as release:
            cli = build_cli(
                SNLightningCLI,
                model_class=SNClassifier,
                datamodule_class=ImageDataModule,
                run=False,
                args=args,
                parser_class=_OneLineErrorParser,
                save_config_callback=RunDirSaveConfig,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": prog, "description": DESCRIPTION},
                auto_configure_optimizers=False,
                seed_everything_default=0,
            )
            check_run(cli)
            release()
        return run(cli)


if __name__ == "__main__":
    main()
