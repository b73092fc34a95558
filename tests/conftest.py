"""Shared fixtures: a tiny trained model (trained once per session) and quiet TensorFlow."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs are a gate, so they are reproducible: the same examples every run. Locally,
# hypothesis explores new examples each time (and remembers failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def per_user_folder(tmp_path_factory):
    """The per-user folder (your models, your logs) in a temporary place: no test writes into the real home.

    Set in the environment, so servers and commands started as child processes use it too.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        yield


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder ``build`` fills once per test run, shared by every pytest-xdist worker.

    `make test` runs two workers; without this each trains the same session models (~40 s of a
    2-core machine's time twice). The first worker builds under a lock, the others wait on it
    and find the folder done. A build that failed leaves no mark, so the next one tries again.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's temporary folder, one above each worker's own
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_dataset():
    from server.learn.synth import synthetic_dataset

    return synthetic_dataset(performances=16, seed=7, phrases=6)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_dataset):
    """An `xs` model trained for a few epochs and exported: (folder, TrainResult)."""
    from server.learn.train import TrainConfig, train

    from dataclasses import asdict

    from server.learn.train import TrainResult

    def build(models: Path) -> None:
        cfg = TrainConfig(size="xs", epochs=4, patience=4, seed=3, stride=10, report=True)
        result = train(tiny_dataset, "tiny", models, cfg, echo=lambda s: None)
        (models / "result.json").write_text(json.dumps(asdict(result), default=str))

    models = built_once(tmp_path_factory, "tiny-model", build)
    fields = json.loads((models / "result.json").read_text())
    result = TrainResult(**{**fields, "folder": Path(fields["folder"])})
    return result.folder, result


WIDE_VALUES = (1, 2, 3, 4, 8, 9, 16)  # N of each model in `wide_models_dir`: the edges, today's, IMPSY's 4-d and 9-d (3, 8), the patches' 4 and 9


@pytest.fixture(scope="session")
def wide_models_dir(tmp_path_factory) -> Path:
    """A models folder of tiny untrained models named `n<N>`, one per N in `WIDE_VALUES`, built once per session."""
    from tests.tinynet import export_wide

    def build(models: Path) -> None:
        for n in WIDE_VALUES:
            export_wide(models / f"n{n}", n, seed=n)

    return built_once(tmp_path_factory, "wide-models", build)


# --------------------------------------------------------------------------- sampling


def draw_events(params, mixtures: int, dims: int, n: int, rng, temperature: float = 1.0, sigma_temperature: float = 1.0):
    """``n`` draws ``[n, dims]`` through the live sampler: `mdn.sample_event` fed by `RandomBlocks` from ``rng``.

    ``params`` is one vector ``[P]`` for every draw, or one row per draw ``[n, P]``.
    """
    import numpy as np

    from server.model import mdn

    params = np.asarray(params, dtype=np.float64)
    rows = params if params.ndim == 2 else [params] * n
    assert len(rows) == n
    blocks = mdn.RandomBlocks(rng, dims)
    return np.array(
        [mdn.sample_event(row, mixtures, dims, *blocks.next(), temperature, sigma_temperature) for row in rows]
    ).reshape(n, dims)


@pytest.fixture(scope="session")
def draw():
    """`draw_events`, for test modules (a conftest is not imported by name)."""
    return draw_events


# --------------------------------------------------------------------------- two models that can be told apart


class RegionModels:
    """Two tiny models in one models folder: `a` plays near (0.2, 0.2), `b` near (0.8, 0.8)."""

    CENTRES = {"a": 0.2, "b": 0.8}
    RADIUS = 0.15  # a prediction is in a region if both coordinates are this close to its centre

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def region(self, x: float, y: float) -> str | None:
        """`a`, `b` or None: which model's region a position lies in."""
        for name, c in self.CENTRES.items():
            if abs(x - c) < self.RADIUS and abs(y - c) < self.RADIUS:
                return name
        return None

    def share(self, xy, name: str) -> float:
        """Fraction of positions in region ``name``."""
        return sum(self.region(x, y) == name for x, y in xy) / max(1, len(xy))


def region_dataset(centre: float, seed: int, performances: int = 12, length: int = 150):
    """Events near (centre, centre), with one in five anywhere on the pad so every input is familiar."""
    import numpy as np

    from server.learn.data import Dataset

    rng = np.random.default_rng(seed)
    perfs = []
    for _ in range(performances):
        dt = np.clip(rng.lognormal(np.log(0.05), 0.4, length), 0.0, 5.0)
        dt[0] = 0.0
        near = rng.random(length) < 0.8
        xy = np.where(near[:, None], rng.normal(centre, 0.04, (length, 2)), rng.uniform(0, 1, (length, 2)))
        perfs.append(np.column_stack([dt, np.clip(xy, 0.0, 1.0)]))
    return Dataset.from_performances(perfs)


@pytest.fixture(scope="session")
def region_models(tmp_path_factory) -> RegionModels:
    """Models `a` and `b` (xs, 8 epochs, ~10 s each), trained on data confined to different regions."""
    from server.learn.train import TrainConfig, train

    def build(folder: Path) -> None:
        for seed, (name, centre) in enumerate(RegionModels.CENTRES.items(), start=1):
            cfg = TrainConfig(size="xs", epochs=8, patience=8, seed=3, stride=10, report=False)
            train(region_dataset(centre, seed), name, folder, cfg, echo=lambda s: None)

    return RegionModels(built_once(tmp_path_factory, "region-models", build))
