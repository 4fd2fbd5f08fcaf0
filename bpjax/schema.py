"""Declared settings: a default, a type, a valid range and a line of help, checked in one place.

Strategies declare their settings with these (``parallel.*``), and `bpjax.config` declares every other
key of the schema the same way, so that one function validates any value and one generator writes the
configuration reference (``docs/configuration.md``) with the ranges.

    STALENESS = Int(0, "gradient delay tau (or its bound with random_staleness)", min=0, note="0 is dp")
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

from bpjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Setting:
    """One config value: its default (whose Python type is the value's type), its range and help."""

    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # the range excludes ``min``
    max_open: bool = False
    choices: tuple = ()
    note: str = ""  # said after a range error, e.g. "0 is synchronous dp"
    item: str = ""  # tuples: "int" or "str", the type of each entry; ranges then apply to each entry

    @property
    def kind(self) -> str:
        if self.choices:
            return "choice"
        if self.item == "dict":
            return "dict of whole number -> number"
        if isinstance(self.default, tuple):
            return f"tuple of {self.item or 'values'}"
        return type(self.default).__name__

    def range_text(self) -> str:
        """The valid values, as the docs and the errors say them: ">= 1", "in (0, 1)", "one of a, b"."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            return f"in {'(' if self.min_open else '['}{_num(lo)}, {_num(hi)}{')' if self.max_open else ']'}"
        if lo is not None:
            return f"{'>' if self.min_open else '>='} {_num(lo)}"
        if hi is not None:
            return f"{'<' if self.max_open else '<='} {_num(hi)}"
        return ""

    def check(self, key: str, value: Any) -> None:
        """Raise a one-line `UserError` naming the valid range when ``value`` is outside it."""
        if self.choices:
            if value not in self.choices:
                match = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1, cutoff=0.5)
                hint = f"did you mean {match[0]!r}?" if match else f"choose {self.range_text()}"
                raise UserError(f"{key}={value!r} is not known; {hint}")
            return
        if self.item == "dict":
            value = value.to_dict() if hasattr(value, "to_dict") else value  # a ConfigDict section
            if not isinstance(value, Mapping):
                raise UserError(f"{key}={value!r} must be a dict like {{3: 4.0}}{self._note()}")
            for k, v in value.items():
                if not isinstance(k, int) or isinstance(k, bool):
                    raise UserError(f"{key}: key {k!r} must be a whole number{self._note()}")
                if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                    raise UserError(f"{key}[{k}]={v!r} must be a finite number{self._note()}")
                if not self._in_range(v):
                    raise UserError(f"{key}[{k}]={v!r} must be {self.range_text()}{self._note()}")
            return
        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            where = f"{key}[{i}]" if isinstance(value, tuple) else key
            if self.item == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                raise UserError(f"{where}={v!r} must be a whole number{self._note()}")
            if self.item == "str" and not isinstance(v, str):
                raise UserError(f"{where}={v!r} must be a name in quotes{self._note()}")
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{where}={v!r} must be a finite number{self._note()}")
            if isinstance(v, int | float) and not isinstance(v, bool) and not self._in_range(v):
                raise UserError(f"{where}={v!r} must be {self.range_text()}{self._note()}")

    def _in_range(self, v: float) -> bool:
        if self.min is not None and (v < self.min or (self.min_open and v == self.min)):
            return False
        return not (self.max is not None and (v > self.max or (self.max_open and v == self.max)))

    def _note(self) -> str:
        return f" ({self.note})" if self.note else ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def Int(default: int, help: str, *, min=None, max=None, note: str = "") -> Setting:  # noqa: N802
    return Setting(int(default), help, min=min, max=max, note=note)


def Float(  # noqa: N802
    default: float, help: str, *, min=None, max=None, min_open=False, max_open=False, note: str = ""
) -> Setting:
    return Setting(float(default), help, min=min, max=max, min_open=min_open, max_open=max_open, note=note)


def Bool(default: bool, help: str) -> Setting:  # noqa: N802
    return Setting(bool(default), help)


def Choice(default: str, choices: tuple[str, ...], help: str) -> Setting:  # noqa: N802
    assert default in choices, (default, choices)
    return Setting(default, help, choices=tuple(choices))


def Str(default: str, help: str) -> Setting:  # noqa: N802
    return Setting(str(default), help)


def Ints(default: tuple[int, ...], help: str, *, min=None, note: str = "") -> Setting:  # noqa: N802
    """A tuple of whole numbers, each at least ``min``."""
    return Setting(tuple(default), help, min=min, note=note, item="int")


def Names(default: tuple[str, ...], help: str, *, note: str = "") -> Setting:  # noqa: N802
    """A tuple of names (e.g. layers)."""
    return Setting(tuple(default), help, note=note, item="str")


def Dict(default: dict, help: str, *, min=None, note: str = "") -> Setting:  # noqa: N802
    """A dict of whole number -> number (e.g. worker -> slowdown), each number at least ``min``. Set
    whole, in an experiment file or with ``--set KEY="{3: 4.0}"``."""
    return Setting(dict(default), help, min=min, note=note, item="dict")
