"""Declarative OSC addresses: a handler's signature is its argument spec, its docstring its documentation.

Decorate a function with `@address("/path")`. Its first parameter receives the request
context; the others are annotated `float`, `int` or `str`, and defaults make trailing
arguments optional. The signature is compiled once, at import, into converters, so a
message costs one dict lookup plus one small call per argument, never `inspect`.

Argument rules (clients disagree about number types, so accept what they mean):

- float: OSC `f`, `d`, `i` or `h`; NaN and +-inf are rejected.
- int: OSC `i` or `h`, or a float with an integral value, because Pd sends every
  number as a float; 1.5 is rejected.
- VoiceNumber (a voice argument, shown as int): OSC `i` or `h` only, >= 0. A voice is
  named exactly or not at all: `3.0`, `-1` and nil are refused, never read as "no
  voice". Leaving the argument out is the only way to name none: annotate it
  `VoiceNumber | None = None`, and the handler gets None (a value no message can carry).
- str: OSC `s` only.
- `*values: float`: as many floats as `count(ctx)` says when the message arrives (the
  playing model's N, which a `/model` swap may change), declared with
  `@address(..., count=...)`; keyword-only parameters after it (a voice) are optional
  trailing arguments. A wrong count is refused naming the count wanted.
- Anything else (booleans `T`/`F`, nil, blobs, arrays, MIDI, timetags) is rejected.

Range checks belong in the handler: raise `ControlError` with a reason for the client.

Two options describe how the server may treat an address under load, so that policy
sits next to the handler rather than in the transport:

- `performer=True`: the handler only checks and returns a performer event's values
  and voice (or None to ignore the message); the transport decides when it reaches the
  engine, and may let a newer position supersede it (see `server.osc`).
- `max_rate=R`: at most R such messages per second from one sender (burst R), for
  requests that are costly (a model load) or that answer with more than they receive.

Two more describe an address to tools that discover the namespace (OSCQuery, see
`server.osc.oscquery`): `ranges={"param": Range(...)}`, the values each argument takes
(the handler's checks stay the rule; a test holds each declaration to them at its
edges), and `state="key"`, the `/status` key that holds the control's current value.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NewType, TypeVar

from server.live.controls import ControlError

F = TypeVar("F", bound=Callable[..., Any])
VoiceNumber = NewType("VoiceNumber", int)  # a voice argument: an OSC int >= 0 only (see the module doc)

# OSC pattern-matching and reserved characters: addresses here are literal.
_RESERVED = set(" #*,?[]{}")


class ArgumentError(ControlError):
    """An OSC message's arguments do not fit its handler's signature."""


class _BadValue(Exception):
    """One argument failed conversion; the caller adds the parameter's name."""


def _describe(value: object) -> str:
    """Name a decoded OSC value the way a client author would recognise it."""
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "nil"
    if isinstance(value, bytes):
        return "a blob"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"the string {value[:32]!r}"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, int):
        return f"the int {value}"
    return f"an unsupported {type(value).__name__} value"


def _to_float(value: object) -> float:
    kind = type(value)
    if kind is float:
        if value - value == 0.0:  # type: ignore[operator]  # False for NaN and +-inf
            return value  # type: ignore[return-value]
        raise _BadValue(f"expected a finite number, got {value!r}")
    if kind is int:
        return float(value)  # type: ignore[arg-type]
    raise _BadValue(f"expected a number, got {_describe(value)}")


def _to_int(value: object) -> int:
    kind = type(value)
    if kind is int:
        return value  # type: ignore[return-value]
    if kind is float and value.is_integer():  # type: ignore[attr-defined]  # False for NaN, inf
        return int(value)  # type: ignore[call-overload]
    raise _BadValue(f"expected an integer, got {_describe(value)}")


def _to_voice(value: object) -> int:
    if type(value) is int:
        if value >= 0:  # type: ignore[operator]
            return value  # type: ignore[return-value]
        raise _BadValue(f"a voice number is 0 or more, got {value}; leave it out for none")
    raise _BadValue(f"expected a voice number (an OSC int), got {_describe(value)}")


def _to_str(value: object) -> str:
    if type(value) is str:
        return value  # type: ignore[return-value]
    raise _BadValue(f"expected a string, got {_describe(value)}")


_CONVERTERS: dict[str, Callable[[object], Any]] = {"float": _to_float, "int": _to_int, "str": _to_str}
# Annotation -> (the OSC kind a client sends, its converter). Annotations arrive as strings under
# `from __future__ import annotations`, else as types. A voice is an int on the wire, converted strictly.
_KINDS: dict[object, tuple[str, Callable[[object], Any]]] = {
    **{k: (k, convert) for k, convert in _CONVERTERS.items()}, float: ("float", _to_float), int: ("int", _to_int),
    str: ("str", _to_str), VoiceNumber: ("int", _to_voice), "VoiceNumber": ("int", _to_voice),
    "VoiceNumber | None": ("int", _to_voice)}


