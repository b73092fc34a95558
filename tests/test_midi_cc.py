"""`--midi-cc`: a bank of knobs is a performance of any width, a control change per value in and out.

In-memory ports (CI has no devices) on a virtual loop, wired as `serve` wires them;
the flag and TOML key through the config parser; a list of the wrong length refused
at start-up by the CLI.
"""

from __future__ import annotations

import subprocess
import sys

import mido
import pytest

from server.config import ConfigError, RunConfig
from server.live.engine import Settings
from server.live.modes import Mode
from server.midi import mapping as midimap
from server.midi.link import open_midi
from server.model.predictor import Predictor
from tests.rig import build_engine
from tests.test_midi import REPO, MemoryBackend, MidiLoop, resolve

M = mido.Message
KNOBS = (1, 2, 7, 10, 20, 21, 22, 23)  # eight knobs: IMPSY's 9-d controller (dt and 8 values)


def test_a_control_change_per_value_keeps_each_knobs_last_value():
    knobs = midimap.make_input_map("notes", ccs=(1, 2, 7, 10))
    assert knobs(M("control_change", control=7, value=127)) == (0.0, 0.0, 1.0, 0.0)
    assert knobs(M("control_change", control=10, value=0)) == (0.0, 0.0, 1.0, 0.0)  # first move of a knob plays
    assert knobs(M("control_change", control=10, value=0)) is None  # unchanged: no event
    assert knobs(M("control_change", control=1, value=64)) == (64 / 127, 0.0, 1.0, 0.0)
    assert knobs(M("control_change", control=3, value=5)) is None and knobs(M("note_on", note=60)) is None
    assert midimap.controls_for((0.0, 64 / 127, 1.0, 1.2)) == [0, 64, 127, 127]


@pytest.mark.parametrize(("ccs", "reason"), [((), "give 1 to 16"), (tuple(range(17)), "give 1 to 16"),
                                             ((1, 2, 1), "repeats one"), ((1, 128), "0-127")])
def test_a_cc_list_must_be_1_to_16_distinct_numbers(ccs, reason):
    with pytest.raises(ValueError, match=reason):
        midimap.check_ccs(ccs)


def test_the_flag_and_the_toml_key(tmp_path):
    assert resolve().midi_cc == ()
    assert resolve("--midi-cc", "1,2,7,10").midi_cc == (1, 2, 7, 10)
    assert resolve("--midi-cc", ",".join(map(str, range(16)))).midi_cc == tuple(range(16))  # 16: the most
    config = tmp_path / "knobs.toml"
    config.write_text("midi-cc = [1, 2, 7, 10, 20, 21, 22, 23]\n")
    assert resolve("--config", str(config)).midi_cc == KNOBS
    for bad, reason in (("1,2,x", "expected an integer"), (",".join(map(str, range(17))), "give 1 to 16"),
                        ("1,1", "repeats one"), ("1,200", "0-127")):
        with pytest.raises(ConfigError, match=reason):
            resolve("--midi-cc", bad)


def test_eight_knobs_play_an_eight_value_model_and_it_answers_on_eight_controllers(wide_models_dir):
    loop = MidiLoop()
    predictor = Predictor.load(wide_models_dir / "n8")
    backend = MemoryBackend(inputs=("Knobs",), outputs=("Synth",))
    link = open_midi(loop, RunConfig(midi_in="Knobs", midi_out="Synth", midi_cc=KNOBS, midi_channel=3),
                     None, backend)  # type: ignore[arg-type]
    engine, played = build_engine(loop, predictor, Settings(mode=Mode.ACCOMPANY, timescale=0.01),
                                  sinks=(link.output,), models_dir=wide_models_dir, model_name="n8")
    link.listen(engine.perform)
    synth = backend.last("Synth")
    synth.clock = loop.time
    knobs = backend.last("Knobs")
    for i, cc in enumerate(KNOBS):
        knobs.play(M("control_change", control=cc, value=10 * i))
        loop.advance(0.1)
    heard = [e.values for e in played.events if e.source == "performer"]
    assert len(heard) == 8 and heard[-1] == tuple(10 * i / 127 for i in range(8))
    answers = [e for e in played.events if e.source == "model"]
    sent = [m for m in synth.messages if m.type == "control_change"]
    assert len(answers) == 8 and len(sent) == 8 * 8 and {m.channel for m in sent} == {2}
    assert [m.control for m in sent[:8]] == list(KNOBS)
    assert [m.value for m in sent[-8:]] == midimap.controls_for(answers[-1].values)
    assert not any(m.type == "note_on" for m in synth.messages)
    assert link.counts()["midi_in_events"] == 8 and link.counts()["midi_out_notes"] == 8
    assert "out 'Synth' CC 1,2,7,10,20,21,22,23 channel 3" in link.describe()

    engine.load_model("n2")  # another width: the knobs no longer fit, counted, never guessed at
    loop.advance(0.5)
    knobs.play(M("control_change", control=1, value=99))
    loop.advance(0.1)
    engine.perform(0.5, 0.5)
    loop.advance(0.5)
    counts = link.counts()
    assert counts["midi_in_refused"] == 1 and counts["midi_in_events"] == 8
    assert counts["midi_out_unplayable"] >= 1 and counts["midi_out_notes"] == 8
    link.close()


def test_notes_play_only_a_two_value_model(wide_models_dir):
    loop = MidiLoop()
    backend = MemoryBackend(inputs=("Keys",), outputs=("Synth",))
    link = open_midi(loop, RunConfig(midi_in="Keys", midi_out="Synth"), None, backend)  # type: ignore[arg-type]
    engine, played = build_engine(loop, Predictor.load(wide_models_dir / "n3"), Settings(mode=Mode.ACCOMPANY),
                                  sinks=(link.output,))
    link.listen(engine.perform)
    backend.last("Keys").play(M("note_on", note=60, velocity=100))
    engine.perform(0.1, 0.2, 0.3)
    loop.advance(1.0)
    counts = link.counts()
    assert counts["midi_in_refused"] == 1 and counts["midi_out_unplayable"] == 1 and counts["midi_out_notes"] == 0
    link.close()


def test_a_cc_list_of_another_length_than_the_models_values_stops_the_start(wide_models_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "server", "run", "--models-dir", str(wide_models_dir), "--model", "n8",
                          "--midi-cc", "1,2,7,10", "--port", "0", "--log-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "midi_cc lists 4 controllers but model 'n8' plays 8 values per event" in run.stderr + run.stdout
    assert not list(tmp_path.glob("*.csv"))  # refused before anything started
