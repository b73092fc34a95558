"""A model's own scale temperature, found at training: the one at which it plays most like its held-out data.

At ``sigma_temperature`` 1 a model samples the density it learnt. Where that density is
broad (on the chorales a mixture component spans several keys) a draw lands beside where
the line would go, and the lines move unlike the data: 60 % steps where Bach has 76 %.
Narrowing every scale fixes the shape without touching the likelihood, and how much to
narrow depends on how well the model learnt, so it is measured per model rather than
fixed. `calibrate` lets the model play (`server.learn.evaluate.play`, seeded) at each
candidate and keeps the one whose `server.learn.music.shape_distance` to the held-out data
is least; `model.json` stores it as ``sampling.sigma_temperature``, the value `run` and
`evaluate --music` start from, and `/sigma_temperature` still overrides live.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COARSE = tuple(round(0.3 + 0.1 * i, 2) for i in range(13))  # 0.3 .. 1.5, 1 among them
FINE = 0.05  # then the two neighbours of the best, this far either side


@dataclass(frozen=True)
class Calibration:
    sigma_temperature: float  # the one kept
    distance: float  # its shape distance (0: plays like the data)
    tried: dict[float, float]  # every candidate's distance, in order

    def record(self, seed: int) -> dict[str, Any]:
        """What `model.json` keeps under ``sampling``: the value, and how it was found."""
        return {
            "sigma_temperature": self.sigma_temperature,
            "calibration": {
                "distance": round(self.distance, 4),
                "distance_at_1": round(self.tried.get(1.0, float("nan")), 4),
                "seed": seed,
                "measure": "music.shape_distance on the held-out performances, zero state and openings averaged",
            },
        }


def calibrate(predictor, data: list[np.ndarray], seed: int = 0, temperature: float = 1.0) -> Calibration:
    """The scale temperature at which ``predictor`` plays most like ``data`` (a coarse grid, then its neighbours).

    Ties go to the candidate nearest 1, the density as learnt.
    """
    tried: dict[float, float] = {}

    def best() -> float:
        return min(tried, key=lambda s: (tried[s], abs(s - 1.0)))

    for s in COARSE:
        tried[s] = shape_distance_at(predictor, data, seed, temperature, s)
    centre = best()
    for s in (round(centre - FINE, 2), round(centre + FINE, 2)):
        if s > 0 and s not in tried:
            tried[s] = shape_distance_at(predictor, data, seed, temperature, s)
    kept = best()
    return Calibration(kept, tried[kept], dict(sorted(tried.items())))


def calibration_steps(data: list[np.ndarray]) -> int:
    """The one-step calls `calibrate` makes at most: `evaluate.play` for every candidate."""
    from server.learn.evaluate import play_steps

    return (len(COARSE) + 2) * play_steps(data)


def shape_distance_at(predictor, data: list[np.ndarray], seed: int, temperature: float, sigma: float) -> float:
    """`music.shape_distance` of the model playing at ``sigma``, averaged over zero-state lines and openings."""
    from server.learn.evaluate import music_report
    from server.learn.music import shape_distance

    report = music_report(predictor, data, seed, temperature, sigma)
    return float(np.mean([shape_distance(d) for d in report.distances.values()]))


def write_sampling(folder: Path, sampling: dict[str, Any]) -> None:
    """Put ``sampling`` into ``folder``'s model.json (`evaluate --calibrate`), atomically; the model files are untouched.

    model.json's hashes cover `model.keras` and `step.tflite` only, so a calibration of a
    model trained before there was one needs no re-export.
    """
    path = Path(folder) / "model.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["sampling"] = sampling
    tmp = path.with_name(".model.json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
