"""The address table's own rules, checked when a handler is declared: called here, at test time (the server's
table is compiled at import, before any mutant of `server.osc.table` is switched on, so only these reach it)."""

from __future__ import annotations

import pytest

from server.osc.table import Address, AddressTable, VoiceNumber, address


def handler(ctx, x: float, y: float, voice: VoiceNumber | None = None) -> None:
    """Play a position.

    More words that are not the summary."""


def test_a_handler_compiles_to_its_path_arguments_summary_and_options() -> None:
    spec = address("/play")(handler).osc_address
    assert spec == Address("/play", handler, spec.params, 2, "Play a position.", False, None)
    assert [(p.name, p.kind, p.optional) for p in spec.params] == [("x", "float", False), ("y", "float", False),
                                                                   ("voice", "int", True)]
    assert spec.usage == "x:float y:float [voice:int]"
    assert spec.invoke(None, [0.5, 1, 3]) is None


def test_options_are_kept_as_given() -> None:
    def costly(ctx, name: str) -> None:
        """Load."""

    def position(ctx, x: float) -> None:
        """Move."""

    assert address("/costly", max_rate=1.0)(costly).osc_address.max_rate == 1.0  # 1 a second is allowed
    spec = address("/costly", max_rate=2.5)(costly).osc_address
    assert (spec.performer, spec.max_rate) == (False, 2.5)
    spec = address("/position", performer=True)(position).osc_address
    assert (spec.performer, spec.max_rate, spec.summary) == (True, None, "Move.")


@pytest.mark.parametrize("path", ["play", "ab", "/", "", "/a b", "/a*", "/a#", "/a,b", "/a?", "/[a]", "/{a}"])
def test_an_address_must_be_literal_and_start_with_a_slash(path: str) -> None:
    with pytest.raises(ValueError) as refused:
        address(path)(handler)
    assert str(refused.value) == f"{path!r} is not a literal OSC address"


@pytest.mark.parametrize("performer, max_rate", [(False, 0.5), (False, 0.999), (True, 5.0), (True, 1.0)])
def test_a_rate_is_at_least_one_a_second_and_never_on_performer_positions(performer: bool, max_rate: float) -> None:
    with pytest.raises(ValueError) as refused:
        address("/x", performer=performer, max_rate=max_rate)(handler)
    assert str(refused.value) == "/x: max_rate must be >= 1 per second, and performer positions are coalesced instead"


def test_a_handler_needs_a_context_parameter() -> None:
    def bare() -> None:
        """Nothing."""

    with pytest.raises(TypeError) as refused:
        address("/x")(bare)
    assert str(refused.value) == f"{bare.__qualname__}: the first parameter must take the request context"


def test_every_argument_is_positional() -> None:
    def keyword(ctx, *, x: float) -> None:
        """Nothing."""

    def star(ctx, *xs: float) -> None:
        """Nothing."""

    for func, name in ((keyword, "x"), (star, "xs")):
        with pytest.raises(TypeError) as refused:
            address("/x")(func)
        assert str(refused.value) == f"{func.__qualname__}: parameter {name!r} must be positional"


def test_every_argument_is_annotated_with_an_osc_kind() -> None:
    def untyped(ctx, x) -> None:
        """Nothing."""

    def listed(ctx, x: list) -> None:
        """Nothing."""

    for func in (untyped, listed):
        with pytest.raises(TypeError) as refused:
            address("/x")(func)
        assert str(refused.value) == (f"{func.__qualname__}: parameter 'x' must be annotated float, int, str or "
                                      "VoiceNumber")


def test_a_voice_argument_defaults_to_none() -> None:
    def required(ctx, voice: VoiceNumber) -> None:
        """Nothing."""

    def zero(ctx, voice: VoiceNumber = VoiceNumber(0)) -> None:
        """Nothing."""

    for func in (required, zero):
        with pytest.raises(TypeError) as refused:
            address("/x")(func)
        assert str(refused.value) == f"{func.__qualname__}: a voice argument is optional, default None (no voice)"


def test_a_handler_needs_a_docstring() -> None:
    def undocumented(ctx) -> None:
        pass

    with pytest.raises(TypeError) as refused:
        address("/x")(undocumented)
    assert str(refused.value) == f"{undocumented.__qualname__}: a handler's docstring is its documentation; add one"


def test_a_table_takes_only_decorated_handlers_once_each() -> None:
    def plain(ctx) -> None:
        """Nothing."""

    with pytest.raises(TypeError) as refused:
        AddressTable([plain])
    assert str(refused.value) == f"{plain.__qualname__!r} is not decorated with @address"
    with pytest.raises(TypeError) as refused:
        AddressTable([42])  # no __qualname__: shown as itself
    assert str(refused.value) == "42 is not decorated with @address"
    spec = address("/a")(handler)
    with pytest.raises(ValueError) as refused:
        AddressTable([spec, spec])
    assert str(refused.value) == "duplicate OSC address /a"
    table = AddressTable([spec])
    assert table.paths == ("/a",) and len(table) == 1 and list(table) == [spec.osc_address]
