"""Bad user input: one error type and one warning type, which the CLI prints as one line each.

``ConfigError``: the run cannot start (no traceback). ``ConfigWarning``: a valid setting that has
no effect in this run.
"""

from __future__ import annotations

from collections.abc import Iterable


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
