"""Model sizes and the `model.json` description of a model folder; no TensorFlow needed.

The live server reads only this and `step.tflite`, so it starts fast and never imports
TensorFlow when LiteRT is available.
"""

from __future__ import annotations

import json
import re
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.normalise import Normaliser

DIMS = 3  # (dt, x, y)
DEFAULT_MIXTURES = 5

# name -> (units, layers): the one list of sizes (CLI choices, docs and checks read it).
SIZES: dict[str, tuple[int, int]] = {"xs": (32, 2), "s": (64, 2), "m": (128, 2), "l": (256, 2)}
DEFAULT_SIZE = "s"

MODEL_FILES = ("model.keras", "step.tflite", "model.json")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class ModelError(ValueError):
    """A model folder is missing, corrupt or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    units: int
    layers: int
    mixtures: int = DEFAULT_MIXTURES
    dims: int = DIMS
    size: str = "custom"

    @classmethod
    def of_size(cls, size: str, mixtures: int = DEFAULT_MIXTURES) -> "ModelSpec":
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
        units, layers = SIZES[size]
        return cls(units=units, layers=layers, mixtures=mixtures, size=size)

    @property
    def state_size(self) -> int:
        """Length of the flat LSTM state vector: (h, c) for each layer."""
        return 2 * self.layers * self.units

    @property
    def param_size(self) -> int:
        return self.mixtures * (2 * self.dims + 1)


@dataclass(frozen=True)
class ModelInfo:
    """Everything in `model.json`."""

    spec: ModelSpec
    normaliser: Normaliser
    sequence_length: int
    dt_max: float
    validation_nll: float | None
    dataset_sha256: str
    versions: dict[str, str]
    created: str
    training: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256, written by export

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "spec": asdict(self.spec),
            "normalisation": self.normaliser.to_json(),
            "sequence_length": self.sequence_length,
            "dt_max": self.dt_max,
            "validation_nll_per_event": self.validation_nll,
            "dataset_sha256": self.dataset_sha256,
            "versions": self.versions,
            "created": self.created,
            "training": self.training,
            "files": self.files,
            "step_io": {
                "inputs": ["event [1, 3] normalised (dt, x, y)", f"state [1, {self.spec.state_size}]"],
                "outputs": [f"params [1, {self.spec.param_size}]", f"state [1, {self.spec.state_size}]"],
                "param_layout": "means K*D | scales K*D | logits K",
                "state_layout": "per layer: h (units), c (units)",
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelInfo":
        spec = ModelSpec(**d["spec"])
        if spec.dims != DIMS or spec.units <= 0 or spec.layers <= 0 or spec.mixtures <= 0:
            raise ValueError(f"unsupported spec {d['spec']}")
        norm = Normaliser.from_json(d["normalisation"])
        if len(norm.shift) != spec.dims:
            raise ValueError(f"normalisation has {len(norm.shift)} dimensions, the model {spec.dims}")
        return cls(
            spec=spec,
            normaliser=norm,
            sequence_length=int(d["sequence_length"]),
            dt_max=float(d["dt_max"]),
            validation_nll=None if d.get("validation_nll_per_event") is None else float(d["validation_nll_per_event"]),
            dataset_sha256=str(d.get("dataset_sha256", "")),
            versions=dict(d.get("versions", {})),
            created=str(d.get("created", "")),
            training=dict(d.get("training", {})),
            files={str(k): str(v) for k, v in d.get("files", {}).items()},
        )


def read_info(folder: Path) -> ModelInfo:
    """Read and check `model.json`, raising ModelError naming the file and what to do."""
    path = Path(folder) / "model.json"
    if not path.is_file():
        raise ModelError(f"{path} is missing; train or export the model again (python -m server train ...)")
    try:
        return ModelInfo.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path} is corrupt or from another version ({e}); re-export the model") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(folder: Path, info: ModelInfo, name: str) -> Path:
    """Check that ``folder/name`` exists and is the file export wrote (its SHA-256 in model.json).

    Catches a `step.tflite` or `model.keras` copied in from another model, which would
    otherwise play with the wrong normalisation.
    """
    path = Path(folder) / name
    if not path.is_file():
        raise ModelError(f"{path} is missing; re-export the model (python -m server train ...)")
    expected = info.files.get(name)
    if expected and sha256_file(path) != expected:
        raise ModelError(f"{path} does not match {Path(folder) / 'model.json'} (SHA-256 differs): "
                         "it belongs to another model or is damaged; re-export the model")
    return path


def resolve_model_dir(name_or_path: str, models_dir: Path, allow_paths: bool) -> Path:
    """Map a model name to `models_dir/<name>`; a path is accepted only where the caller allows it.

    OSC clients may name models only (no paths, no `..`); the command line may pass a path.
    """
    models_dir = Path(models_dir)
    is_name = bool(NAME_PATTERN.match(name_or_path)) and ".." not in name_or_path
    if is_name and ((models_dir / name_or_path).is_dir() or not allow_paths):
        return models_dir / name_or_path
    if not allow_paths:
        raise ModelError(f"{name_or_path!r} is not a model name (letters, digits, '-', '_', '.'; no paths)")
    path = Path(name_or_path)
    if not path.is_dir():
        found = sorted(p.name for p in models_dir.iterdir() if (p / "model.json").is_file()) if models_dir.is_dir() else []
        raise ModelError(
            f"no model folder {name_or_path!r} in {models_dir} (found: {', '.join(found) or 'none'}), "
            "nor a folder at that path; train one with python -m server train --name NAME"
        )
    return path
