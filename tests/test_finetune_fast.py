"""`fine_tune` around its fit, on a tiny untrained parent: fast, because the fit is a stand-in.

Keras' fit is the one costly part (tests/fast.py skips a test that runs it), so a stand-in
takes its place: it receives exactly what the real fit would (the model, the windows, the
budget, the settings, the progress reporter), calls the reporter as Keras would, and hands
back chosen "best" weights. Everything else is the real code: reading the parent, cutting
phrases and holding out the last, the budget, the gate, the lineage in `model.json`, and
(in the first tests) the real conversion, scoring and export of the tiny network.

What a performer relies on: a fine-tune is kept only if it is better on the held-out
phrases; it never touches its parent; the kept model records where it came from; it
keeps to its time budget and reports progress as a fraction of it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from server.learn import finetune
from server.learn.data import Dataset, DatasetError
from tests.tinynet import export_tiny, performance


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A tiny exported model, `parent`: the model every fine-tune here starts from (and must not touch)."""
    return export_tiny(tmp_path_factory.mktemp("finetune") / "parent")


def session(n: int = 150, seed: int = 3) -> np.ndarray:
    """A performer stream: phrases of 30 events with pauses over 1 s between them."""
    events = performance(n, seed)
    events[30::30, 0] = 1.5
    return events


