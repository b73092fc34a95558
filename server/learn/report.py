"""`report.png`: loss curves, data gestures beside model gestures, and the music statistics of both, to see at a glance if training worked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.learn.data import Dataset
from server.model.mdn import RandomBlocks
from server.model.predictor import Predictor


def generate(predictor: Predictor, n: int, rng: np.random.Generator, temperature: float = 1.0) -> np.ndarray:
    """Let the model play on its own for ``n`` events at its own scale temperature; returns ``[n, dims]`` (dt, v1 .. vN)."""
    draws = RandomBlocks(rng, predictor.info.spec.dims)
    predictor.reset()
    out = np.empty((n, predictor.info.spec.dims))
    for i in range(n):
        out[i] = predictor.sample(draws, temperature, predictor.info.sigma_temperature)
        predictor.observe(*out[i])
    return out


def write_report(folder: Path, history: dict[str, list[float]], data: Dataset, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from server.learn.evaluate import music_report

    rng = np.random.default_rng(seed)
    predictor = Predictor.load(folder)
    sigma = predictor.info.sigma_temperature  # as `run` plays it
    music = music_report(predictor, data.performances, seed, sigma_temperature=sigma)
    fig = plt.figure(figsize=(12, 11))
    grid = fig.add_gridspec(3, 12)
    axes = np.array([[fig.add_subplot(grid[r, 4 * c : 4 * c + 4]) for c in range(3)] for r in range(2)])
    wide = 12 // music_panels(music)
    draw_music([fig.add_subplot(grid[2, wide * c : wide * c + wide]) for c in range(music_panels(music))], music)
    ax = axes[0, 0]
    ax.plot(history.get("loss", []), label="train")
    ax.plot(history.get("val_loss", []), label="validation")
    ax.set(title="loss (NLL per event, normalised units)", xlabel="epoch")
    ax.legend(loc="upper right")
    if history.get("lr"):  # the learning rate: its plateaus' halvings and its settling as the budget runs out
        rate = ax.twinx()
        rate.plot(history["lr"], color="grey", lw=0.8, ls=":")
        rate.set_yscale("log")
        rate.tick_params(axis="y", labelsize=7, colors="grey")
        ax.set_title("loss (NLL per event, normalised units); rate dotted", fontsize=9)
    perf = data.performances[0][:300]
    gen = generate(predictor, len(perf), rng)
    for col, (title, ev) in enumerate((("data", perf), (f"model, sigma_temperature {sigma:g}", gen)), start=1):
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


# --------------------------------------------------------------------------- music: data beside model


def music_panels(report) -> int:
    """How many axes `draw_music` fills for this report (4 for notes, 2 for gestures)."""
    return 4 if report.notes else 2


def draw_music(axes, report) -> None:
    """Histograms of the data beside the model's playing (zero state, openings), each titled with its distance."""
    from server.learn import music

    sets = [("data", report.data, None), ("model, zero state", report.zero, report.distances["zero"])]
    if report.openings is not None:
        sets.append(("model, openings", report.openings, report.distances["openings"]))
    if report.notes:
        panels = [
            ("intervals (semitones)", np.arange(-music.INTERVAL_SPAN, music.INTERVAL_SPAN + 1), "intervals",
             "intervals_tv", "TV"),
            ("pitch (MIDI)", np.arange(music.PITCHES), "pitches", "pitch_emd_semitones", "EMD"),
            ("pitch class", np.arange(12), "pitch_classes", "pitch_class_tv", "TV"),
            ("inter-onset interval (s)", music.IOI_BINS[1:], "iois", "ioi_tv", "TV"),
        ]
    else:
        panels = [
            ("move size (pad units)", music.MOVE_BINS[1:], "moves", "move_tv", "TV"),
            ("dt (s)", music.IOI_BINS[1:], "dts", "dt_tv", "TV"),
        ]
    for ax, (title, x, field, key, kind) in zip(axes, panels):
        figures = ", ".join(f"{d[key]:.2f}" for _, _, d in sets if d is not None)
        for label, stats, _ in sets:
            ax.step(x, getattr(stats, field), where="mid", label=label, lw=1.2)
        if field in ("iois", "dts", "moves"):
            ax.set_xscale("log")
        if field == "pitches":
            used = np.nonzero(report.data.pitches + report.zero.pitches)[0]
            ax.set_xlim(used.min() - 2, used.max() + 2)
        ax.set(title=f"{title}: {kind} {figures}", ylabel="fraction")
    if report.notes:
        d, z = report.data, report.zero
        axes[0].text(0.02, 0.97, f"steps <=2: data {100 * d.step_share:.0f} %, model {100 * z.step_share:.0f} %\n"
                     f"leaps >7: data {100 * d.leap_share:.1f} %, model {100 * z.leap_share:.1f} %",
                     transform=axes[0].transAxes, va="top", fontsize=8)
    axes[-1].legend(fontsize=7, loc="upper right")


def write_music_plot(report, path: Path) -> Path:
    """The music panels alone, as a PNG (`evaluate --music --plot`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = music_panels(report)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4))
    draw_music(list(np.atleast_1d(axes)), report)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path
