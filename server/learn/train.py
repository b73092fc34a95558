"""Training: dataset -> windows -> Keras fit with early stopping -> checked export -> report.png."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from server.learn.data import DT_MAX, Dataset, DatasetError, split_performances, windows
from server.model.spec import ModelInfo, ModelSpec
from server.model.normalise import Normaliser


@dataclass(frozen=True)
class TrainConfig:
    size: str = "s"
    mixtures: int = 5
    epochs: int = 40
    patience: int = 5
    seed: int = 0
    sequence_length: int = 50
    stride: int = 10
    batch_size: int = 64
    learning_rate: float = 3e-3
    clipnorm: float = 1.0
    val_fraction: float = 0.15
    dt_max: float = DT_MAX
    report: bool = True


@dataclass(frozen=True)
class TrainResult:
    folder: Path
    validation_nll: float
    epochs_run: int
    seconds: float
    history: dict[str, list[float]]


def train(
    ds: Dataset,
    name: str,
    models_dir: Path,
    cfg: TrainConfig = TrainConfig(),
    echo: Callable[[str], None] = print,
) -> TrainResult:
    """Train a model on ``ds`` and export it to ``models_dir/name``."""
    from server.learn.evaluate import nll_per_event
    from server.model.network import build_model, keras, mdn_loss
    from server.model.export import export, library_versions, now_iso

    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    train_ds, val_ds = split_performances(ds, cfg.val_fraction, cfg.seed)
    norm = Normaliser.fit(train_ds.events, cfg.dt_max)
    to_z = lambda d: [norm.forward(p) for p in d.performances]  # noqa: E731
    try:
        train_w = windows(to_z(train_ds), cfg.sequence_length, cfg.stride)
        val_w = windows(to_z(val_ds), cfg.sequence_length, cfg.sequence_length)
    except DatasetError as e:
        raise DatasetError(f"{e}; record longer performances or use --sequence-length") from e
    spec = ModelSpec.of_size(cfg.size, cfg.mixtures)
    model = build_model(spec)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate, clipnorm=cfg.clipnorm),
        loss=mdn_loss(spec.mixtures, spec.dims),
    )
    echo(
        f"training {name}: size {cfg.size} ({spec.units}x{spec.layers}, {spec.mixtures} mixtures), "
        f"{len(train_ds.starts)} train / {len(val_ds.starts)} validation performances, "
        f"{len(train_w)} windows of {cfg.sequence_length}"
    )
    history = model.fit(
        train_w[:, :-1],
        train_w[:, 1:],
        validation_data=(val_w[:, :-1], val_w[:, 1:]),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.EarlyStopping(patience=cfg.patience, restore_best_weights=True),
            _EpochLine(echo, cfg.epochs),
        ],
    ).history
    if not all(math.isfinite(v) for v in history.get("loss", [float("nan")])):
        raise RuntimeError("training diverged (NaN loss); try a lower --learning-rate")
    val_nll = nll_per_event(model, _info(spec, norm, cfg, None, ds, {}), val_ds)
    info = _info(
        spec,
        norm,
        cfg,
        val_nll,
        ds,
        {"versions": library_versions(), "created": now_iso(), "history": history, "seconds": time.monotonic() - started},
    )
    folder = export(model, info, Path(models_dir) / name, check_events=norm.forward(val_ds.events))
    seconds = time.monotonic() - started
    if cfg.report:
        from server.learn.report import write_report

        write_report(folder, history, val_ds, seed=cfg.seed)
    echo(f"wrote {folder}: validation NLL {val_nll:.3f} nats/event, {len(history['loss'])} epochs, {seconds:.0f} s")
    return TrainResult(folder, val_nll, len(history["loss"]), seconds, history)


def _info(spec: ModelSpec, norm: Normaliser, cfg: TrainConfig, val_nll, ds: Dataset, extra: dict) -> ModelInfo:
    history = extra.get("history", {})
    return ModelInfo(
        spec=spec,
        normaliser=norm,
        sequence_length=cfg.sequence_length,
        dt_max=cfg.dt_max,
        validation_nll=val_nll,
        dataset_sha256=ds.sha256(),
        versions=extra.get("versions", {}),
        created=extra.get("created", ""),
        training={
            "epochs_run": len(history.get("loss", [])),
            "seconds": round(extra.get("seconds", 0.0), 1),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "loss": [round(float(v), 4) for v in history.get("loss", [])],
            "val_loss": [round(float(v), 4) for v in history.get("val_loss", [])],
        },
    )


class _EpochLine:
    """One progress line per epoch (a Keras callback built lazily to keep imports light)."""

    def __new__(cls, echo: Callable[[str], None], epochs: int):
        import keras

        class EpochLine(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self._t = time.monotonic()

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                echo(
                    f"epoch {epoch + 1:3d}/{epochs}  loss {logs.get('loss', float('nan')):.4f}  "
                    f"val_loss {logs.get('val_loss', float('nan')):.4f}  {time.monotonic() - self._t:.1f}s"
                )

        return EpochLine()

