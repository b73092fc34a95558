"""Model sizes and the `model.json` description of a model; no TensorFlow needed.

The live server reads only this and `step.tflite`, so it starts fast and never imports
TensorFlow when LiteRT is available.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from server.model.dims import DIMS, MAX_VALUES, check_values, value_names
from server.model.normalise import Normaliser

DEFAULT_MIXTURES = 5

# name -> (units, layers): the one list of sizes (CLI choices, docs and checks read it).
SIZES: dict[str, tuple[int, int]] = {"xs": (32, 2), "s": (64, 2), "m": (128, 2), "l": (256, 2)}
DEFAULT_SIZE = "s"



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
    def of_size(cls, size: str, mixtures: int = DEFAULT_MIXTURES, dims: int = DIMS) -> "ModelSpec":
        """A named size for events of ``dims`` columns (dt and ``dims - 1`` values)."""
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
        check_values(dims - 1, "a model")
        units, layers = SIZES[size]
        return cls(units=units, layers=layers, mixtures=mixtures, dims=dims, size=size)

    @property
    def values(self) -> int:
        """N: the values after dt in each event."""
        return self.dims - 1

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
    validation_nll_dequantised: float | None = None  # quantised coordinates integrated over their cells
    data: dict[str, Any] = field(default_factory=dict)  # where the training data came from, its licence
    lineage: dict[str, Any] = field(default_factory=dict)  # for a fine-tuned model: parent, session, figures
    sampling: dict[str, Any] = field(default_factory=dict)  # the model's own defaults, e.g. a calibrated sigma_temperature

    @property
    def sigma_temperature(self) -> float:
        """The scale temperature this model plays at unless told otherwise: calibrated at training, else 1."""
        return float(self.sampling.get("sigma_temperature", 1.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "spec": asdict(self.spec),
            "normalisation": self.normaliser.to_json(),
            "sequence_length": self.sequence_length,
            "dt_max": self.dt_max,
            "validation_nll_per_event": self.validation_nll,
            "validation_nll_per_event_dequantised": self.validation_nll_dequantised,
            "dataset_sha256": self.dataset_sha256,
            "versions": self.versions,
            "created": self.created,
            "training": self.training,
            "files": self.files,
            "data": self.data,
            "lineage": self.lineage,
            "sampling": self.sampling,
            "step_io": {
                "inputs": [f"event [1, {self.spec.dims}] normalised (dt, {', '.join(value_names(self.spec.values))})",
                           f"state [1, {self.spec.state_size}]"],
                "outputs": [f"params [1, {self.spec.param_size}]", f"state [1, {self.spec.state_size}]"],
                "param_layout": "means K*D | scales K*D | logits K",
                "state_layout": "per layer: h (units), c (units)",
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelInfo":
        spec = ModelSpec(**d["spec"])
        if (not isinstance(spec.dims, int) or not 2 <= spec.dims <= 1 + MAX_VALUES
                or spec.units <= 0 or spec.layers <= 0 or spec.mixtures <= 0):
            raise ValueError(f"unsupported spec {d['spec']} (dims counts dt: 2 to {1 + MAX_VALUES})")
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
            validation_nll_dequantised=_optional_float(d.get("validation_nll_per_event_dequantised")),
            data=dict(d.get("data", {})),
            lineage=dict(d.get("lineage", {})),
            sampling=_sampling(d.get("sampling", {})),
        )


def _sampling(d: Any) -> dict[str, Any]:
    """`model.json`'s sampling defaults, checked: a sigma_temperature must be a finite number >= 0."""
    if not isinstance(d, dict):
        raise ValueError("sampling must be an object")
    sigma = d.get("sigma_temperature", 1.0)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0.0 <= sigma < float("inf"):
        raise ValueError(f"sampling.sigma_temperature must be a finite number >= 0, got {sigma!r}")
    return dict(d)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)

