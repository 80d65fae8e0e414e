"""Checking config values against Python annotations: the part of typing a config can violate.

Scalars (None, bool, int, float, str) and lists/tuples of them are checked against int, float,
bool, str, Literal, Optional/Union, Enum, tuple[...] and sequence annotations. Anything else (a
tensor, a module, a type variable, an unresolvable string annotation) is accepted: the check must
never reject a config that would run.

A number's range is part of its type: ``Annotated[int, Range(ge=1)]`` (fgc's trainer settings use
it) accepts only ints of at least 1, and a bounded float must be finite. :func:`range_violation`
tells a value of the right type that is out of range apart from a value of the wrong type, so the
error can say which.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import inspect
import math
import typing
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number, in ``Annotated[int, Range(ge=1)]``: ``ge``/``gt`` below, ``le``/``lt``
    above. NaN is never in range; with ``finite`` (the default) neither is an infinity."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def contains(self, value) -> bool:
        """Whether the number VALUE lies within the bounds."""
        if isinstance(value, float) and (math.isnan(value) or (self.finite and math.isinf(value))):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        """The bounds in words: ``at least 1``, ``0 or more``, ``more than 0 and less than 1``."""
        parts = []
        if self.ge is not None:
            parts.append(f"{self.ge!r} or more" if self.ge == 0 else f"at least {self.ge!r}")
        if self.gt is not None:
            parts.append(f"more than {self.gt!r}")
        if self.le is not None:
            parts.append(f"at most {self.le!r}")
        if self.lt is not None:
            parts.append(f"less than {self.lt!r}")
        return " and ".join(parts) or "a number"


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)


def signature_hints(obj) -> dict[str, object]:
    """Resolved annotations of a callable's parameters ({} when they cannot be resolved)."""
    target = obj.__init__ if isinstance(obj, type) else obj
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:
        try:  # some annotation does not resolve: keep the ones that are real objects
            hints = {
                k: v for k, v in getattr(target, "__annotations__", {}).items() if not isinstance(v, str)
            }
        except Exception:
            return {}
    hints.pop("return", None)
    return hints


def _is_union(origin) -> bool:
    return origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>")


def range_violation(value, annotation) -> Range | None:
    """The :class:`Range` that VALUE, of a type ANNOTATION accepts, falls outside; None when
    VALUE fits ANNOTATION or is of another type altogether."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(origin):
        if value_ok(value, annotation):
            return None
        return next((r for r in (range_violation(value, a) for a in args) if r is not None), None)
    if origin is typing.Annotated and value_ok(value, args[0]):
        return next((m for m in args[1:] if isinstance(m, Range) and not m.contains(value)), None)
    return None


def range_errors(settings, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(field path, message)`` for every field of the dataclass SETTINGS (and of the dataclasses
    it holds) whose value is outside the range its annotation gives."""
    hints = typing.get_type_hints(type(settings), include_extras=True)
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from range_errors(value, prefix + (f.name,))
            continue
        bounds = range_violation(value, hints.get(f.name, typing.Any))
        if bounds is not None:
            yield prefix + (f.name,), f"{f.name} must be {bounds.describe()}, got {value!r}"


def value_ok(value, annotation) -> bool:
    """Whether a config value (scalar, or list of values) can be passed where ANNOTATION is expected."""
    if annotation is typing.Any or annotation is inspect.Parameter.empty or isinstance(annotation, typing.TypeVar):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(origin):
        return any(value_ok(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        bounds = [m for m in args[1:] if isinstance(m, Range)]
        return value_ok(value, args[0]) and all(b.contains(value) for b in bounds)
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
    if origin is typing.Annotated:
        bounds = [m.describe() for m in args[1:] if isinstance(m, Range)]
        return describe(args[0]) + "".join(f" ({b})" for b in bounds)
    if _is_union(origin):
        return " or ".join(describe(a) for a in args)
    if annotation is type(None) or annotation is None:
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"one of {', '.join(repr(m.value) for m in annotation)} ({annotation.__name__})"
    if origin is not None:
        inner = ", ".join(describe(a) if a is not Ellipsis else "..." for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))
