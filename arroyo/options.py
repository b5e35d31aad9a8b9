"""A stage class's options: import ``module:Class``, read its ``__init__`` signature,
convert the INI strings by its annotations (see ``arroyo.convert``)."""

from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any

from arroyo import convert


def import_class(path: str) -> type:
    """``module:Class`` -> the class; ``ImportError``/``AttributeError`` with a clear text."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        msg = "expected module:Class"
        raise ImportError(msg)
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        msg = f"{path} is not a class"
        raise ImportError(msg)
    return obj


def class_options(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """The ``__init__`` parameters of a stage class, their hints, and whether it takes **kwargs."""
    init = cls.__init__  # type: ignore[misc]
    if init is object.__init__:
        return {}, {}, False
    params = dict(inspect.signature(init).parameters)
    params.pop("self", None)
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except Exception:  # unresolvable forward references: treat as strings
        hints = {}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    params = {
        n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return params, hints, var_kw


def convert_options(cls: type, raw: dict[str, str], report: Any) -> dict[str, Any]:
    """Convert raw INI options by ``cls.__init__`` annotations; ``report(key, value, text)``."""
    params, hints, var_kw = class_options(cls)
    options: dict[str, Any] = {}
    for key, value in raw.items():
        param = params.get(key)
        if param is None:
            if var_kw:
                options[key] = value
            else:
                names = ", ".join(params) or "none"
                report(key, value, f"unknown key (options of {cls.__name__}: {names})")
            continue
        annotation = hints.get(key, str)
        try:
            options[key] = convert.converter_for(annotation)(value)
        except TypeError as e:
            report(key, value, str(e))
        except ValueError as e:
            report(key, value, f"{e} ({convert.describe(annotation)})")
        else:
            problem = _invalid(annotation, options[key])
            if problem:
                report(key, value, problem)
    for name, param in params.items():
        if param.default is inspect.Parameter.empty and name not in raw:
            report(name, None, f"missing option required by {cls.__name__}")
    return options


def _invalid(annotation: Any, value: Any) -> str | None:
    """What ``validate(value)`` of an ``Annotated`` extra says is wrong with ``value``
    (the ``ValueError``'s text), or None. Such an extra is a class's own check of an
    option that a type cannot express, e.g. ``arroyo.io.codecs.CodecName``."""
    for extra in convert.markers(annotation)[1]:
        validate = getattr(extra, "validate", None)
        if callable(validate):
            try:
                validate(value)
            except ValueError as e:
                return str(e)
    return None


def bound_endpoints(cls: type, options: dict[str, Any]) -> list[tuple[str, str]]:
    """``(key, endpoint)`` for each option of ``cls`` marked ``Binds`` that the stage will
    bind with these ``options`` (defaults filled in from the signature)."""
    params, hints, _ = class_options(cls)
    found = []
    for name, param in params.items():
        _, extras = convert.markers(hints.get(name, str))
        marker = next((x for x in extras if isinstance(x, convert.Binds)), None)
        if marker is None:
            continue
        value = options.get(name, param.default)
        condition = options.get(marker.when, params[marker.when].default) if marker.when else True
        if condition is True and isinstance(value, str) and value:
            found.append((name, value))
    return found
