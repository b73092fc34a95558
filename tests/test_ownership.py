"""Voice ownership (issue 21, finding 1): a voice answers only to the sender that opened it.

With voices per-sender, another sender naming a voice by number, to play it (`/gesture`,
`/interface`, `/note`) or to steer it (`/mode`, `/reset`, `/temperature`,
`/sigma_temperature`), gets `/error` and nothing changes: the owner's output is exactly
what it would have been. A voice number is an OSC int in [0, max_voices): `-7` is not
"no voice" and `3.0` is not 3. One sender opens at most `max_voices_per_sender` voices,
so one port cannot lock newcomers out. `/status` lists only the asker's own voices
(every voice's with `/status all`, from loopback only), and the pushed `status` stream none.

Two ways in, each probe through both where it matters:

- In process, on the virtual clock (`tests/rig.py`): the real OSC protocol and handlers
  in front of a real engine, fed datagrams from made-up senders. With a seed, the
  owner's output under attack is compared event for event with its output alone.
- Over loopback UDP (`tests/live.py`): real servers with `--voices per-sender`, two or
  three sockets; the owner's answers over a phrase are counted against a baseline
  phrase, each wait with a deadline.

The voice argument is fuzzed with hypothesis: any OSC value as the voice, from the
owner, another performer or a newcomer; only ints in range that the sender may use are
accepted, and nothing raises.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from server.live.engine import Settings
from server.live.voices import VoiceOptions, VoicePolicy
from server.model.predictor import Predictor
from server.osc.output import OscOutput
from server.osc.protocol import OscServerProtocol
from tests.live import OscPeer, start_server
from tests.oscfakes import StubTransport
from tests.rig import VirtualLoop, build_engine

REPO = Path(__file__).resolve().parents[1]
A, B, C, D = (("127.0.0.1", 9001), ("127.0.0.1", 9002), ("127.0.0.1", 9003), ("127.0.0.1", 9004))
FAR = ("192.168.1.20", 9005)  # a sender on the LAN
MAX_VOICES = 16  # the default max_voices
CAP = 4  # the default max_voices_per_sender
VOICE_ADDRESSES = ("/gesture", "/interface", "/note", "/mode", "/reset", "/temperature", "/sigma_temperature")
DEADLINE = 10.0  # seconds a live wait may take on a busy machine before the test says why it failed


def circle(i: int) -> tuple[float, float]:
    return 0.5 + 0.3 * math.cos(i / 3), 0.5 + 0.3 * math.sin(i / 3)


def voiced(address: str, voice: Any) -> tuple[Any, ...]:
    """A message naming `voice`, with whatever else its address needs first."""
    lead = {"/gesture": (0.9, 0.1), "/interface": (0.9, 0.1), "/note": (60, 100), "/mode": ("generate",),
            "/reset": (), "/temperature": (0.5,), "/sigma_temperature": (0.5,)}[address]
    return (address, *lead, voice)


# Another performer naming A's voice 0, one probe per address that takes a voice.
ON_ANOTHERS_VOICE = [voiced(address, 0) for address in VOICE_ADDRESSES]
# Voice numbers that are not voice numbers: never "no voice", never rounded.
NOT_A_VOICE = [("/reset", -7), ("/mode", "generate", -7), ("/temperature", 0.5, -7), ("/sigma_temperature", 0.5, -7),
               ("/gesture", 0.9, 0.1, -1), ("/gesture", 0.9, 0.1, 3.0), ("/reset", 0.0), ("/temperature", 0.5, 0.0)]


# --------------------------------------------------------------------------- in process, on the virtual clock


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load(REPO / "models" / "default")


def encode(address: str, *args: Any) -> bytes:
    """An OSC message; floats as float32 (`f`, as most clients send them), as float64 where float32 cannot hold them."""
    b = OscMessageBuilder(address)
    for a in args:
        wide = type(a) is float and math.isfinite(a) and abs(a) > 3.4e38
        b.add_arg(a, OscMessageBuilder.ARG_TYPE_DOUBLE if wide else None)
    return b.build().dgram


class Stage:
    """A real engine (voices per-sender, seeded) behind the real OSC protocol, on a virtual clock."""

    def __init__(self, predictor: Predictor) -> None:
        self.loop = VirtualLoop()
        predictor.reset()
        self.engine, self.played = build_engine(self.loop, predictor, Settings(), seed=3,
                                                voices=VoiceOptions(VoicePolicy.PER_SENDER))
        self.engine.start()
        self.sock = StubTransport()
        output = OscOutput()
        output.attach(self.sock)  # type: ignore[arg-type]
        self.protocol = OscServerProtocol(self.engine, output)
        self.stats = self.protocol.stats

    def send(self, sender: tuple[str, int], address: str, *args: Any) -> None:
        self.send_raw(sender, encode(address, *args))

    def send_raw(self, sender: tuple[str, int], data: bytes) -> None:
        self.protocol.datagrams_received([(data, sender, self.loop.time())])

    def replies(self, to: tuple[str, int], address: str) -> list[list[Any]]:
        return [list(m.params) for m in (OscMessage(d) for d, addr in self.sock.sent if tuple(addr) == to)
                if m.address == address]

    def status(self, sender: tuple[str, int], *which: Any) -> tuple[dict[str, Any], int]:
        """`/status` as `sender` sees it, and the reply's size in bytes."""
        self.sock.sent.clear()
        self.send(sender, "/status", *which)
        replies = [d for d, addr in self.sock.sent if tuple(addr) == sender and d.startswith(b"/status\0")]
        assert len(replies) == 1, self.replies(sender, "/error")
        args = list(OscMessage(replies[0]).params)
        return dict(zip(args[::2], args[1::2])), len(replies[0])

    def events(self) -> list[tuple[Any, ...]]:
        """Everything the engine played: performer and model events, with their time, voice and route."""
        return [(e.source, round(e.time, 9), e.x, e.y, e.voice, e.route) for e in self.played.events]


