"""The client patches at any number of values: they learn N from the server and show and send N values.

Against a real server playing the tiny untrained models of `wide_models_dir`: at N = 2 and 4
the patch learns N from `/status dims` when it opens; at 9 the server starts at 4 and another
program swaps in the 9-value model, so the patch learns it from `/model/dims 9`. Then it sends
its N values (`/gesture v1 .. vN`, nothing refused) and shows the model's N values from each
`/prediction`. Pd: antiphon.pd itself (its `$0-` names made global), driven by a helper patch
that fills your array and clicks `send`. SuperCollider: antiphon.scd itself, headless, its
row of your sliders moved by a harness. Also, against a fake server: Pd's live toggle sends
each new drawing once. Max: structure only (no Max here).
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys

import pytest

from tests.test_patches import (CLIENT_TIMEOUT, Lines, assert_line, fake_received, max_boxes_and_lines,
                                osc_message, pd_patch_at, pd_patch_with_fake_server, require_program, run_client,
                                running_server, sc_client_for, sc_string, sclang_env)

BURST = 10  # the events each harness sends once it knows N (one answer each in accompany)
MIN_ANSWERS = 8  # at least this many answers of N values must come back
SWAP_SECONDS = 60.0  # a /model swap loads in a few seconds; only a failing test waits this long
# N -> (the model the server starts with, the one another program swaps in, or None)
CASES = {2: ("n2", None), 4: ("n4", None), 9: ("n4", "n9")}
VALUES = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5, 0.15, 0.85, 0.25, 0.75, 0.35, 0.65, 0.45]

# On each N (`antiphon-dims`): print it, then (once the patch has resized its arrays) write the
# first N of VALUES into your array and click `send` BURST times, 100 ms apart. After each
# /prediction has been handled (`del 0`), print the model's array.
PD_DIMS_HELPER = f"""#N canvas 0 0 700 500 12;
#X obj 20 20 r antiphon-dims;
#X obj 20 45 t f f;
#X obj 20 75 print DIMS;
#X obj 100 75 del 200;
#X obj 100 100 t b b b;
#X msg 300 130 {" ".join(map(str, VALUES))};
#X obj 300 160 list split 2;
#X obj 300 190 array set antiphon-you-values;
#X msg 200 130 0;
#X obj 100 160 metro 100;
#X obj 100 190 f;
#X obj 140 190 + 1;
#X obj 100 220 moses {BURST};
#X obj 100 250 s antiphon-values-send;
#X msg 200 250 stop;
#X obj 500 20 r antiphon-model;
#X obj 500 45 del 0;
#X obj 500 70 array get antiphon-model-values;
#X obj 500 95 print MODEL-VALUES;
#X obj 500 150 r antiphon-values-out;
#X obj 500 175 print SENT-VALUES;
#X connect 0 0 1 0;
#X connect 1 0 3 0;
#X connect 1 1 2 0;
#X connect 1 0 6 1;
#X connect 3 0 4 0;
#X connect 4 2 5 0;
#X connect 5 0 6 0;
#X connect 6 0 7 0;
#X connect 4 1 8 0;
#X connect 8 0 10 1;
#X connect 4 0 9 0;
#X connect 9 0 10 0;
#X connect 10 0 11 0;
#X connect 11 0 10 1;
#X connect 10 0 12 0;
#X connect 12 0 13 0;
#X connect 12 1 14 0;
#X connect 14 0 9 0;
#X connect 15 0 16 0;
#X connect 16 0 17 0;
#X connect 17 0 18 0;
#X connect 19 0 20 0;
"""


def rows_after_last(out: str, dims_line: str, label: str) -> list[list[float]]:
    """The `label` lines printed after the last `dims_line`, as numbers."""
    tail = out[out.rindex(dims_line):]
    return [[float(v) for v in row.split()] for row in re.findall(rf"^{label} ?(.*)$", tail, re.MULTILINE)]


def swap_model(port: int, name: str) -> None:
    """Another program (not the patch) asks the server for `/model name`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(osc_message("/model", name), ("127.0.0.1", port))


def assert_n_values(rows: list[list[float]], n: int, what: str, out: str) -> None:
    good = [r for r in rows if len(r) == n and all(0.0 <= v <= 1.0 for v in r)]
    assert len(good) >= MIN_ANSWERS, f"{what}: wanted {MIN_ANSWERS} rows of {n} values in [0, 1], got {rows}\n{out}"


