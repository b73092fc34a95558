"""Training, export and the export check, on a tiny model trained for a few epochs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from server.learn import data
from server.learn.synth import synthetic_dataset
from server.model.spec import SIZES, ModelError, ModelSpec
from server.model.files import read_info


def test_sizes_follow_design():
    assert SIZES == {"xs": (32, 2), "s": (64, 2), "m": (128, 2), "l": (256, 2)}
    assert ModelSpec.of_size("s").mixtures == 5


def test_short_training_lowers_loss_and_writes_model_folder(tiny_model):
    folder, result = tiny_model
    assert result.history["loss"][-1] < result.history["loss"][0]
    assert result.history["val_loss"][-1] < result.history["val_loss"][0]
    for name in ("model.keras", "step.tflite", "model.json", "report.png"):
        assert (folder / name).is_file(), name
    doc = json.loads((folder / "model.json").read_text())
    for key in ("spec", "normalisation", "sequence_length", "validation_nll_per_event", "dataset_sha256", "versions", "created"):
        assert key in doc, key
    assert doc["spec"]["units"] == 32 and doc["sequence_length"] == 50
    assert re.fullmatch(r"[0-9a-f]{64}", doc["dataset_sha256"])
    assert doc["export_check"]["max_abs_diff"] <= 1e-4
    assert np.isfinite(doc["validation_nll_per_event"])


def test_keras_and_tflite_steps_agree_after_export(tiny_model, tiny_dataset):
    from server.model.litert import LiteRTStep
    from server.model.network import TensorFlowStep, load_keras_model

    folder, _ = tiny_model
    info = read_info(folder)
    lite = LiteRTStep((folder / "step.tflite").read_bytes(), info.spec)
    tf_step = TensorFlowStep(load_keras_model(folder / "model.keras"), info.spec)
    z = info.normaliser.forward(tiny_dataset.performances[0][:200])
    s1 = s2 = np.zeros((1, info.spec.state_size), np.float32)
    worst = 0.0
    for t in range(len(z)):
        p1, s1 = lite(z[t : t + 1], s1)
        p2, s2 = tf_step(z[t : t + 1], s2)
        worst = max(worst, float(np.abs(p1 - p2).max()))
    assert worst <= 1e-4


def test_export_refuses_a_tflite_that_does_not_match(tiny_model, tmp_path, monkeypatch):
    from server.model import export as export_mod
    from server.model.network import build_model, load_keras_model

    folder, _ = tiny_model
    info = read_info(folder)
    keras_model = load_keras_model(folder / "model.keras")
    other = build_model(info.spec)  # same shape, different (random) weights
    wrong = export_mod.convert_to_tflite(other, info.spec)
    monkeypatch.setattr(export_mod, "convert_to_tflite", lambda m, s: wrong)
    with pytest.raises(ModelError, match="differs"):
        export_mod.export(keras_model, info, tmp_path / "broken", np.zeros((200, 3), np.float32) + 0.3)
    assert not (tmp_path / "broken").exists()
    assert not list(tmp_path.iterdir()), "no partial folder left behind"


def test_validation_nll_is_the_evaluate_figure(tiny_model, tiny_dataset, tmp_path, capsys):
    from server.cli import main

    folder, result = tiny_model
    _, val, _ = data.split_performances(tiny_dataset, 0.15, seed=3)
    path = data.save_dataset(val, tmp_path / "val.npz")
    assert main(["evaluate", "--model", str(folder), "--data", str(path)]) == 0
    printed = float(re.search(r": (-?[0-9.]+) nats per event", capsys.readouterr().out).group(1))
    assert printed == pytest.approx(read_info(folder).validation_nll, abs=1e-3)
    assert printed == pytest.approx(result.validation_nll, abs=1e-3)


def test_evaluate_reports_a_clear_error_for_a_missing_model(tmp_path, capsys):
    from server.cli import main

    ds = data.save_dataset(synthetic_dataset(2, 0, 2), tmp_path / "d.npz")
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(ds)]) == 1
    assert "no model folder" in capsys.readouterr().err


def test_cli_synth_then_train_end_to_end(tmp_path, capsys):
    from server.cli import main

    ds = tmp_path / "syn.npz"
    assert main(["synth", "--performances", "6", "--phrases", "4", "--seed", "2", "--out", str(ds)]) == 0
    args = ["train", "--data", str(ds), "--size", "xs", "--name", "cli", "--models-dir", str(tmp_path), "--epochs", "1", "--no-report"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch    1 " in out and "held-out NLL" in out and "held out for validation (performances" in out
    # one scale: the epoch's held-out figure is nats per event like the final one (not a normalised loss)
    epoch = float(re.search(r"NLL nats/event: train \S+  held-out (\S+) \(best", out).group(1))
    final = float(re.search(r"held-out NLL (\S+) nats/event", out).group(1))
    print(f"epoch {epoch}, final {final}")
    assert abs(epoch - final) < 0.5, (epoch, final)
    assert (tmp_path / "cli" / "step.tflite").is_file() and not (tmp_path / "cli" / "report.png").exists()
    assert main(["train", "--data", str(ds), "--name", "../evil", "--models-dir", str(tmp_path)]) == 1