def phrase(stage: Stage, probe: tuple[Any, ...] | None = None, by: tuple[str, int] = B, steps: int = 24) -> None:
    """A plays a phrase (voice 0, its first event opens it); after each of its events, `by` sends `probe`."""
    for i in range(steps):
        stage.send(A, "/gesture", *circle(i))
        if probe is not None:
            stage.send(by, *probe)
        stage.loop.advance(0.25)
    stage.loop.advance(10.0)  # every answer (dt <= 5 s) has played


@pytest.fixture(scope="module")
def alone(predictor: Predictor) -> list[tuple[Any, ...]]:
    """What A's phrase plays with nobody else on stage."""
    stage = Stage(predictor)
    phrase(stage)
    assert sum(1 for e in stage.events() if e[0] == "model") >= 20
    return stage.events()


def assert_untouched(stage: Stage, alone: list[tuple[Any, ...]]) -> None:
    """A's output is exactly what it was alone, nothing else played, and no setting moved."""
    assert stage.events() == alone  # every event, its time, position, voice and route: A's, and only A's
    s, v = stage.engine.settings, stage.engine.voice(0)
    assert (s.mode.value, s.temperature, s.sigma_temperature) == ("accompany", 1.0, None)  # None: the model's own, untouched
    assert (v.route, v.own_mode, v.temperature, v.sigma_temperature) == (A, None, None, None)
    assert stage.engine.status()["voices"] == 1
    assert stage.stats.internal_errors == 0


