"""Checking config values against Python annotations: the part of typing a config can violate.

Scalars (None, bool, int, float, str) and lists/tuples of them are checked against int, float,
bool, str, Literal, Optional/Union, Enum, tuple[...] and sequence annotations. Anything else (a
tensor, a module, a type variable, an unresolvable string annotation) is accepted: the check must
never reject a config that would run.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import typing

_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)


def signature_hints(obj) -> dict[str, object]:
    """Resolved annotations of a callable's parameters ({} when they cannot be resolved)."""
    target = obj.__init__ if isinstance(obj, type) else obj
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        try:  # some annotation does not resolve: keep the ones that are real objects
            hints = {
                k: v for k, v in getattr(target, "__annotations__", {}).items() if not isinstance(v, str)
            }
        except Exception:
            return {}
    hints.pop("return", None)
    return hints


def value_ok(value, annotation) -> bool:
    """Whether a config value (scalar, or list of values) can be passed where ANNOTATION is expected."""
    if annotation is typing.Any or annotation is inspect.Parameter.empty or isinstance(annotation, typing.TypeVar):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(value_ok(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return value_ok(value, args[0])
    if annotation is type(None) or annotation is None:
        return value is None
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(value_ok(v, a) for v, a in zip(value, args))
        item = args[0] if args else typing.Any
        return all(value_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or any(value in (m.value, m.name) for m in annotation)
    if origin is not None:
        annotation = origin
    if isinstance(annotation, type):
        if annotation in (str, bool, bytes, dict, set, list, tuple):
            return isinstance(value, annotation)
        try:
            return isinstance(value, annotation)
        except TypeError:
            return True
    return True


def describe(annotation) -> str:
    """An annotation in words, for error messages."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return " or ".join(describe(a) for a in args)
    if annotation is type(None) or annotation is None:
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"one of {', '.join(repr(m.value) for m in annotation)} ({annotation.__name__})"
    if origin is not None:
        inner = ", ".join(describe(a) if a is not Ellipsis else "..." for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))
