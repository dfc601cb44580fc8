"""Config keys: nested settings as flat keys, and "unknown key" messages with suggestions (no Lightning)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"model": {"beta": 1}}`` -> ``{"model/beta": 1}`` (after ``prefix``); lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


@dataclass
class KeyIndex:
    """The config keys of a command, for 'unknown key' messages with suggestions."""

    leaves: set[str]
    children: dict[str, set[str]]

    @classmethod
    def from_config(cls, config: Any) -> KeyIndex:
        """Index the flattened keys (long and ``init_args``-less short forms) of a parsed config."""
        leaves: set[str] = set()
        for key in vars(config.as_flat()):
            leaves.add(key)
            leaves.add(key.replace(".init_args.", "."))
        children: dict[str, set[str]] = {}
        for key in leaves:
            parts = key.split(".")
            for depth in range(len(parts)):
                children.setdefault(".".join(parts[:depth]), set()).add(parts[depth])
        return cls(leaves, children)

    def knows(self, key: str) -> bool:
        """A leaf key or a section (``model``, ``adversarial.attack``)."""
        return key in self.leaves or key in self.children

    def explain(self, key: str) -> str:
        """``did you mean ...? keys under 'section': ...``."""
        close = difflib.get_close_matches(key, sorted(self.leaves), n=3, cutoff=0.85)
        parts = key.split(".")
        section = next(
            ".".join(parts[:d])
            for d in range(len(parts) - 1, -1, -1)
            if ".".join(parts[:d]) in self.children
        )
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        names = ", ".join(sorted(self.children[section]))
        return f"{hint}keys under {section or 'the top level'!r}: {names}"
