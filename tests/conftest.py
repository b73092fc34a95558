"""Shared fixtures: a tiny trained model (trained once per session) and quiet TensorFlow."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="session")
def tiny_dataset():
    from server.learn.synth import synthetic_dataset

    return synthetic_dataset(performances=16, seed=7, phrases=6)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_dataset):
    """An `xs` model trained for a few epochs and exported: (folder, TrainResult)."""
    from server.learn.train import TrainConfig, train

    models = tmp_path_factory.mktemp("models")
    cfg = TrainConfig(size="xs", epochs=4, patience=4, seed=3, stride=10, report=True)
    result = train(tiny_dataset, "tiny", models, cfg, echo=lambda s: None)
    return result.folder, result
