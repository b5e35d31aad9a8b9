"""Tiny converters from INI strings to typed values.

Each converter raises ``ValueError`` whose text says what was expected; the topology
loader adds the file, section, key and value. Class options are converted by the
annotations of the stage class's ``__init__`` (``converter_for``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
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
    try:
        return float(text.strip())
    except ValueError:
        msg = "expected a number"
        raise ValueError(msg) from None


def string(text: str) -> str:
    return text.strip()


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        msg = "expected an integer >= 1"
        raise ValueError(msg)
    return value


def non_negative(text: str) -> float:
    value = number(text)
    if not value >= 0:  # also rejects nan
        msg = "expected a number >= 0"
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


def converter_for(annotation: Any) -> Converter:
    """A converter for a type annotation; ``TypeError`` if the type is not supported."""
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
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")