@pytest.mark.parametrize("probe", ON_ANOTHERS_VOICE, ids=lambda p: " ".join(map(str, p)))
def test_another_sender_naming_a_voice_is_refused_and_the_owner_plays_on_as_alone(predictor, alone, probe):
    """Finding 1: B's `/gesture x y 0` took A's voice (A got 2 answers of 21), B's `/mode generate 0`, `/reset 0`,
    `/temperature 0.5 0` were applied to A's voice."""
    stage = Stage(predictor)
    phrase(stage, probe)
    assert_untouched(stage, alone)
    errors = stage.replies(B, "/error")
    assert errors and all(e[0] == probe[0] and "belongs to another sender" in e[1] for e in errors), errors
    assert stage.stats.rejected == 24 and stage.engine.counts["voices_denied"] == 24
    assert not stage.replies(B, "/prediction")


@pytest.mark.parametrize("probe", NOT_A_VOICE, ids=lambda p: " ".join(map(repr, p)))
def test_a_voice_number_is_an_int_in_range_never_none_or_rounded(predictor, alone, probe):
    """Finding 1: `/reset -7` reset the whole ensemble, `/mode generate -7` and `/temperature 0.5 -7` changed the
    global settings (a negative number meant "no voice"), and `3.0` passed as 3."""
    stage = Stage(predictor)
    phrase(stage, probe)
    assert_untouched(stage, alone)
    errors = stage.replies(B, "/error")
    assert errors and all(e[0] == probe[0] and "voice" in e[1] for e in errors), errors
    assert stage.stats.rejected == 24


def test_one_sender_opens_at_most_its_cap_of_voices_and_a_newcomer_still_gets_one(predictor):
    """Finding 1: one source port claimed all 16 voices by number and locked every newcomer out."""
    stage = Stage(predictor)
    stage.send(A, "/gesture", 0.5, 0.5)  # voice 0
    for n in range(1, MAX_VOICES):
        stage.send(C, "/gesture", 0.5, 0.5, n)
    errors = stage.replies(C, "/error")  # (at most 10 of them: the /error budget)
    assert stage.stats.rejected == MAX_VOICES - 1 - CAP
    assert errors and all("max_voices_per_sender" in e[1] for e in errors), errors
    assert [v.number for v in stage.engine.voices if v.route == C] == [1, 2, 3, 4]
    stage.send(C, "/gesture", 0.5, 0.5)  # without a number: a fifth voice of C's is refused too
    assert stage.stats.rejected == MAX_VOICES - CAP
    stage.send(D, "/gesture", 0.5, 0.5)  # a newcomer
    assert not stage.replies(D, "/error") and stage.engine.voice(5).route == D
    assert stage.engine.counts["voices_refused"] == MAX_VOICES - CAP
    stage.loop.advance(10.0)
    assert {e.route for e in stage.played.model(5)} == {D}


def test_one_port_drives_several_voices_by_number_and_they_stay_its_own(predictor):
    """The documented way for one patch to play several voices from one port: name them; nobody else can."""
    stage = Stage(predictor)
    for i in range(8):
        stage.send(C, "/gesture", *circle(i), 2)
        stage.send(C, "/gesture", *circle(i + 4), 3)
        stage.loop.advance(0.25)
    stage.send(C, "/mode", "generate", 3)
    stage.send(C, "/temperature", 0.0, 2)
    stage.send(C, "/reset", 2)
    for probe in (voiced("/mode", 3), voiced("/temperature", 2), voiced("/reset", 3), voiced("/gesture", 2)):
        stage.send(B, *probe)
    stage.loop.advance(5.0)
    assert not stage.replies(C, "/error")
    assert len(stage.replies(B, "/error")) == 4 and stage.engine.counts["voices_denied"] == 4
    two, three = stage.engine.voice(2), stage.engine.voice(3)
    assert (two.route, two.temperature, three.route, three.mode.value) == (C, 0.0, C, "generate")
    assert {e.route for e in stage.played.model(2)} == {e.route for e in stage.played.model(3)} == {C}
    assert len(stage.played.model(3)) > 20  # it generates, for C
    assert stage.engine.voice(1) is None and len(stage.engine.voices) == 2  # B opened nothing


