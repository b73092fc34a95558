"""Training: dataset -> windows -> Keras fit within a time budget -> checked export -> report.png.

What a musician should not have to tune is decided here: a time budget that fits the
data (`default_minutes`), a learning rate that halves when validation stalls and settles as
the budget runs out (server.learn.schedule), early
stopping when it has converged, the best weights restored at the end, and Ctrl-C
exporting the best model so far. Validation is on whole performances held out before
anything is fitted, and on quantised data every epoch sees fresh dequantisation noise.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from server.learn.data import DT_MAX, Dataset, DatasetError, split_performances
from server.learn.distribute import Cluster
from server.learn.music import mixtures_for, relative_dims
from server.learn.schedule import EarlyStop, RateSchedule, TimeBudget
from server.learn.shards import ShardedDataset
from server.learn.streaming import ShardedPart, StreamedWindows, split_sharded
from server.learn.windows import Windows, make_windows
from server.model.normalise import DT_OFFSET, Normaliser
from server.model.spec import ModelInfo, ModelSpec

LEARNING_RATE = 3e-3  # Adam's, before the schedule (server.learn.schedule) moves it


@dataclass(frozen=True)
class TrainConfig:
    size: str = "s"
    mixtures: int | None = None  # None: mixtures_for(normaliser): 10 (touch corpus: beat 5 by 0.17 nats/event), 30 for steps
    minutes: float | None = None  # None: default_minutes(events)
    epochs: int = 1000  # an upper bound; the budget and early stopping end training first
    patience: int = 15  # epochs without a better validation figure before stopping
    seed: int = 0
    sequence_length: int = 50
    stride: int = 10
    batch_size: int = 64
    learning_rate: float | None = None  # None: LEARNING_RATE (learning_rate())
    clipnorm: float = 1.0
    dropout: float = 0.0
    val_fraction: float = 0.15
    dt_max: float = DT_MAX
    dt_offset: float = DT_OFFSET
    dequantise: bool = True
    intervals: str = "no"  # "yes": x as the step from the previous event's (music.INTERVALS)
    report: bool = True
    init_from: Path | None = None  # a model folder to start from (fine-tune): its size and normalisation are kept
    cluster: Cluster | None = None  # workers training together (server.learn.distribute); None: this process alone
    data: dict[str, Any] = field(default_factory=dict)  # source and licence, recorded in model.json


@dataclass(frozen=True)
class TrainResult:
    folder: Path | None  # None if interrupted before anything could be exported
    validation_nll: float
    validation_nll_dequantised: float
    epochs_run: int
    seconds: float
    history: dict[str, list[float]]
    interrupted: bool = False


def learning_rate(cfg: TrainConfig) -> float:
    """The rate given, else LEARNING_RATE, on one process or many.

    W workers learn from W batches a step, and the usual rule for Adam would raise the rate
    by sqrt(W). On the chorales it did not pay: with the budget's settling rate, two workers
    at sqrt(2) x 0.003 scored -5.50, -4.95, -5.67 nats/event in one minute (seeds 0-2), at
    0.003 -5.48, -5.75, -5.38 (docs/distributed.md).
    """
    return cfg.learning_rate if cfg.learning_rate is not None else LEARNING_RATE


def default_minutes(events: int) -> float:
    """A budget that fits the data: 2 minutes for a small dataset, up to 15 for a large one."""
    return float(min(15.0, max(2.0, events / 8000.0)))


def train(
    ds: Dataset | ShardedDataset,
    name: str,
    models_dir: Path,
    cfg: TrainConfig = TrainConfig(),
    echo: Callable[[str], None] = print,
    stream: TextIO | None = None,
) -> TrainResult:
    """Train a model on ``ds`` and export it to ``models_dir/name``; Ctrl-C exports the best so far.

    With ``cfg.init_from`` (a model folder) training starts from that model's weights and
    keeps its size and normalisation: a fine-tune.
    """
    from server.learn.distribute import make_strategy

    started = time.monotonic()
    minutes = cfg.minutes if cfg.minutes is not None else default_minutes(_events(ds))
    if not minutes > 0:
        raise DatasetError("--minutes must be > 0")
    if isinstance(ds, ShardedDataset):
        train_ds, val_ds, held_out = split_sharded(ds, cfg.val_fraction, cfg.seed)
    else:
        train_ds, val_ds, held_out = split_performances(ds, cfg.val_fraction, cfg.seed)
    strategy = make_strategy(cfg.cluster)  # before any other TensorFlow work, as multi-worker training needs
    with strategy.scope():
        model, spec, norm, parent = build_for(cfg, train_ds)
    train_w, val_w = _windows(train_ds, val_ds, norm, cfg)
    origin = f"fine-tuning {parent.label}" if parent is not None else "training"
    echo(
        f"{origin} {name}: size {spec.size} ({spec.units}x{spec.layers}, {spec.mixtures} mixtures), "
        f"{minutes:g} min at most; {train_w.performances} performances ({train_w.events} events) to train, "
        f"{val_w.performances} held out for validation (performances {_ranges(held_out)} of {_count(ds)}, "
        f"{val_w.events} events)"
    )
    skipped = _count(ds) - train_w.performances - val_w.performances
    if skipped:
        echo(f"left out {skipped} performance(s) with fewer than two events (nothing to predict)")
    echo(f"data: {norm.describe()}")
    with _window_files(train_w, cfg) as folder:  # cut before the clock starts: their time is in the budget
        reserve = _finishing_reserve(spec, norm, cfg, ds, val_ds, held_out, echo)
        budget = max(1.0, minutes * 60.0 - reserve - (time.monotonic() - started))
        progress = _Progress(echo, cfg.epochs, budget, stream if stream is not None else sys.stdout,
                             nats_offset(norm, train_ds.performances), nats_offset(norm, val_ds.performances))
        best, interrupted = fit_within(model, train_w, val_w, norm, budget, cfg, [progress], strategy, folder)
    history = best.history
    if interrupted:
        echo("\ninterrupted: exporting the best model so far")
    if best.weights is None:
        if interrupted:
            echo("interrupted before the first epoch ended: nothing to export")
            return TrainResult(None, math.nan, math.nan, 0, time.monotonic() - started, history, True)
        raise RuntimeError("training diverged (NaN loss) in its first epoch; try a lower --learning-rate")
    if cfg.cluster is not None:
        model = _plain_copy(model, spec, cfg, best.weights)  # export sees ordinary variables, not mirrored ones
        if not cfg.cluster.chief:
            return _await_chief(strategy, Path(models_dir) / name, echo, started, history, interrupted)
        with _releasing_workers(strategy) as written:
            result = _export(model, spec, norm, parent, cfg, ds, val_ds, held_out, best, models_dir, name, echo,
                             started, interrupted)
            written.extend([result.validation_nll, result.validation_nll_dequantised])
        return result
    model.set_weights(best.weights)
    return _export(model, spec, norm, parent, cfg, ds, val_ds, held_out, best, models_dir, name, echo, started,
                   interrupted)


def _export(model, spec: ModelSpec, norm: Normaliser, parent, cfg: TrainConfig, ds: Dataset, val_ds: Dataset,
            held_out: list[int], best: "BestWeights", models_dir: Path, name: str, echo: Callable[[str], None],
            started: float, interrupted: bool) -> TrainResult:
    """Score the best weights on the held-out performances, export the folder and its report."""
    from server.learn.evaluate import score, step_for
    from server.model.export import convert_to_tflite, export, library_versions, now_iso

    history = best.history
    epochs = len(history.get("loss", []))
    info = _info(spec, norm, cfg, ds, None, history, held_out)
    tflite = convert_to_tflite(model, spec)
    step = step_for(tflite, info, model)
    scores = score(step, info, val_ds)
    sampling = calibrated(step, tflite, info, val_ds, cfg.seed, echo)
    seconds = time.monotonic() - started
    lineage = {} if parent is None else {"parent": parent.label, "parent_files": parent.info.files}
    info = _info(spec, norm, cfg, ds, scores, history, held_out, versions=library_versions(), created=now_iso(),
                 seconds=seconds, lineage=lineage, sampling=sampling)
    folder = export(model, info, Path(models_dir) / name, check_events=norm.forward(val_ds.events), tflite=tflite)
    if cfg.report:
        from server.learn.report import write_report

        write_report(folder, history, val_ds, seed=cfg.seed)
    seconds = time.monotonic() - started
    quantised = "" if not norm.gridded else f" (dequantised; raw density {scores.raw:.3f})"
    echo(f"wrote {folder}: held-out NLL {scores.dequantised:.3f} nats/event{quantised}, "
         f"{epochs} epochs, {seconds:.0f} s")
    return TrainResult(folder, scores.raw, scores.dequantised, epochs, seconds, history, interrupted)


def _finishing_reserve(spec: ModelSpec, norm: Normaliser, cfg: TrainConfig, ds, val_ds: Dataset,
                       held_out: list[int], echo: Callable[[str], None]) -> float:
    """Seconds of the budget kept for scoring, calibration and export, timed here on an untrained copy."""
    from server.learn import finishing

    per_step = finishing.step_seconds(_info(spec, norm, cfg, ds, None, {}, held_out))
    steps = finishing.finishing_steps(val_ds.performances)
    reserve = finishing.reserve_seconds(per_step, steps)
    echo(f"keeping {reserve:.0f} s of the budget for scoring, calibration and export "
         f"({steps} steps at {1e6 * per_step:.0f} us here)")
    return reserve


def calibrated(step, tflite: bytes, info: ModelInfo, val_ds: Dataset, seed: int,
               echo: Callable[[str], None]) -> dict[str, Any]:
    """``sampling`` for model.json: the scale temperature at which the model plays most like its held-out data."""
    from server.learn.calibrate import calibrate
    from server.learn.evaluate import predictor_on

    predictor = predictor_on(step, tflite, info, "training")
    found = calibrate(predictor, [p for p in val_ds.performances if len(p) >= 2], seed)
    echo(f"sampling: sigma_temperature {found.sigma_temperature:g} plays most like the held-out data "
         f"(shape distance {found.distance:.3f}; {found.tried.get(1.0, math.nan):.3f} at 1); /sigma_temperature "
         "overrides it live")
    return found.record(seed)


def _plain_copy(model, spec: ModelSpec, cfg: TrainConfig, weights: list[np.ndarray]):
    """The trained network outside any tf.distribute strategy, with ``weights``."""
    from server.model.network import build_model

    plain = build_model(spec, dropout=cfg.dropout)
    plain.set_weights(weights)
    return plain


def _await_chief(strategy, folder: Path, echo: Callable[[str], None], started: float, history: dict,
                 interrupted: bool) -> TrainResult:
    """A worker's end: wait for the chief's export, then report what it wrote (or fail if it could not)."""
    from server.learn.distribute import ClusterError, all_sum, lost_worker
    from server.model.network import tf

    try:
        written, raw, dequantised = all_sum(strategy, [0.0, 0.0, 0.0])
    except tf.errors.OpError as e:
        raise lost_worker(e) from None
    if not written:
        raise ClusterError("the chief (worker 0) could not write the model; its output says why")
    echo(f"the chief (worker 0) wrote {folder.name} in its --models-dir: held-out NLL {dequantised:.3f} nats/event")
    epochs = len(history.get("loss", []))
    return TrainResult(folder, raw, dequantised, epochs, time.monotonic() - started, history, interrupted)


@contextmanager
def _releasing_workers(strategy) -> Iterator[list[float]]:
    """The chief's export: the workers wait in one all-reduce, told at its end whether the model was written."""
    from server.learn.distribute import all_sum

    scores: list[float] = []
    try:
        yield scores
    finally:
        all_sum(strategy, [1.0, *scores] if len(scores) == 2 else [0.0, 0.0, 0.0])


