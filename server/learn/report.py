"""`report.png`: loss curves and data gestures beside model gestures, to see at a glance if training worked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.learn.data import Dataset
from server.model.mdn import RandomBlocks
from server.model.predictor import Predictor


def generate(predictor: Predictor, n: int, rng: np.random.Generator, temperature: float = 1.0) -> np.ndarray:
    """Let the model play on its own for ``n`` events; returns ``[n, dims]`` (dt, v1 .. vN)."""
    draws = RandomBlocks(rng, predictor.info.spec.dims)
    predictor.reset()
    out = np.empty((n, predictor.info.spec.dims))
    for i in range(n):
        out[i] = predictor.sample(draws, temperature, 1.0)
        predictor.observe(*out[i])
    return out


def write_report(folder: Path, history: dict[str, list[float]], data: Dataset, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    ax = axes[0, 0]
    ax.plot(history.get("loss", []), label="train")
    ax.plot(history.get("val_loss", []), label="validation")
    ax.set(title="loss (NLL per event, normalised units)", xlabel="epoch")
    ax.legend()
    perf = data.performances[0][:300]
    gen = generate(Predictor.load(folder), len(perf), rng)
    for col, (title, ev) in enumerate((("data", perf), ("model, temperature 1", gen)), start=1):
        ax = axes[0, col]
        _gesture_plot(ax, ev)
        ax.set_title(f"{title}: {len(ev)} events")
    ax = axes[1, 0]
    bins = np.logspace(-3, np.log10(5.0), 40)
    for label, dt in (("data", data.events[:, 0]), ("model", gen[:, 0])):
        ax.hist(np.clip(dt, 1e-3, None), bins=bins, alpha=0.6, weights=np.full(len(dt), 1 / len(dt)), label=label)
    ax.set(xscale="log", yscale="log", title="dt (s), fraction of events")
    ax.legend()
    for col, (title, ev) in enumerate((("data x over time", perf), ("model x over time", gen)), start=1):
        ax = axes[1, col]
        t = np.cumsum(ev[:, 0])
        ax.plot(t, ev[:, 1], ".-", ms=2, lw=0.5)
        ax.set(title=title, xlabel="seconds", ylim=(0, 1))
    fig.tight_layout()
    path = Path(folder) / "report.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def _gesture_plot(ax, ev: np.ndarray) -> None:
    """Strokes as lines, broken where the performer paused (dt > 0.25 s): the first two values (one: over time)."""
    if ev.shape[1] < 3:
        ax.plot(np.cumsum(ev[:, 0]), ev[:, 1], ".-", ms=2, lw=0.5)
        return
    breaks = np.where(ev[:, 0] > 0.25)[0]
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(ev)]):
        seg = ev[a:b]
        ax.plot(seg[:, 1], seg[:, 2], "-", lw=1)
        if len(seg) == 1:
            ax.plot(seg[:, 1], seg[:, 2], "o", ms=3)
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