def test_status_lists_only_the_askers_own_voices_unless_loopback_asks_for_all(predictor):
    """Finding 1: `/status` listed every performer's host:port to anyone who asked (3,628 bytes for a 12-byte
    request with 16 voices)."""
    stage = Stage(predictor)
    stage.send(A, "/gesture", 0.5, 0.5)  # voice 0
    stage.send(B, "/gesture", 0.5, 0.5)  # voice 1
    stage.send(C, "/gesture", 0.5, 0.5, 2)
    stage.send(C, "/gesture", 0.5, 0.5, 3)
    mine = {who: sorted({k.split("_")[0] for k in stage.status(who)[0] if k.startswith("voice") and k[5].isdigit()})
            for who in (A, B, C, D)}
    assert mine == {A: ["voice0"], B: ["voice1"], C: ["voice2", "voice3"], D: []}
    seen_by_a = stage.status(A)[0]
    assert seen_by_a["voices"] == 4 and seen_by_a["voice0_from"] == "127.0.0.1:9001"
    assert f"127.0.0.1:{B[1]}" not in seen_by_a.values()
    everything = stage.status(D, "all")[0]  # D is on loopback: a monitor or tool on this machine
    assert [everything[f"voice{n}_from"] for n in range(4)] == ["127.0.0.1:9001", "127.0.0.1:9002",
                                                                "127.0.0.1:9003", "127.0.0.1:9003"]
    stage.sock.sent.clear()
    stage.send(FAR, "/status", "all")  # from the LAN: refused
    errors = stage.replies(FAR, "/error")
    assert len(errors) == 1 and errors[0][0] == "/status" and "loopback" in errors[0][1]
    assert not stage.replies(FAR, "/status")
    assert "voice0_from" not in stage.status(FAR)[0]


def test_a_status_reply_does_not_grow_with_other_performers_voices(predictor):
    """Its size is the asker's business only: with 16 voices a performer's reply is its one voice's keys more
    than a newcomer's, not 16 voices' worth."""
    stage = Stage(predictor)
    stage.send(A, "/gesture", 0.5, 0.5)
    _, one_voice = stage.status(A)
    for port in range(1, MAX_VOICES):
        stage.send(("127.0.0.1", 9100 + port), "/gesture", 0.5, 0.5)
    assert stage.engine.status()["voices"] == MAX_VOICES
    seen, sixteen_voices = stage.status(A)
    assert sum(k.endswith("_from") for k in seen) == 1
    assert sixteen_voices <= one_voice + 16  # a few more digits in the counters, nobody's keys
    _, everything = stage.status(A, "all")
    assert everything > sixteen_voices + 14 * 100  # the others' keys are there, for loopback's `all` only


# --------------------------------------------------------------------------- the voice argument, fuzzed

# Any OSC value: ints (i, and h beyond 32 bits), float32 and float64 (integral ones too, and NaN and
# infinities), strings, blobs, booleans, nil and arrays.
OSC_VALUES = st.one_of(
    st.integers(-20, 40), st.integers(-(1 << 63), (1 << 63) - 1),
    st.sampled_from([0.0, 1.0, 3.0, 5.0, -7.0, 15.0, 16.0, 0.5, math.nan, math.inf, -math.inf]),
    st.floats(width=32), st.floats(),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=8),
    st.binary(min_size=1, max_size=8), st.booleans(), st.none(), st.lists(st.integers(0, 3), max_size=2),
)