def build_for(cfg: TrainConfig, train_ds: Dataset):
    """A compiled model, its spec and normaliser: new, or (``cfg.init_from``) the parent's weights and normaliser.

    Returns (model, spec, normaliser, parent ModelFiles or None).
    """
    from server.model.files import read_model
    from server.model.network import build_model, keras, keras_model_from_bytes, mdn_loss

    keras.utils.set_random_seed(cfg.seed)
    parent = None
    if cfg.init_from is not None:
        parent = read_model(Path(cfg.init_from), ("model.keras", "step.tflite"))
        spec, norm = parent.info.spec, parent.info.normaliser
        if spec.values != train_ds.values:
            raise DatasetError(f"{parent.label} takes {spec.values} values per event, the data has {train_ds.values}: "
                               "fine-tune on data of the same controller, or train a new model")
        model = build_model(spec, dropout=cfg.dropout)
        model.set_weights(keras_model_from_bytes(parent.file("model.keras"), f"{parent.label}/model.keras").get_weights())
    else:
        norm = Normaliser.fit_performances(lambda: train_ds.performances, cfg.dt_max, detect=cfg.dequantise,
                                           dt_offset=cfg.dt_offset)
        norm = replace(norm, relative=relative_dims(norm.grid, norm.constant, cfg.intervals))
        spec = ModelSpec.of_size(cfg.size, cfg.mixtures or mixtures_for(norm), dims=1 + train_ds.values)  # the data says how many values
        model = build_model(spec, dropout=cfg.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(cfg), clipnorm=cfg.clipnorm),
        loss=mdn_loss(spec.mixtures, spec.dims, norm.active),
    )
    return model, spec, norm, parent