@dataclass(frozen=True, slots=True)
class Range:
    """The values one argument takes: [low, high] (either end open-ended when None) or a list of values."""

    low: float | None = None
    high: float | None = None
    values: tuple[str | int, ...] = ()
    open_low: bool = False  # low itself is refused: the argument must be above it
    clipped: bool = False  # values outside [low, high] are clamped to it, not refused


VOICE_RANGE = Range(low=0)  # what `_to_voice` accepts


@dataclass(frozen=True, slots=True)
class Param:
    """One OSC argument, compiled from a handler parameter."""

    name: str
    kind: str  # "float", "int" or "str": what a client sends
    optional: bool
    convert: Callable[[object], Any]
    range: Range | None = None  # declared for discovery (OSCQuery); the checks are the handler's

    @property
    def usage(self) -> str:
        text = f"{self.name}:{self.kind}"
        return f"[{text}]" if self.optional else text


@dataclass(frozen=True, slots=True)
class Address:
    """A compiled handler: validates a message's arguments, then calls the function."""

    path: str
    func: Callable[..., Any]
    params: tuple[Param, ...]
    required: int
    summary: str
    performer: bool = False  # the handler returns a position for the transport to apply
    max_rate: float | None = None  # messages per second per sender, or None for no limit
    state: str | None = None  # the /status key holding this control's current value, if it has one
    count: Callable[[Any], int] | None = None  # with `*values`: how many it takes now (the model's N)
    trailing: tuple[Param, ...] = ()  # with `*values`: the optional keyword-only arguments after them
    values_range: Range | None = None  # with `*values`: each value's range (for discovery)

    def signature(self, width: int) -> tuple[tuple[Param, ...], int]:
        """(the arguments, how many are required) when the model takes ``width`` values: a `*values`
        address takes v1 .. vN then its trailing ones; any other, its own."""
        if self.count is None:
            return self.params, self.required
        values = tuple(Param(f"v{i}", "float", False, _to_float, self.values_range) for i in range(1, width + 1))
        return (*self.params, *values, *self.trailing), self.required + width

    @property
    def usage(self) -> str:
        """Arguments as `x:float y:float [port:int]` (`v1..vN:float [voice:int]` with `*values`) for documentation."""
        fixed = [p.usage for p in self.params]
        if self.count is None:
            return " ".join(fixed)
        return " ".join([*fixed, "v1..vN:float", *(p.usage for p in self.trailing)])

    def invoke(self, ctx: object, args: Sequence[object]) -> Any:
        """Convert `args` per the signature and return the handler's result; ArgumentError if they don't fit."""
        if self.count is not None:
            return self._invoke_values(ctx, args, self.count(ctx))
        params = self.params
        if not self.required <= len(args) <= len(params):
            raise ArgumentError(self._count_reason(len(args)))
        return self.func(ctx, *_convert(params, args))

    def _invoke_values(self, ctx: object, args: Sequence[object], n: int) -> Any:
        """`invoke` for a handler taking `*values`: the fixed arguments, exactly ``n`` floats, then the trailing."""
        fixed, trailing = len(self.params), self.trailing
        end = fixed + n
        if not end <= len(args) <= end + len(trailing):
            most = end + len(trailing)
            count = str(end) if most == end else f"{end}-{most}"
            raise ArgumentError(f"{self.path} wants {n} value{'s' if n != 1 else ''} (the model's dims), got "
                                f"{len(args) - fixed}: expected {count} arguments ({self.usage})")
        values = []
        for i in range(fixed, end):
            try:
                values.append(_to_float(args[i]))
            except _BadValue as exc:
                raise ArgumentError(f"v{i - fixed + 1}: {exc}") from None
        more = dict(zip((p.name for p in trailing), _convert(trailing, args[end:])))
        return self.func(ctx, *_convert(self.params, args[:fixed]), *values, **more)

    def _count_reason(self, got: int) -> str:
        if not self.params:
            return f"expected no arguments, got {got}"
        most = len(self.params)
        count = str(most) if self.required == most else f"{self.required}-{most}"
        noun = "argument" if count == "1" else "arguments"
        return f"expected {count} {noun} ({self.usage}), got {got}"


def _convert(params: Sequence[Param], args: Sequence[object]) -> list[Any]:
    """Each argument converted by its parameter (as many as there are arguments); ArgumentError naming the first bad."""
    values = []
    for param, arg in zip(params, args):
        try:
            values.append(param.convert(arg))
        except _BadValue as exc:
            raise ArgumentError(f"{param.name}: {exc}") from None
    return values


