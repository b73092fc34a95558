"""Small live-path edges, in this process: a broken output sink, `/learn/stop` on an engine, model
folders described and read, and a normaliser's own account of its dimensions."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from server.event import Event
from server.live.controls import ControlError
from server.live.outputs import LOGGED_FAILURES, Outputs
from server.model.files import read_info, read_model, sha256_file
from server.model.normalise import Normaliser
from server.model.spec import ModelError
from tests.rig import REPO, VirtualLoop, build_engine

DEFAULT = REPO / "models" / "default"


# --------------------------------------------------------------------------- outputs


class Broken:
    def emit(self, event: Event) -> None:
        raise RuntimeError("unplugged")

    def silence(self, voice: int | None) -> None:
        raise RuntimeError("unplugged")


class Kept:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.silenced: list[int | None] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def silence(self, voice: int | None) -> None:
        self.silenced.append(voice)


def test_a_broken_sink_is_counted_every_time_and_logged_only_the_first_ten(caplog) -> None:
    assert LOGGED_FAILURES == 10
    counts = {"sink_errors": 0}
    kept = Kept()
    outputs = Outputs([Broken(), kept], counts)
    event = Event(0.5, (0.25, 1.0), "model")
    with caplog.at_level(logging.ERROR, logger="server.live.outputs"):
        for i in range(7):
            outputs.emit(event)
        assert counts["sink_errors"] == 7 and len(kept.events) == 7
        for voice in (None, 1, 2, 3, 4, 5):
            outputs.silence(voice)
    assert counts == {"sink_errors": 13}
    assert kept.silenced == [None, 1, 2, 3, 4, 5]
    records = [r for r in caplog.records if r.name == "server.live.outputs"]
    assert [r.getMessage() for r in records] == ["output sink failed"] * 7 + ["output silencer failed"] * 3
    assert all(r.levelno == logging.ERROR and r.exc_info is not None for r in records)


# --------------------------------------------------------------------------- /learn/stop on an engine


class StopSpy:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1

    def status(self) -> dict:
        return {}


@pytest.fixture(scope="module")
def predictor():
    from server.model.predictor import Predictor

    return Predictor.load(DEFAULT)


def test_learn_stop_without_a_learner_is_refused_and_with_one_is_passed_on(predictor) -> None:
    engine, _ = build_engine(VirtualLoop(), predictor)
    with pytest.raises(ControlError) as refused:
        engine.stop_learning()
    assert str(refused.value) == "learning is not available in this server"
    spy = StopSpy()
    engine, _ = build_engine(VirtualLoop(), predictor, learner=spy)
    engine.stop_learning()
    engine.stop_learning()
    assert spy.stops == 2


# --------------------------------------------------------------------------- model files


def test_read_info_reads_model_json_alone(tmp_path: Path) -> None:
    folder = tmp_path / "described"
    folder.mkdir()
    shutil.copy(DEFAULT / "model.json", folder / "model.json")  # no model files beside it
    info = read_info(folder)
    assert info == read_model(DEFAULT).info
    with pytest.raises(ModelError):
        read_model(folder)  # the step model is missing: read_info did not ask for it


def test_read_info_names_the_model_as_told(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelError) as named:
        read_info(missing, label="nowhere-model")
    assert str(named.value) == "nowhere-model does not exist; train it first (antiphon train --name NAME)"
    with pytest.raises(ModelError) as pathed:
        read_info(missing)
    assert str(pathed.value) == f"{missing} does not exist; train it first (antiphon train --name NAME)"


def test_sha256_file_is_the_files_digest(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert sha256_file(str(path)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # type: ignore[arg-type]
    step = DEFAULT / "step.tflite"
    assert sha256_file(step) == hashlib.sha256(step.read_bytes()).hexdigest()
    assert sha256_file(step) == json.loads((DEFAULT / "model.json").read_text())["files"]["step.tflite"]


# --------------------------------------------------------------------------- a normaliser's dimensions


def normaliser(grid, constant, scale=(1.0, 1.0, 1.0)) -> Normaliser:
    n = len(grid)
    return Normaliser(shift=(0.0,) * n, scale=tuple(scale), log=(True,) + (False,) * (n - 1),
                      offset=(0.001,) + (0.0,) * (n - 1), clip_min=(0.0,) * n, clip_max=(5.0,) + (1.0,) * (n - 1),
                      grid=tuple(grid), constant=tuple(constant))


def test_describe_says_what_each_dimension_is() -> None:
    norm = normaliser((0.0, 1 / 128, 0.0), (None, None, 90 / 127))
    assert norm.describe() == ("dt continuous; x on a grid of 1/128 (dequantised); "
                               "y constant 0.7087 (played back exactly, not modelled)")
    assert normaliser((0.0, 0.0, 0.0), (None, None, None)).describe() == "dt continuous; x continuous; y continuous"
    # a constant is played back exactly even where it sits on a grid; 1/127 in float32 still reads 1/127
    assert normaliser((1 / 64, float(np.float32(1 / 127)), 1 / 1000), (None, 0.25, None)).describe() == (
        "dt on a grid of 1/64 (dequantised); x constant 0.25 (played back exactly, not modelled); "
        "y on a grid of 1/1000 (dequantised)")


def test_describe_covers_only_the_dimensions_there_are() -> None:
    assert normaliser((0.0, 1 / 100), (None, None)).describe() == "dt continuous; x on a grid of 1/100 (dequantised)"
    assert normaliser((0.0, 0.0), (3.0, None)).describe() == "dt constant 3 (played back exactly, not modelled); x continuous"


def test_half_a_cell_in_normalised_units_is_the_dequantisation_noise() -> None:
    norm = normaliser((0.5, 1 / 128, 1 / 64), (None, None, None), scale=(2.0, 0.25, 0.125))
    half = norm.cell_half_width_z()
    assert half.dtype == np.float64 and half.shape == (3,)
    assert half.tolist() == [0.125, 1 / 64, 1 / 16]


def test_continuous_and_constant_dimensions_get_no_noise() -> None:
    norm = normaliser((0.0, 1 / 128, 1 / 64), (None, None, 0.5), scale=(2.0, 0.25, 1.0))
    assert norm.cell_half_width_z().tolist() == [0.0, 1 / 64, 0.0]
    assert normaliser((0.0, 0.0), (None, None)).cell_half_width_z().tolist() == [0.0, 0.0]


def test_learn_without_a_learner_is_refused_saying_so(predictor) -> None:
    engine, _ = build_engine(VirtualLoop(), predictor)
    with pytest.raises(ControlError) as refused:
        engine.learn(30.0)
    assert str(refused.value) == "learning is not available in this server"
