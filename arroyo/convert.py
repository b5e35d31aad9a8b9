"""Tiny converters from INI strings to typed values.

Each converter raises ``ValueError`` whose text says what was expected; the topology
loader adds the file, section, key and value. Class options are converted by the
annotations of the stage class's ``__init__`` (``converter_for``).

A class declares more about an option in the same annotation, with ``Annotated``::

    rate_hz: Annotated[float, Bounds(ge=0)] = 0.0          # 0 or more, finite
    timeout: Annotated[float, Bounds(gt=0, inf=True)] = 5  # "inf" allowed
    endpoint: Annotated[str, Binds("bind")] = "tcp://*:5555"  # bound when bind = true

A ``float`` is always finite and never NaN unless its ``Bounds`` allow ``inf``.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Converter = Callable[[str], Any]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    msg = "expected a boolean (true/false, yes/no, on/off, 1/0)"
    raise ValueError(msg)


def integer(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""), 0)
    except ValueError:
        msg = "expected an integer"
        raise ValueError(msg) from None


def number(text: str) -> float:
    """A finite number: NaN and infinities mean nothing in a configuration."""
    value = any_number(text)
    if not math.isfinite(value):
        msg = "expected a finite number"
        raise ValueError(msg)
    return value


def any_number(text: str) -> float:
    """A number, ``inf`` included (never NaN)."""
    try:
        value = float(text.strip())
    except ValueError:
        msg = "expected a number"
        raise ValueError(msg) from None
    if math.isnan(value):
        msg = "expected a number, not NaN"
        raise ValueError(msg)
    return value


def string(text: str) -> str:
    return text.strip()


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        msg = "expected an integer >= 1"
        raise ValueError(msg)
    return value


def non_negative(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        msg = "expected a number"
        raise ValueError(msg) from None
    if not value >= 0:  # also rejects nan
        msg = "expected a number >= 0"
        raise ValueError(msg)
    if math.isinf(value):
        msg = "expected a finite number >= 0"
        raise ValueError(msg)
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        msg = "expected an integer >= 0"
        raise ValueError(msg)
    return value


def split_list(text: str) -> list[str]:
    """``a, b c`` -> ``["a", "b", "c"]``: commas or whitespace separate items."""
    return [item for item in text.replace(",", " ").split() if item]


def _sequence(item: Converter, kind: type, fixed: int | None) -> Converter:
    def convert(text: str) -> Any:
        items = split_list(text)
        if fixed is not None and len(items) != fixed:
            msg = f"expected {fixed} comma-separated values"
            raise ValueError(msg)
        return kind(item(i) for i in items)

    return convert


def _literal(choices: tuple[Any, ...]) -> Converter:
    def convert(text: str) -> Any:
        for choice in choices:
            if str(choice) == text.strip():
                return choice
        msg = "expected one of " + ", ".join(repr(c) for c in choices)
        raise ValueError(msg)

    return convert


def _optional(inner: Converter) -> Converter:
    def convert(text: str) -> Any:
        if text.strip().lower() in {"", "none"}:
            return None
        return inner(text)

    return convert


_SIMPLE: dict[Any, Converter] = {
    int: integer,
    float: number,
    bool: boolean,
    str: string,
    Path: lambda text: Path(text.strip()).expanduser(),
    Any: string,
}


@dataclass(frozen=True)
class Bounds:
    """Limits of a number option: ``ge``/``gt`` below, ``le``/``lt`` above; ``inf``
    lets the value be infinite (``inf`` or ``-inf`` in the INI), within the limits."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    inf: bool = False

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` naming the limit ``value`` (or an item of it) breaks."""
        if isinstance(value, tuple | list):
            for item in value:
                self.check(item)
            return
        for limit, ok, word in (
            (self.ge, lambda v, x: v >= x, ">="),
            (self.gt, lambda v, x: v > x, ">"),
            (self.le, lambda v, x: v <= x, "<="),
            (self.lt, lambda v, x: v < x, "<"),
        ):
            if limit is not None and value is not None and not ok(value, limit):
                msg = f"expected a value {word} {_plain(limit)}"
                raise ValueError(msg)


@dataclass(frozen=True)
class Binds:
    """Marks a string option as an endpoint the stage binds (``tcp://...``, ``ipc://...``),
    so ``arroyo check`` can refuse two stages binding the same one. ``when`` names a
    boolean option that must be true for the stage to bind (empty: it always binds)."""

    when: str = ""


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _bounded(inner: Converter, bounds: Bounds) -> Converter:
    def convert(text: str) -> Any:
        value = inner(text)
        bounds.check(value)
        return value

    return convert


def markers(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """``Annotated[T, *extras]`` -> ``(T, extras)``; any other annotation -> ``(it, ())``."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, tuple(extras)
    return annotation, ()


def converter_for(annotation: Any) -> Converter:
    """A converter for a type annotation; ``TypeError`` if the type is not supported."""
    annotation, extras = markers(annotation)
    bounds = next((x for x in extras if isinstance(x, Bounds)), None)
    if bounds is None:
        return _converter_for(annotation)
    inner = any_number if annotation is float and bounds.inf else _converter_for(annotation)
    return _bounded(inner, bounds)


def _converter_for(annotation: Any) -> Converter:
    if annotation in _SIMPLE:
        return _SIMPLE[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return _literal(args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _optional(converter_for(rest[0]))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _sequence(converter_for(args[0]), tuple, None)
        if args and all(a == args[0] for a in args):
            return _sequence(converter_for(args[0]), tuple, len(args))
        if not args:
            return _sequence(string, tuple, None)
    if origin is list or annotation is list:
        return _sequence(converter_for(args[0]) if args else string, list, None)
    msg = f"option type {annotation!r} cannot be set from an INI file"
    raise TypeError(msg)


def describe(annotation: Any) -> str:
    """Readable name of an annotation for error messages."""
    annotation, _ = markers(annotation)
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