def _compile(path: str, func: Callable[..., Any], performer: bool, max_rate: float | None,
             count: Callable[[Any], int] | None = None, ranges: Mapping[str, Range] | None = None,
             state: str | None = None) -> Address:
    if not path.startswith("/") or len(path) < 2 or _RESERVED.intersection(path):
        raise ValueError(f"{path!r} is not a literal OSC address")
    if max_rate is not None and (performer or not max_rate >= 1.0):
        raise ValueError(f"{path}: max_rate must be >= 1 per second, and performer positions are coalesced instead")
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())
    if not parameters:
        raise TypeError(f"{func.__qualname__}: the first parameter must take the request context")
    params: list[Param] = []
    trailing: list[Param] = []
    variadic = False
    for p in parameters[1:]:
        if count is not None and p.kind is inspect.Parameter.VAR_POSITIONAL and not variadic:
            if _KINDS.get(p.annotation, ("",))[0] != "float":
                raise TypeError(f"{func.__qualname__}: *{p.name} must be annotated float")
            variadic = True
            continue
        keyword = variadic and p.kind is inspect.Parameter.KEYWORD_ONLY
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD and not keyword:
            raise TypeError(f"{func.__qualname__}: parameter {p.name!r} must be positional")
        if keyword and p.default is inspect.Parameter.empty:
            raise TypeError(f"{func.__qualname__}: {p.name!r} after *values must be optional")
        found = _KINDS.get(p.annotation)
        if found is None:
            raise TypeError(f"{func.__qualname__}: parameter {p.name!r} must be annotated float, int, str or "
                            "VoiceNumber")
        kind, convert = found
        if convert is _to_voice and p.default is not None:
            raise TypeError(f"{func.__qualname__}: a voice argument is optional, default None (no voice)")
        declared = (ranges or {}).get(p.name, VOICE_RANGE if convert is _to_voice else None)
        (trailing if keyword else params).append(Param(p.name, kind, p.default is not inspect.Parameter.empty,
                                                       convert, declared))
    if count is not None and not variadic:
        raise TypeError(f"{func.__qualname__}: count= needs a *values parameter")
    variadic_names = {p.name for p in parameters[1:] if p.kind is inspect.Parameter.VAR_POSITIONAL}
    unknown = set(ranges or {}) - {p.name for p in (*params, *trailing)} - variadic_names
    if unknown:
        raise TypeError(f"{func.__qualname__}: ranges name no parameter: {', '.join(sorted(unknown))}")
    values_range = next(((ranges or {}).get(name) for name in variadic_names), None)
    doc = inspect.getdoc(func)
    if not doc:
        raise TypeError(f"{func.__qualname__}: a handler's docstring is its documentation; add one")
    required = sum(1 for p in params if not p.optional)
    return Address(path, func, tuple(params), required, doc.splitlines()[0], performer, max_rate, state, count,
                   tuple(trailing), values_range)


def address(path: str, *, performer: bool = False, max_rate: float | None = None,
            count: Callable[[Any], int] | None = None, ranges: Mapping[str, Range] | None = None,
            state: str | None = None) -> Callable[[F], F]:
    """Mark `func` as the handler of OSC `path`, compiling its signature now (options: see the module doc)."""

    def mark(func: F) -> F:
        func.osc_address = _compile(path, func, performer, max_rate, count, ranges, state)  # type: ignore[attr-defined]
        return func

    return mark


class AddressTable:
    """The immutable mapping from OSC address to compiled handler, in documentation order."""

    def __init__(self, handlers: Iterable[Callable[..., Any]]) -> None:
        table: dict[str, Address] = {}
        for func in handlers:
            spec = getattr(func, "osc_address", None)
            if not isinstance(spec, Address):
                raise TypeError(f"{getattr(func, '__qualname__', func)!r} is not decorated with @address")
            if spec.path in table:
                raise ValueError(f"duplicate OSC address {spec.path}")
            table[spec.path] = spec
        self.lookup: Mapping[str, Address] = MappingProxyType(table)

    def __iter__(self) -> Iterator[Address]:
        return iter(self.lookup.values())

    def __len__(self) -> int:
        return len(self.lookup)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.lookup)

    def text(self) -> str:
        """Aligned plain text, one address per line, for a start-up banner."""
        width_path = max(len(a.path) for a in self)
        width_usage = max(len(a.usage) for a in self)
        return "\n".join(
            f"{a.path:<{width_path}}  {a.usage:<{width_usage}}  {a.summary}".rstrip() for a in self
        )

    def markdown(self) -> str:
        """A Markdown table (address, arguments, meaning) for docs/osc.md."""
        rows = ["| address | arguments | meaning |", "|---|---|---|"]
        for a in self:
            usage = f"`{a.usage}`" if a.usage else ""
            rows.append(f"| `{a.path}` | {usage} | {a.summary.replace('|', chr(92) + '|')} |")
        return "\n".join(rows)