@pytest.mark.parametrize("n", list(CASES))
def test_pd_patch_learns_n_and_sends_and_shows_n_values(tmp_path, wide_models_dir, n):
    pd = require_program("pd", "puredata-core")
    start, swap = CASES[n]
    with running_server(tmp_path, "--models-dir", str(wide_models_dir), "--model", start) as srv:
        cmd = pd_patch_at(tmp_path, pd, PD_DIMS_HELPER, srv.port, srv.client_port)
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines = Lines(proc)
        try:
            first = int(start[1:])
            assert lines.wait(rf"^DIMS: {first}$", seconds=30), "no /status dims reached the patch"
            if swap:
                lines.wait(rf"^MODEL-VALUES:( \S+){{{first}}}$", count=MIN_ANSWERS, seconds=30)
                swap_model(srv.port, swap)
                lines.wait(rf"^DIMS: {n}$", seconds=SWAP_SECONDS)
            # the whole burst sent, then the answers shown: waiting only for N-value rows of the model's
            # array could end early, since resizing it shows the last answer padded to N (seen under load)
            lines.wait(rf"^SENT-VALUES:( \S+){{{n}}}$", count=BURST, seconds=30)
            lines.wait(rf"^MODEL-VALUES:( \S+){{{n}}}$", count=MIN_ANSWERS, seconds=30)
        finally:
            out = lines.stop()
    for problem in ("can't open", "couldn't create", "antiphon-error"):
        assert problem not in out, f"pd reported '{problem}':\n{out}"
    assert f"DIMS: {n}\n" in out, f"the patch never learnt N = {n}:\n{out}"
    assert_n_values(rows_after_last(out, f"DIMS: {n}\n", "SENT-VALUES:"), n, "sent", out)
    assert_n_values(rows_after_last(out, f"DIMS: {n}\n", "MODEL-VALUES:"), n, "shown", out)


# antiphon.scd headless (no audio server): on each N the harness moves your row of sliders
# BURST times, 100 ms apart, to the first N of VALUES; it prints each /prediction it hears
# and, after each burst, what the model's row shows. For the swap, another program sends
# /model while the window plays.
SC_DIMS_HARNESS = r"""
var heard = 0, last;
var wait = { |seconds, condition|  // poll until condition or timeout; never a proof of absence
	var waited = 0;
	while { condition.value.not and: { waited < seconds } } { 0.1.wait; waited = waited + 0.1 };
};
Server.program = "exec %NO_SCSYNTH%";
OSCdef(\testPrediction, { |msg|
	heard = heard + 1; last = msg[1..]; ("HARNESS PREDICTION " ++ msg[1..].join(" ")).postln }, '/prediction');
thisProcess.interpreter.executeFile("%CLIENT%");
Routine {
	var window, rows, texts, line, burst;
	wait.(20, { (Window.allWindows ? []).any { |w| w.name == "Antiphon" } });
	window = (Window.allWindows ? []).detect { |w| w.name == "Antiphon" };
	if(window.isNil) { "HARNESS NO WINDOW".postln; 1.exit; nil.alwaysYield };
	rows = window.view.children.select { |v| v.isKindOf(MultiSliderView) };
	texts = window.view.children.select { |v| v.isKindOf(StaticText) };
	line = { |prefix| var view = texts.detect { |t| t.string.beginsWith(prefix) }; if(view.isNil) { "" } { view.string } };
	burst = { |n|
		var start;
		wait.(%SWAP_SECONDS%, { line.("MODEL values").endsWith("N = " ++ n) });
		("HARNESS DIMS % ROWS % %".format(line.("MODEL values"), rows[0].value.size, rows[1].value.size)).postln;
		start = heard;
		%BURST%.do { |i| rows[0].valueAction = %VALUES%.keep(n); 0.1.wait };
		wait.(20, { heard - start >= %BURST% });
		wait.(5, { last.notNil and: { (rows[1].value - last.keep(n)).abs.maxItem < 0.001 } });
		("HARNESS SHOWN " ++ rows[1].value.join(" ")).postln;
	};
	burst.(%FIRST%);
	if(%SWAP%.notNil) {
		%SWAP%.unixCmd({ |code| ("HARNESS SWAP EXIT " ++ code).postln });
		burst.(%N%);
	};
	window.close;
	0.5.wait;
	0.exit;
}.play(AppClock);
"""


@pytest.mark.parametrize("n", list(CASES))
def test_supercollider_client_learns_n_and_sends_and_shows_n_values(tmp_path, wide_models_dir, n):
    sclang = require_program("sclang", "supercollider-language")
    start, swap = CASES[n]
    first = int(start[1:])
    with running_server(tmp_path, "--models-dir", str(wide_models_dir), "--model", start) as srv:
        client = sc_client_for(srv, tmp_path, poll_seconds=0.25)
        swap_cmd = "nil" if swap is None else sc_string(shlex.join([sys.executable, "-c", (
            "from pythonosc.udp_client import SimpleUDPClient; "
            f"SimpleUDPClient('127.0.0.1', {srv.port}).send_message('/model', {swap!r})")]))
        harness = tmp_path / "harness.scd"
        harness.write_text(
            SC_DIMS_HARNESS.replace("%CLIENT%", str(client)).replace("%NO_SCSYNTH%", str(tmp_path / "no-such-scsynth"))
            .replace("%SWAP_SECONDS%", str(SWAP_SECONDS)).replace("%BURST%", str(BURST))
            .replace("%VALUES%", "[" + ", ".join(map(str, VALUES)) + "]")
            .replace("%FIRST%", str(first)).replace("%N%", str(n)).replace("%SWAP%", swap_cmd))
        out = run_client([sclang, str(harness)], timeout=CLIENT_TIMEOUT + SWAP_SECONDS, env=sclang_env())
    assert "server error" not in out, f"the server refused something the window sent:\n{out}"
    assert_line(rf"^Antiphon: the model plays {n} values per event$", out, "the window should post N")
    assert_line(rf"^HARNESS DIMS MODEL values: N = {n} ROWS {n} {n}$", out, "both rows rebuilt at N")
    tail = out[out.rindex(f"HARNESS DIMS MODEL values: N = {n} "):]
    rows = re.findall(r"^HARNESS PREDICTION (.*)$", tail, re.MULTILINE)
    answers = [[float(v) for v in row.split()[:n]] for row in rows]
    assert_n_values(answers, n, "answers to the window's N values", out)
    shown = [float(v) for v in assert_line(r"^HARNESS SHOWN (.*)$", tail, "the model's row").group(1).split()]
    assert len(shown) == n and shown == pytest.approx(answers[-1], abs=1e-3), f"the model's row shows {shown}:\n{out}"


