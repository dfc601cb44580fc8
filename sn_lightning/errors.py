"""Bad user input: one error type and one warning type, which the CLI prints as one line each.

``ConfigError``: the run cannot start (no traceback). ``ConfigWarning``: a valid setting that has
no effect in this run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


class ConfigError(ValueError):
    """Bad user input (a name, a path, a value) found before training starts."""


class ConfigWarning(UserWarning):
    """A valid setting that has no effect (or only part of it) in this run, found before training."""


class MissingDataError(ConfigError):
    """A dataset's folder or files are not on this machine (a fact of the machine, not the config).

    ``assumed``: what a check made without the data took in their place (e.g. a class count).
    """

    assumed: str | None = None


def choices_hint(value: str, choices: Iterable[str], *, limit: int = 12) -> str:
    """A short 'valid choices' phrase: close matches to `value` first, then the rest, truncated."""
    import difflib

    choices = sorted(set(choices))
    close = difflib.get_close_matches(value, choices, n=5, cutoff=0.6)
    if close:
        return f"did you mean {', '.join(close)}?"
    shown = ", ".join(choices[:limit])
    more = f", ... ({len(choices)} in all)" if len(choices) > limit else ""
    return f"valid choices: {shown}{more}"


def first_line(err: BaseException, limit: int = 300) -> str:
    """``err``'s message as one line (its first non-empty line, truncated), for wrapped errors."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_radii(key: str, radii: Sequence[float], null: str) -> None:
    """Refuse a radius list that is empty, has a radius not finite and > 0, or one given twice.

    Results are keyed by ``f"{eps:g}"``, so two radii that print alike would share one entry.
    ``null``: what null means for ``key`` (the error says so for an empty list).
    """
    if len(radii) == 0:
        raise ConfigError(
            f"{key} [] names no radius; give radii such as [0.1, 0.25], or null ({null})"
        )
    if not all(0 < e < math.inf for e in radii):
        raise ConfigError(f"{key} must all be finite and > 0, got {list(radii)}")
    names = [f"{e:g}" for e in radii]
    twice = sorted({n for n in names if names.count(n) > 1}, key=names.index)
    if twice:
        raise ConfigError(
            f"{key} {list(radii)} gives radius {', '.join(twice)} more than once (results are "
            "keyed by radius); give each radius once"
        )