def may_use(address: str, voice: Any, sender: tuple[str, int], owners: dict[int, tuple[str, int]]) -> bool:
    """The rule: an OSC int in [0, max_voices); a voice the sender owns, or (to play) a free one within its cap."""
    if type(voice) is not int or not 0 <= voice < MAX_VOICES:
        return False
    if voice in owners:
        return owners[voice] == sender
    return address in ("/gesture", "/interface", "/note") and list(owners.values()).count(sender) < CAP


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(address=st.sampled_from(VOICE_ADDRESSES), value=OSC_VALUES, sender=st.sampled_from([A, B, C]))
def test_any_osc_value_as_the_voice_only_a_usable_int_is_accepted_and_nothing_raises(predictor, address, value,
                                                                                       sender):
    stage = Stage(predictor)
    stage.send(A, "/gesture", 0.5, 0.5)  # voice 0
    stage.send(B, "/gesture", 0.5, 0.5)  # voice 1
    stage.send(A, "/gesture", 0.5, 0.5, 5)  # and A's numbered voice 5
    owners = {0: A, 1: B, 5: A}
    data = encode(*voiced(address, value))
    sent = OscMessage(data).params[-1]  # the value as the server decodes it (float32 rounding, say)
    handled, rejected = stage.stats.handled, stage.stats.rejected
    stage.send_raw(sender, data)
    accepted = may_use(address, sent, sender, owners)
    assert (stage.stats.handled - handled, stage.stats.rejected - rejected) == ((1, 0) if accepted else (0, 1))
    assert stage.stats.internal_errors == 0
    if not accepted:
        assert stage.replies(sender, "/error")[-1][0] == address
    s = stage.engine.settings
    assert (s.mode.value, s.temperature, s.sigma_temperature) == ("accompany", 1.0, None)  # never "no voice"; None: the model's own
    for n, owner in owners.items():  # every voice still its owner's; only the sender's own may have changed
        v = stage.engine.voice(n)
        assert v is not None and v.route == owner
        if owner != sender:
            assert (v.own_mode, v.temperature, v.sigma_temperature, v.fresh) == (None, None, None, False)
    opened = {v.number for v in stage.engine.voices} - set(owners)
    assert opened == ({sent} if accepted and sent not in owners else set())


# --------------------------------------------------------------------------- over loopback UDP


def peer_for(port: int) -> OscPeer:
    peer = OscPeer()
    peer.target = ("127.0.0.1", port)
    return peer


def status_of(peer: OscPeer, *which: str) -> dict[str, Any]:
    args = peer.request("/status", *which, reply="/status", seconds=DEADLINE)
    return dict(zip(args[::2], args[1::2]))


def live_phrase(a: OscPeer, b: OscPeer, probes: list[tuple[Any, ...]], steps: int) -> list[list[Any]]:
    """A plays `steps` gestures 40 ms apart, B sending the next probe after each; A's answers, up to one each."""
    a.drain(0.05)
    for i in range(steps):
        a.send("/gesture", *circle(i))
        if probes:
            b.send(*probes[i % len(probes)])
        time.sleep(0.04)
    return [args for _, _, args in a.receive(DEADLINE, "/prediction", count=steps)]


def dropped(status: dict[str, Any]) -> int:
    return status["late_dropped"] + status["rate_dropped"] + status["dropped"]


def test_live_another_sockets_probes_are_each_refused_and_the_owners_answers_keep_coming(tmp_path):
    """Finding 1 over UDP, from a second socket: every probe on A's voice and every voice number that is not one
    answered with `/error`; A answered as often as in its baseline phrase; B played nothing; the server alive."""
    probes = ON_ANOTHERS_VOICE + NOT_A_VOICE
    srv = start_server(tmp_path, "--voices", "per-sender", "--send", "127.0.0.1:9", "--timescale", "0.05",
                       "--seed", "2")
    a, b = peer_for(srv.port), peer_for(srv.port)
    try:
        baseline = live_phrase(a, b, [], len(probes))
        before = status_of(a)
        assert before["voice0_from"] == f"127.0.0.1:{a.port}"
        attacked = live_phrase(a, b, probes, 2 * len(probes))
        b_heard = b.receive(1.0)  # what B got, with time for the last replies
        after = status_of(a)
        alive = srv.proc.poll() is None
    finally:
        srv.stop()
        a.close()
        b.close()
    assert len(baseline) + dropped(before) >= len(probes)
    lost = dropped(after) - dropped(before)  # answers a busy machine dropped as late: not the probes' doing
    assert len(attacked) + lost >= 2 * len(probes), (len(attacked), lost)
    assert {args[2] for args in attacked} == {0}
    # A's voice heard A's gestures and nobody else's, and everything it played went to A: nothing more
    assert after["voice0_inputs"] - before["voice0_inputs"] == 2 * len(probes)
    assert after["voice0_outputs"] - before["voice0_outputs"] == len(attacked)
    errors = [args for _, address, args in b_heard if address == "/error"]
    for probe in probes:  # each probe answered (its first sending, before the /error budget could run out)
        assert any(e[0] == probe[0] for e in errors), (probe, errors)
    assert all("belongs to another sender" in e[1] or "voice" in e[1] for e in errors), errors
    assert not [m for m in b_heard if m[1] == "/prediction"]
    assert (after["mode"], after["temperature"], after["sigma_temperature"]) == ("accompany", 1.0, 1.0)
    assert (after["voices"], after["voice0_mode"], after["voice0_temperature"]) == (1, "accompany", 1.0)
    assert after["voice0_from"] == f"127.0.0.1:{a.port}" and alive