def split(events: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What fine_tune trains on and holds out, worked out here from the README's rules."""
    return finetune.hold_out_last([p for p in finetune.phrases(events) if len(p) >= 2])


class Clock:
    """`time.monotonic` for fine_tune: moves only when a stand-in moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def tune(monkeypatch: pytest.MonkeyPatch, parent: Path, tmp_path: Path):
    """``tune(events, seconds, scores=None, ...)``: run `fine_tune` on ``parent`` with a stand-in fit.

    ``scores``: (before, after) figures standing in for the held-out scoring, conversion and
    export (recorded instead); None runs the real ones, and ``better_by`` then takes that
    much off the fine-tuned model's real figure (run.real keeps the real ones). ``best``: "nudged" (the parent's
    weights moved a little), "parent" (unchanged) or None (no epoch finished). Returns
    (result, run): run records what the stand-ins saw.
    """
    from server.learn import evaluate
    from server.learn.evaluate import Scores
    from server.learn.train import BestWeights
    from server.model import export as export_module

    clock = Clock()
    monkeypatch.setattr(finetune, "time", SimpleNamespace(monotonic=clock.monotonic))
    run = SimpleNamespace(clock=clock, fit=None, progress=[], scored=[], steps=[], converted=[], exported=[],
                          best=None, last=None, real=[])

    def make(events=None, seconds: float = 100.0, scores=None, best="nudged", interrupted=False, better_by=0.0,
             during=None, **kwargs):
        def fit(model, train_w, held_w, norm, budget, cfg, extra):
            run.fit = SimpleNamespace(model=model, train_w=train_w, held_w=held_w, norm=norm, budget=budget, cfg=cfg,
                                      extra=extra, learning_rate=float(np.asarray(model.optimizer.learning_rate)))
            reporter, stopper = extra
            reporter.on_train_begin({}, model)
            clock.now += budget / 4
            reporter.on_epoch_end(0, {"loss": 1.0, "val_loss": 0.5}, model)
            model.stop_training = False
            if during is not None:
                during()  # e.g. /learn/stop's flag set between the epochs
            stopper.on_train_batch_end(0, {}, model)
            run.stopped_by_flag = model.stop_training
            clock.now += budget  # the second epoch overran: reported as the whole budget
            reporter.on_epoch_end(1, {"loss": 0.75, "val_loss": 0.25}, model)
            weights = model.get_weights()
            out = BestWeights()
            out.history = {"loss": [1.0, 0.75], "val_loss": [0.5, 0.25], "lr": [3e-3, 3e-3]}
            if best == "nudged":
                out.weights = [w + 0.01 for w in weights]
            elif best == "parent":
                out.weights = weights
            run.best = out.weights
            run.last = [w - 0.5 for w in weights]
            model.set_weights(run.last)  # the last epoch's weights, worse than the best
            return out, interrupted

        real_score, real_step_for = evaluate.score, evaluate.step_for
        figures = iter(scores or ())

        def score(step, info, ds):
            clock.now += 2.0  # scoring takes time, which the budget and the result account for
            run.scored.append((step, info, ds))
            if scores is None:
                real = real_score(step, info, ds)
                run.real.append(real)
                return replace(real, dequantised=real.dequantised - better_by) if len(run.real) == 2 else real
            value = next(figures)
            return Scores(value + 0.5, value, 7, 1)

        def step_for(tflite, info, model):
            run.steps.append((tflite, info, model))
            return real_step_for(tflite, info, model) if scores is None else object()

        real_convert = export_module.convert_to_tflite

        def convert(model, spec):
            run.converted.append(real_convert(model, spec) if scores is None else b"converted")
            return run.converted[-1]

        def export(model, info, folder, check_events, tflite=None):
            run.exported.append(SimpleNamespace(model=model, info=info, folder=folder, check_events=check_events,
                                                tflite=tflite, weights=model.get_weights()))
            return folder

        monkeypatch.setattr(finetune, "fit_within", fit)
        monkeypatch.setattr(evaluate, "score", score)
        monkeypatch.setattr(evaluate, "step_for", step_for)
        monkeypatch.setattr(export_module, "convert_to_tflite", convert)
        if scores is not None:
            monkeypatch.setattr(export_module, "export", export)
        started = clock.now
        result = finetune.fine_tune(parent, [session() if events is None else events], seconds, tmp_path / "models",
                                    "child", progress=lambda fraction, nll: run.progress.append((fraction, nll)),
                                    **kwargs)
        run.elapsed = clock.now - started
        return result, run

    return make


# --------------------------------------------------------------------------- the real path around the fit


def test_a_better_fine_tune_is_written_with_its_lineage_and_the_parent_is_untouched(tune, parent: Path, tmp_path) -> None:
    from server.model.files import read_info, read_model
    from server.model.network import load_keras_model

    before_files = {p.name: p.read_bytes() for p in parent.iterdir()}
    result, run = tune(seconds=100.0, lineage={"session_logs": ["a.csv"]}, seed=5, better_by=1.0)
    before, after = run.real[0].dequantised, run.real[1].dequantised - 1.0
    folder = tmp_path / "models" / "child"
    assert result == finetune.FineTuneResult("child", before, after, True, run.fit.train_w.events,
                                             run.fit.held_w.events, run.elapsed, 2, False)
    parent_info = read_info(parent)
    info = read_model(folder, ("model.keras", "step.tflite")).info  # hashes and all
    doc = json.loads((folder / "model.json").read_text())
    assert doc["lineage"] == {"parent": "parent", "parent_files": parent_info.files, "session_logs": ["a.csv"],
                              "events_train": result.events_train, "events_held_out": result.events_held_out,
                              "held_out_nll_before": before, "held_out_nll_after": after}
    assert info.spec == parent_info.spec and info.normaliser == parent_info.normaliser
    assert (folder / "step.tflite").read_bytes() == run.converted[0] and len(run.converted) == 1  # judged = written
    for got, best in zip(load_keras_model(folder / "model.keras").get_weights(), run.best):
        np.testing.assert_allclose(got, best, atol=1e-6)  # the best epoch's weights, not the last
    assert {p.name: p.read_bytes() for p in parent.iterdir()} == before_files


def test_without_litert_the_fine_tune_is_judged_with_the_tensorflow_step(tune, monkeypatch, tmp_path) -> None:
    """A fine-tune that changed nothing scores exactly as its parent: equal is not better, nothing is written."""
    from server.learn import evaluate

    monkeypatch.setattr(evaluate, "litert_available", lambda: False)
    result, run = tune(best="parent", interrupted=True)
    assert result.nll_before == result.nll_after and math.isfinite(result.nll_before)
    assert result == finetune.FineTuneResult("parent", result.nll_before, result.nll_before, False,
                                             run.fit.train_w.events, run.fit.held_w.events, run.elapsed, 2, True)
    assert [model is run.fit.model for _, _, model in run.steps] == [True, True]
    assert not (tmp_path / "models").exists()


# --------------------------------------------------------------------------- the gate and the figures (stand-in scores)


def test_the_gate_passes_what_it_judged_to_export(tune, parent: Path, tmp_path) -> None:
    from server.model.export import library_versions
    from server.model.files import read_model

    events = session()
    train, held = split(events)
    result, run = tune(events, seconds=100.0, scores=(-1.0, -1.5), lineage={"session_logs": ["s.csv"]}, seed=5,
                       interrupted=True)  # stopped early (Ctrl-C), but better: kept, and it says so
    assert result == finetune.FineTuneResult("child", -1.0, -1.5, True, run.fit.train_w.events, run.fit.held_w.events,
                                             run.elapsed, 2, True)
    (out,) = run.exported
    assert out.folder == tmp_path / "models" / "child" and out.tflite == b"converted" == run.converted[0]
    for got, best in zip(out.weights, run.best):
        np.testing.assert_array_equal(got, best)
    norm = read_model(parent, ()).info.normaliser
    np.testing.assert_allclose(out.check_events, norm.forward(Dataset.from_performances(held).events))
    info = out.info
    assert info.lineage == {"parent": "parent", "parent_files": read_model(parent, ()).info.files,
                            "session_logs": ["s.csv"], "events_train": result.events_train,
                            "events_held_out": result.events_held_out, "held_out_nll_before": -1.0,
                            "held_out_nll_after": -1.5}
    assert (info.validation_nll, info.validation_nll_dequantised) == (-1.0, -1.5)  # raw, dequantised
    assert info.versions == library_versions()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", info.created)
    assert info.dataset_sha256 == Dataset.from_performances(train).sha256()
    assert info.sequence_length == 24
    training = info.training
    assert training["seconds"] == round(run.elapsed, 1) and training["minutes_budget"] == 100.0 / 60
    assert training["validation_performances"] == [] and training["seed"] == 5
    assert (training["loss"], training["val_loss"], training["epochs_run"]) == ([1.0, 0.75], [0.5, 0.25], 2)
    # the figures: the parent's step on its own bytes, the new one on the converted bytes, both on the held-out phrases
    (parent_step, parent_info, model0), (new_step, new_info, model1) = run.steps
    assert parent_step == read_model(parent).file("step.tflite") and parent_info == read_model(parent).info
    assert new_step == b"converted" and new_info.spec == parent_info.spec and new_info.normaliser == parent_info.normaliser
    assert model0 is model1 is run.fit.model
    for _, scored_info, ds in run.scored:
        np.testing.assert_array_equal(ds.events, Dataset.from_performances(held).events)
    assert [i for _, i, _ in run.scored] == [parent_info, new_info]


@pytest.mark.parametrize("after", [-1.0, -0.999, math.nan])
def test_a_fine_tune_no_better_than_its_parent_is_not_kept(tune, after: float) -> None:
    result, run = tune(scores=(-1.0, after), interrupted=True)
    assert result.model == "parent" and not result.better and run.exported == []
    assert result.nll_before == -1.0 and (result.nll_after == after or math.isnan(after) and math.isnan(result.nll_after))
    assert (result.events_train, result.events_held_out) == (run.fit.train_w.events, run.fit.held_w.events)
    assert (result.seconds, result.epochs, result.interrupted) == (run.elapsed, 2, True)


def test_a_fine_tune_that_finished_no_epoch_keeps_the_parent_without_converting(tune) -> None:
    result, run = tune(scores=(-1.0,), best=None, interrupted=True)
    assert result == finetune.FineTuneResult("parent", -1.0, math.inf, False, run.fit.train_w.events,
                                             run.fit.held_w.events, run.elapsed, 0, True)
    assert run.converted == [] and run.exported == []


def test_a_stop_asked_before_the_fit_trains_nothing_and_keeps_the_parent(tune) -> None:
    import threading

    asked = threading.Event()
    asked.set()
    result, run = tune(scores=(3.0,), stop=asked)
    assert run.fit is None and run.converted == [] and run.exported == []
    assert (result.model, result.better, result.epochs, result.interrupted) == ("parent", False, 0, True)


def test_a_stop_asked_during_the_fit_ends_it_at_the_next_batch_and_still_judges_the_best_epoch(tune) -> None:
    import threading

    asked = threading.Event()
    result, run = tune(scores=(3.0, 2.0), stop=asked, during=asked.set)
    assert run.stopped_by_flag is True  # Keras is told to stop training at the batch's end
    assert result.better and result.model == "child" and result.interrupted  # the fit itself said not interrupted
    result, run = tune(scores=(3.0, 2.0), stop=threading.Event())
    assert run.stopped_by_flag is False and not result.interrupted


def test_the_fit_gets_the_parents_model_the_phrases_and_the_fine_tune_settings(tune, parent: Path) -> None:
    from server.model.files import read_model

    events = session()
    train, held = split(events)
    _, run = tune(events, seconds=100.0, scores=(-1.0, -1.5))
    fit = run.fit
    cfg = fit.cfg
    assert cfg.init_from == parent and cfg.seed == 0  # the default seed: the same session tunes the same way
    assert (cfg.learning_rate, cfg.sequence_length, cfg.stride, cfg.batch_size, cfg.patience) == (3e-3, 24, 1, 16, 40)
    assert cfg.minutes == 100.0 / 60
    assert fit.learning_rate == pytest.approx(3e-3)  # what the optimizer was compiled with
    assert fit.norm == read_model(parent, ()).info.normaliser
    assert fit.train_w.events == sum(len(p) - 1 for p in train) and fit.held_w.events == sum(len(p) - 1 for p in held)
    assert fit.train_w.performances == len(train) and fit.held_w.performances == len(held)
    assert fit.train_w.data.shape[1] == 25  # windows of 24 events and the next
    assert [type(c) for c in fit.extra] == [finetune._Reporter, finetune.StopWhenAsked]


def test_the_fit_gets_what_is_left_of_the_budget_after_the_reserve(tune) -> None:
    """100 s: 4 s reserved for judging and writing, 5 % for the rest, and the 2 s already spent scoring the parent."""
    _, run = tune(seconds=100.0, scores=(-1.0, -1.5))
    assert run.fit.budget == pytest.approx(100.0 - 4.0 - 5.0 - 2.0)
    _, run = tune(seconds=5.0, scores=(-1.0, -1.5))
    assert run.fit.budget == 1.0  # at least a second, however short the request


def test_progress_is_the_fraction_of_the_budget_and_the_held_out_nll_in_original_units(tune, parent: Path) -> None:
    from server.model.files import read_model

    events = session()
    _, held = split(events)
    norm = read_model(parent, ()).info.normaliser
    jacobian = float(np.mean(norm.log_jacobian(np.concatenate([p[1:] for p in held]))))
    assert abs(jacobian) > 0.1  # the correction matters
    _, run = tune(events, scores=(-1.0, -1.5))
    # first the parent's own held-out figure (before any epoch), then one figure an epoch
    assert run.progress == [(0.0, -1.0), (pytest.approx(0.25), pytest.approx(0.5 - jacobian)),
                            (1.0, pytest.approx(0.25 - jacobian))]


def test_an_epoch_without_a_validation_figure_reports_nan() -> None:
    seen = []
    reporter = finetune._Reporter(lambda fraction, nll: seen.append((fraction, nll)), 10.0, 0.5)
    reporter.on_train_begin({}, None)
    reporter.on_epoch_end(0, {"loss": 1.0}, None)
    ((fraction, nll),) = seen
    assert 0.0 <= fraction < 0.5 and math.isnan(nll)


def test_a_fine_tune_needs_100_performer_events_in_phrases_of_two_or_more(tune) -> None:
    pairs = np.concatenate([performance(2, seed=i) for i in range(50)])  # 100 events, phrases of 2
    pairs[2::2, 0] = 1.5
    result, _ = tune(pairs, scores=(-1.0, -1.5))
    assert result.events_train + result.events_held_out == 50  # one predicted event a phrase
    lone = np.concatenate([pairs, performance(1, seed=99)])  # a phrase of one event does not count
    lone[-1, 0] = 1.5
    with pytest.raises(DatasetError, match=r"^too few performer events to learn from: 98; play at least 100$"):
        tune(lone[2:], scores=(-1.0, -1.5))


# --------------------------------------------------------------------------- phrases and the hold-out, at their edges


def test_a_phrase_ends_at_a_pause_over_1_s_even_after_the_first_event() -> None:
    events = performance(5).astype(np.float64)
    events[1, 0] = 1.5  # a pause right after the first event
    events[3, 0] = 1.0  # exactly 1 s is not over 1 s
    parts = finetune.phrases(events)
    assert [len(p) for p in parts] == [1, 4] and all(p.dtype == np.float32 for p in parts)
    assert parts[1][0, 0] == 0.0 and parts[1][2, 0] == np.float32(1.0)


@pytest.mark.parametrize("lengths, cut", [((10,), 8), ((4,), 2), ((10, 1), 8)])
def test_when_the_held_out_share_takes_every_phrase_the_first_taken_is_split(lengths, cut) -> None:
    """Too few phrases: the earliest phrase held out is cut so that about a fifth (at least 2 events) is held out."""
    perfs = [performance(n, seed=n).astype(np.float32) for n in lengths]
    for perf in perfs:
        perf[0, 0] = 0.7
    rest, held = finetune.hold_out_last(perfs)
    first = perfs[0]
    assert len(rest) == 1 and np.array_equal(rest[0], first[:cut])
    tail = first[cut:].copy()
    tail[0, 0] = 0.0  # the held-out part starts afresh
    assert np.array_equal(held[0], tail) and all(np.array_equal(a, b) for a, b in zip(held[1:], perfs[1:]))
    assert len(held) == len(lengths)
