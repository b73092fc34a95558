"""`bench`'s width phase: what N values per event cost, beside the benched model's own N.

A model of `WIDE_VALUES` values is built with the benched model's spec (units, layers,
mixtures) and random weights: its cost is its arithmetic, not what it learned. Both
then run the same step loop in this process and the same 1,000 msg/s `accompany`
round trip through a real server; the ratios are the goal's figures (DESIGN.md: a wide
controller should cost under 1.5x the default's).
"""

from __future__ import annotations

import dataclasses
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from server.tools.timing import ROUND_TRIP_MAX_RATE, round_trip, step_latency

WIDE_VALUES = 9  # values per event beside the model's own: more than IMPSY's 9-d controller (8 values)
GOAL_RATIO = 1.5  # the most N = 9 should cost, as a multiple of N = 2
ROUND_TRIP_RATE = 1000.0  # messages a second


def wide_twin(folder: Path, values: int, out: Path) -> Path:
    """A model of ``values`` values per event with ``folder``'s spec and random weights, exported into ``out``."""
    from server.model.export import export
    from server.model.files import read_info
    from server.model.network import build_model
    from server.model.normalise import Normaliser

    info = read_info(folder)
    spec = dataclasses.replace(info.spec, dims=1 + values)
    rng = np.random.default_rng(0)
    events = np.column_stack([rng.uniform(0.01, 0.5, 1000), rng.uniform(0.0, 1.0, (1000, values))]).astype(np.float32)
    wide = dataclasses.replace(info, spec=spec, normaliser=Normaliser.fit(events, info.dt_max, detect=False),
                               files={}, lineage={})
    checks = rng.normal(0.0, 1.0, (50, 1 + values)).astype(np.float32)
    return export(build_model(spec), wide, out / f"{folder.name}-{values}-values", checks)


def width_figures(folder: Path, quick: bool) -> dict[str, Any]:
    """One model's step loop (LiteRT, in this process) and round trip at `ROUND_TRIP_RATE` (a real server)."""
    from server.model.files import read_model
    from server.model.mdn import RandomBlocks
    from server.model.predictor import Predictor
    from server.tools.under_test import ServerUnderTest

    predictor = Predictor(read_model(folder, ("step.tflite",)), backend="litert")
    draws = RandomBlocks(np.random.default_rng(0), predictor.info.spec.dims)
    step = step_latency(predictor, 2000 if quick else 20000, draws)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    with tempfile.TemporaryDirectory() as logs:
        srv = ServerUnderTest(str(folder), sock.getsockname()[1], Path(logs), "accompany", 1e-6,
                              "--max-rate", str(ROUND_TRIP_MAX_RATE))
        try:
            trip = round_trip(sock, srv.port, ROUND_TRIP_RATE, 2.0 if quick else 5.0, values=predictor.values)
        finally:
            srv.stop()
            sock.close()
    return {"values": predictor.values, "step": step, "round_trip": trip}


def bench_widths(folder: Path, quick: bool = False) -> dict[str, Any]:
    """The benched model's figures beside those of its `WIDE_VALUES`-value twin, and the ratios."""
    with tempfile.TemporaryDirectory() as scratch:
        wide_folder = wide_twin(folder, WIDE_VALUES, Path(scratch))
        base, wide = width_figures(folder, quick), width_figures(wide_folder, quick)
    ratios = {f"{where}_{stat}": _ratio(wide[where][f"{stat}_us"], base[where][f"{stat}_us"])
              for where in ("step", "round_trip") for stat in ("median", "p99")}
    return {"base": base, "wide": wide, "ratios": ratios, "goal_ratio": GOAL_RATIO}


def _ratio(wide: float | None, base: float | None) -> float | None:
    return wide / base if wide is not None and base else None


def widths_table(r: dict[str, Any]) -> list[str]:
    """The width phase as lines of `bench`'s table."""
    lines = [f"width: N values per event (the model's spec, random weights for N = {r['wide']['values']}); "
             f"goal: N = {r['wide']['values']} under {r['goal_ratio']:g}x",
             "  N   step median us  p99 us   round trip at 1,000/s: sent  recv  median us  p99 us"]
    for row in (r["base"], r["wide"]):
        s, t = row["step"], row["round_trip"]
        lines.append(f"  {row['values']:<3} {s['median_us']:>14.1f} {s['p99_us']:>7.1f}   {t['sent']:>27} "
                     f"{t['received']:>5} {t['median_us'] or 0:>10.0f} {t['p99_us'] or 0:>7.0f}")
    q = r["ratios"]
    lines.append("  ratio: step " + _x(q["step_median"]) + " (p99 " + _x(q["step_p99"]) + "), round trip "
                 + _x(q["round_trip_median"]) + " (p99 " + _x(q["round_trip_p99"]) + ")")
    return lines


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"
