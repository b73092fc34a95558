"""Tiny untrained networks for fast tests: built, converted and exported in a second or two, never trained.

`tests/fast.py` skips training (~10 s of TensorFlow a mutant), so the tests of export, the
TensorFlow step, the sandbox and the fine-tune build their models here instead: an LSTM of a
few units with random (seeded) weights is as good as a trained one for checking that the
exported step reproduces the Keras model, that a broken file is refused, and what a
fine-tune writes. TensorFlow is imported inside the functions, never at collection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

UNITS, LAYERS, MIXTURES = 3, 2, 2  # two layers, so the flat state's per-layer slices are exercised


def performance(n: int, seed: int = 0, dt: float | None = None) -> np.ndarray:
    """``[n, 3]`` events (dt, x, y) of one phrase: waits between 20 and 200 ms (or all ``dt``), places mid-pad."""
    rng = np.random.default_rng(seed)
    waits = rng.uniform(0.02, 0.2, n) if dt is None else np.full(n, dt)
    events = np.column_stack([waits, rng.uniform(0.2, 0.8, (n, 2))]).astype(np.float32)
    events[0, 0] = 0.0
    return events


def tiny_spec(units: int = UNITS, layers: int = LAYERS, mixtures: int = MIXTURES):
    from server.model.spec import ModelSpec

    return ModelSpec(units=units, layers=layers, mixtures=mixtures)


def tiny_info(spec=None, dt_max: float = 5.0, **fields):
    """A `ModelInfo` for ``spec`` with a normaliser fitted on `performance(300)`."""
    from server.model.normalise import Normaliser
    from server.model.spec import ModelInfo

    spec = spec or tiny_spec()
    norm = Normaliser.fit(performance(300, seed=1), dt_max, detect=False)
    base = dict(spec=spec, normaliser=norm, sequence_length=24, dt_max=dt_max, validation_nll=None,
                dataset_sha256="0" * 64, versions={}, created="", training={})
    return ModelInfo(**{**base, **fields})


def tiny_model(spec=None, seed: int = 0, dropout: float = 0.0):
    """An untrained `build_model` network with seeded random weights (LSTM biases and head randomised too)."""
    from server.model.network import build_model, keras

    spec = spec or tiny_spec()
    keras.utils.set_random_seed(seed)
    model = build_model(spec, dropout=dropout)
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0.0, 0.3, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def check_events(n: int = 200, seed: int = 2) -> np.ndarray:
    """Normalised events to drive a model with: ``[n, 3]`` float32."""
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, 3)).astype(np.float32)


def export_tiny(folder: Path, model=None, info=None, seed: int = 0) -> Path:
    """Export a tiny network (``model`` or a new one) as a checked model folder; returns the folder."""
    from server.model.export import export

    info = info or tiny_info()
    model = model if model is not None else tiny_model(info.spec, seed)
    return export(model, info, folder, check_events(50))


def export_wide(folder: Path, values: int, seed: int = 0) -> Path:
    """A tiny untrained model of ``values`` values per event (dt then N), exported and checked: a live test's
    controller of any width in a second or two."""
    from server.model.normalise import Normaliser
    from server.model.spec import ModelSpec

    rng = np.random.default_rng(seed)
    events = np.column_stack([rng.uniform(0.02, 0.2, 300), rng.uniform(0.0, 1.0, (300, values))]).astype(np.float32)
    spec = ModelSpec(units=UNITS, layers=LAYERS, mixtures=MIXTURES, dims=1 + values)
    info = tiny_info(spec, normaliser=Normaliser.fit(events, 5.0, detect=False))
    checks = rng.normal(0.0, 1.0, (50, 1 + values)).astype(np.float32)
    from server.model.export import export

    return export(tiny_model(spec, seed), info, folder, checks)


def sequence_params(model, events: np.ndarray) -> np.ndarray:
    """The Keras sequence model's parameters ``[T, P]`` for ``events [T, 3]`` from a zero state."""
    return model(np.asarray(events, np.float32)[None], training=False).numpy()[0]


def step_params(step, events: np.ndarray, state_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A one-step function run over ``events`` from a zero state: its parameters ``[T, P]`` and last state."""
    state = np.zeros((1, state_size), np.float32)
    out = []
    for t in range(len(events)):
        params, state = step(np.asarray(events[t : t + 1], np.float32), state)
        out.append(np.array(params))
    return np.array(out), state