@contextmanager
def _window_files(train_w: Windows | StreamedWindows, cfg: TrainConfig) -> Iterator[Path | None]:
    """A temporary folder holding this worker's streamed training windows (None in memory), removed after."""
    if not isinstance(train_w, StreamedWindows):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="antiphon-windows-") as folder:
        if cfg.cluster is None:
            train_w.write(Path(folder))
        else:
            train_w.check_workers(len(cfg.cluster.workers))
            train_w.write(Path(folder), len(cfg.cluster.workers), cfg.cluster.index)
        yield Path(folder)


def fit_within(model, train_w: Windows | StreamedWindows, val_w: Windows, norm: Normaliser, budget: float, cfg: TrainConfig,
               extra: list[Any], strategy: Any = None, folder: Path | None = None) -> tuple["BestWeights", bool]:
    """Fit until the budget, early stopping or Ctrl-C; returns the best epoch's weights and whether interrupted.

    ``folder``: where `StreamedWindows.write` put this worker's windows (streamed training only).

    On a cluster (``cfg.cluster``, ``strategy`` its MultiWorkerMirroredStrategy) the chief's
    budget and anyone's Ctrl-C stop every worker at the same batch (`SharedStop`), and a lost
    worker ends the fit with a `ClusterError`.
    """
    from server.learn.distribute import HeldOutHere, MeanOverWorkers, SharedStop, lost_worker
    from server.learn.untuned import device_datasets_untuned
    from server.model.network import keras, tf

    from server.learn.evaluate import relative_mask
    from server.learn.windows import as_steps

    half_cell = norm.cell_half_width_z()
    relative = relative_mask(norm)
    val_inputs, val_targets = _noisy(val_w, half_cell, cfg.seed)
    val_targets = as_steps(val_w, val_targets, relative)
    best = BestWeights()
    timer = TimeBudget(budget) if cfg.cluster is None or cfg.cluster.chief else None  # the chief's clock decides
    shared = None if cfg.cluster is None else SharedStop(strategy, clock=timer.fraction if timer else lambda: 0.0)
    here = None if cfg.cluster is None else HeldOutHere(tf, model.loss, val_inputs, val_targets)
    # patience in epochs, also on a cluster whose epoch is 1/W of the steps: counted in steps instead, two workers
    # halved the rate later and scored worse on the chorales (-6.385 and -6.292 against -6.595 and -6.531)
    rate = RateSchedule(learning_rate(cfg), max(2, cfg.patience // 3),
                        clock=(lambda: shared.fraction) if shared is not None else timer.fraction,
                        back_to_best=best.restore)
    callbacks = [
        *([here, MeanOverWorkers(len(cfg.cluster.workers))] if cfg.cluster is not None else []),  # first: all read them
        keras.callbacks.TerminateOnNaN(),
        EarlyStop(cfg.patience),
        *([timer] if timer is not None else []),
        *([shared] if shared is not None else []),
        rate,  # after SharedStop: on a cluster it reads the fraction of the budget SharedStop shares
        best,
        *extra,
    ]
    try:
        # the input outside the strategy's scope: its noise generator's state is then this worker's own variable
        data, steps = _training_input(train_w, cfg, half_cell, relative, strategy, folder)
        with (nullcontext() if shared is None else shared.catching_ctrl_c()), \
                (nullcontext() if shared is None else device_datasets_untuned(tf)), \
                (nullcontext() if strategy is None else strategy.scope()):
            model.fit(
                data,
                steps_per_epoch=steps,
                validation_data=(val_inputs, val_targets) if here is None else None,
                epochs=cfg.epochs,
                shuffle=False,  # the pipeline shuffles
                verbose=0,
                callbacks=[keras_callback(c) for c in callbacks],
            )
    except KeyboardInterrupt:
        return best, True
    except tf.errors.OpError as e:
        if shared is None:
            raise
        raise lost_worker(e) from None
    return best, shared is not None and shared.interrupted


def _training_input(train_w: Windows | StreamedWindows, cfg: TrainConfig, half_cell: np.ndarray,
                    relative: np.ndarray, strategy: Any, folder: Path | None = None) -> tuple[Any, int | None]:
    """The batches `fit` takes, and its steps per epoch (None: one pass over the data).

    On a cluster each worker's pipeline takes its own part (its windows, or its own shards)
    in whole batches of ``batch_size``, so a step learns from W batches and an epoch takes
    1/W of the steps. (Splitting each batch between the workers keeps one process's steps,
    but on the chorales two workers then trained fewer epochs in 3 minutes than one
    process, and scored worse.) TensorFlow's default would have every worker read
    everything and drop the other workers' parts.
    """
    from server.learn.untuned import untuned
    from server.learn.windows import training_dataset
    from server.model.network import tf

    if cfg.cluster is None:
        if isinstance(train_w, Windows):
            return training_dataset(train_w, cfg.batch_size, half_cell, cfg.seed, relative=relative), None
        return train_w.dataset(cfg.batch_size, half_cell, cfg.seed, relative, folder=folder), None
    workers = len(cfg.cluster.workers)
    if isinstance(train_w, Windows):
        def part(context):
            return untuned(tf, training_dataset(train_w, cfg.batch_size, half_cell, cfg.seed, relative=relative,
                                                workers=context.num_input_pipelines, index=context.input_pipeline_id))
        steps = max(1, math.ceil(len(train_w.data) / (cfg.batch_size * workers)))
    else:
        def part(context):
            return untuned(tf, train_w.dataset(cfg.batch_size, half_cell, cfg.seed, relative,
                                               context.num_input_pipelines, context.input_pipeline_id, folder=folder))
        steps = train_w.steps_per_epoch(cfg.batch_size, workers)
    return strategy.distribute_datasets_from_function(part), steps


def _events(ds: Dataset | ShardedDataset) -> int:
    return ds.event_count if isinstance(ds, ShardedDataset) else len(ds.events)


def _count(ds: Dataset | ShardedDataset) -> int:
    """How many performances."""
    return ds.performance_count if isinstance(ds, ShardedDataset) else len(ds.starts)


def _windows(train_ds: Dataset | ShardedPart, val_ds: Dataset, norm: Normaliser,
             cfg: TrainConfig) -> tuple[Windows | StreamedWindows, Windows]:
    to_z = lambda d: [norm.forward(p) for p in d.performances]  # noqa: E731
    try:
        if isinstance(train_ds, ShardedPart):
            train_w: Windows | StreamedWindows = StreamedWindows.of(train_ds, norm, cfg.sequence_length, cfg.stride)
        else:
            train_w = make_windows(to_z(train_ds), cfg.sequence_length, cfg.stride)
        return train_w, make_windows(to_z(val_ds), cfg.sequence_length, cfg.sequence_length)
    except ValueError as e:
        raise DatasetError(f"{e}: every performance needs at least two events") from None


def _noisy(windows: Windows, half_cell: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation windows with one fixed draw of dequantisation noise (so epochs compare)."""
    data = windows.data.copy()
    dims = data.shape[-1] - 1
    data[..., :dims] += np.random.default_rng(seed + 1).uniform(-1, 1, data[..., :dims].shape) * half_cell
    return data[:, :-1, :dims], data[:, 1:, :]


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 6] -> "1-3, 7" (1-based, as people count performances)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = ", ".join(f"{a + 1}" if a == b else f"{a + 1}-{b + 1}" for a, b in runs[:12])
    return shown + (", ... (all in model.json)" if len(runs) > 12 else "")


def _info(spec: ModelSpec, norm: Normaliser, cfg: TrainConfig, ds: Dataset, scores, history: dict,
          held_out: list[int], versions: dict | None = None, created: str = "", seconds: float = 0.0,
          lineage: dict | None = None, sampling: dict | None = None) -> ModelInfo:
    return ModelInfo(
        spec=spec,
        normaliser=norm,
        sequence_length=cfg.sequence_length,
        dt_max=cfg.dt_max,
        validation_nll=None if scores is None else scores.raw,
        validation_nll_dequantised=None if scores is None else scores.dequantised,
        dataset_sha256=ds.sha256(),
        versions=versions or {},
        created=created,
        data=dict(cfg.data),
        lineage=dict(lineage or {}),
        sampling=dict(sampling or {}),
        training={
            "epochs_run": len(history.get("loss", [])),
            "seconds": round(seconds, 1),
            "minutes_budget": cfg.minutes,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "learning_rate": learning_rate(cfg),
            "dropout": cfg.dropout,
            "mixtures": spec.mixtures,
            "dequantised": bool(norm.gridded),
            "validation_performances": held_out,
            "loss": [round(float(v), 4) for v in history.get("loss", [])],
            "val_loss": [round(float(v), 4) for v in history.get("val_loss", [])],
            "rate": [float(f"{v:.4g}") for v in history.get("lr", [])],  # Adam's, as each epoch ended
        },
    )


# --------------------------------------------------------------------------- callbacks
# Plain classes with Keras' hook names, wrapped into keras.callbacks.Callback lazily so that
# importing this module does not import Keras.


class BestWeights:
    """Keeps the weights of the best validation epoch (restored at the end, and on Ctrl-C) and the history."""

    def __init__(self) -> None:
        self.best = math.inf
        self.weights: list[np.ndarray] | None = None
        self.history: dict[str, list[float]] = {"loss": [], "val_loss": [], "lr": []}

    def restore(self, model: Any) -> None:
        """Set the model back to the best epoch's weights (every worker holds the same ones)."""
        if self.weights is not None:
            model.set_weights(self.weights)

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        loss, val = float(logs.get("loss", math.nan)), float(logs.get("val_loss", math.nan))
        self.history["loss"].append(loss)
        self.history["val_loss"].append(val)
        self.history["lr"].append(float(np.asarray(model.optimizer.learning_rate)))
        if math.isfinite(val) and val < self.best:
            self.best = val
            self.weights = [w.copy() for w in model.get_weights()]


def nats_offset(norm: Normaliser, performances: Iterable[np.ndarray]) -> float:
    """The mean log-Jacobian of the predicted events: a normalised NLL minus it is nats per event in the
    data's own units (seconds and [0, 1]), the scale of the held-out figure training ends with.
    Read a performance at a time (a sharded corpus is never in memory)."""
    total, count = [], 0
    for p in performances:
        if len(p) > 1:
            total.append(float(np.sum(norm.log_jacobian(p[1:]))))
            count += len(p) - 1
    return math.fsum(total) / count if count else 0.0


class _Progress:
    """Elapsed time, ETA and the training and validation NLL in nats per event (the final figure's scale):
    a live bar on a terminal, one line per epoch otherwise."""

    def __init__(self, echo: Callable[[str], None], epochs: int, budget: float, stream: TextIO,
                 train_offset: float = 0.0, val_offset: float = 0.0) -> None:
        self.echo, self.epochs, self.budget, self.stream = echo, epochs, budget, stream
        self.train_offset, self.val_offset = train_offset, val_offset
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.best = math.inf

    def on_train_begin(self, logs: dict, model: Any) -> None:
        self.start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        elapsed = time.monotonic() - self.start
        val = float(logs.get("val_loss", math.nan)) - self.val_offset
        self.best = min(self.best, val) if math.isfinite(val) else self.best
        per_epoch = elapsed / (epoch + 1)
        eta = max(0.0, min(self.budget - elapsed, per_epoch * (self.epochs - epoch - 1)))
        train = float(logs.get("loss", math.nan)) - self.train_offset
        rate = float(np.asarray(model.optimizer.learning_rate))
        text = (f"epoch {epoch + 1:4d}  {_clock(elapsed)} elapsed, ~{_clock(eta)} left  NLL nats/event: "
                f"train {train:.3f}  held-out {val:.3f} (best {self.best:.3f})  rate {rate:.2e}")
        if self.live:
            done = min(1.0, elapsed / max(self.budget, 1e-9))
            bar = "#" * int(done * 24)
            self.stream.write(f"\r[{bar:<24}] {text}")
            self.stream.flush()
        else:
            self.echo(text)

    def on_train_end(self, logs: dict, model: Any) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def keras_callback(hooks: Any) -> Any:
    """Wrap a plain hooks object as a Keras callback (Keras' own callbacks pass through)."""
    from server.model.network import keras

    if isinstance(hooks, keras.callbacks.Callback):
        return hooks

    class Wrapped(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if hasattr(hooks, "on_train_begin"):
                hooks.on_train_begin(logs or {}, self.model)

        def on_epoch_end(self, epoch, logs=None):
            if hasattr(hooks, "on_epoch_end"):
                hooks.on_epoch_end(epoch, logs or {}, self.model)

        def on_train_batch_end(self, batch, logs=None):
            if hasattr(hooks, "on_train_batch_end"):
                hooks.on_train_batch_end(batch, logs or {}, self.model)

        def on_train_end(self, logs=None):
            if hasattr(hooks, "on_train_end"):
                hooks.on_train_end(logs or {}, self.model)

    return Wrapped()