def test_max_patch_follows_n_from_model_dims_and_status_and_sends_and_shows_n_values():
    """Structure only (Max does not run here): /model/dims N and /status's dims pair (pushed to
    udpreceive by its /subscribe status) set the size of both multisliders and the number of a
    /prediction's values the model's one shows; yours is sent as /gesture v1 .. vN."""
    boxes, lines = max_boxes_and_lines()
    cords = {(ln["source"][0], ln["source"][1], ln["destination"][0], ln["destination"][1]) for ln in lines}
    by_text = {b.get("text"): bid for bid, b in boxes.items() if b.get("text")}

    def fed(dst: str, inlet: int = 0) -> set[str]:
        return {boxes[s].get("text", boxes[s]["maxclass"]) for s, _, d, i in cords if (d, i) == (dst, inlet)}

    route = next(bid for bid, b in boxes.items() if b.get("text", "").startswith("route /prediction"))
    selectors = boxes[route]["text"].split()[1:]
    out = {sel: {(d, i) for s, o, d, i in cords if (s, o) == (route, k)} for k, sel in enumerate(selectors)}
    udpsend = by_text["udpsend 127.0.0.1 5710"]
    assert (by_text["/subscribe status 5711"], 0, udpsend, 0) in cords, "no /subscribe status to udpsend"
    assert (by_text["zl iter 2"], 0) in out["/status"]
    assert fed(by_text["change"]) == {"route dims", boxes[route]["text"]}, "N from /status and /model/dims"
    assert (by_text["change"], 0) in out["/model/dims"]
    size = by_text["size $1"]
    sliders = sorted(d for s, _, d, _ in cords if s == size)
    assert [boxes[b]["maxclass"] for b in sliders] == ["multislider", "multislider"], "size $1 should resize both"
    yours = [b for b in sliders if (b, 0, by_text["prepend /gesture"], 0) in cords]
    assert len(yours) == 1 and (by_text["prepend /gesture"], 0, udpsend, 0) in cords, "yours -> /gesture -> udpsend"
    model = next(b for b in sliders if b not in yours)
    assert boxes[model].get("ignoreclick") == 1
    assert (by_text["zl slice 2"], 0) in out["/prediction"] and (by_text["zl slice 2"], 0, model, 0) in cords
    assert "t i i" in fed(by_text["zl slice 2"], 1), "the slice point (N) comes from the dims"


# Two drawings of your 3 values, half a second apart, with step 6's live toggle on.
PD_LIVE_HELPER = """#N canvas 0 0 500 300 12;
#X obj 20 20 loadbang;
#X obj 20 45 del 300;
#X msg 20 70 0.25 0.5 0.75;
#X obj 20 200 array set antiphon-you-values;
#X obj 200 45 del 800;
#X msg 200 70 0.125 0.5 0.75;
#X connect 0 0 1 0;
#X connect 1 0 2 0;
#X connect 2 0 3 0;
#X connect 0 0 4 0;
#X connect 4 0 5 0;
#X connect 5 0 3 0;
"""


def test_pd_patch_live_sends_your_values_each_time_they_change(tmp_path):
    """Step 6's live toggle (against a fake server, N = 3 as if from /model/dims): each new
    drawing goes out once as /gesture v1 v2 v3, and nothing while it stays the same."""
    pd = require_program("pd", "puredata-core")
    fake, _, cmd = pd_patch_with_fake_server(tmp_path, pd, PD_LIVE_HELPER, "-send", "antiphon-dims 3",
                                             "-send", "antiphon-values-live 1")
    fake.settimeout(15)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    try:
        got = fake_received(fake, lambda got: sum(address == "/gesture" for address, _ in got) >= 2)
    finally:
        out = lines.stop()
        fake.close()
    gestures = [args for address, args in got if address == "/gesture"]
    # the helper's second drawing comes 500 ms after the first: a repeat would have come between
    assert gestures == [[0.25, 0.5, 0.75], [0.125, 0.5, 0.75]], f"live sent {gestures}:\n{out}"