def test_live_one_port_claiming_every_voice_gets_its_cap_and_a_newcomer_still_plays(tmp_path):
    """Finding 1 over UDP: one source port claimed all 16 voices by number and locked every newcomer out."""
    srv = start_server(tmp_path, "--voices", "per-sender", "--send", "127.0.0.1:9", "--timescale", "0.05")
    greedy, newcomer = peer_for(srv.port), peer_for(srv.port)
    try:
        for n in range(MAX_VOICES):
            greedy.send("/gesture", 0.5, 0.5, n)
            time.sleep(0.01)
        refused = greedy.receive(DEADLINE, "/error", count=10)  # the /error budget's burst: the rest may be withheld
        mine = status_of(greedy)
        newcomer.send("/gesture", 0.5, 0.5)
        welcome = newcomer.receive(DEADLINE, "/prediction", count=1)
        seen = status_of(newcomer)
        alive = srv.proc.poll() is None
    finally:
        srv.stop()
        greedy.close()
        newcomer.close()
    assert len(refused) == 10 and all("max_voices_per_sender" in m[2][1] for m in refused)
    assert sorted(k for k in mine if k.endswith("_from")) == [f"voice{n}_from" for n in range(CAP)]
    assert welcome and welcome[0][2][2] == CAP  # the newcomer's voice: the first free number
    assert seen["voices"] == CAP + 1 and seen["voices_refused"] == MAX_VOICES - CAP
    assert seen[f"voice{CAP}_from"] == f"127.0.0.1:{newcomer.port}" and alive


def test_live_status_replies_and_pushes_show_no_one_elses_voice(tmp_path):
    """`/status` from a performer carries its own voice's keys only; the pushed `status` stream none at all."""
    srv = start_server(tmp_path, "--voices", "per-sender", "--send", "127.0.0.1:9", "--mode", "listen")
    a, b, watcher = peer_for(srv.port), peer_for(srv.port), peer_for(srv.port)
    try:
        a.send("/gesture", 0.5, 0.5)
        time.sleep(0.05)
        b.send("/gesture", 0.5, 0.5)
        seen_by_b = status_of(b)
        while status_of(watcher)["voices"] < 2:
            time.sleep(0.02)
        watcher.send("/subscribe", "status")
        pushed = watcher.receive(DEADLINE, "/status", count=1)
    finally:
        srv.stop()
        for peer in (a, b, watcher):
            peer.close()
    assert seen_by_b["voices"] == 2 and seen_by_b["voice1_from"] == f"127.0.0.1:{b.port}"
    assert not [k for k in seen_by_b if k.startswith("voice0_")]
    assert pushed
    keys = pushed[0][2][::2]
    assert "voices" in keys and not [k for k in keys if k.startswith("voice") and k[5:6].isdigit()]
