"""Step engines: which one plays a model (LiteRT, numpy or TensorFlow), the file it reads, and building it.

`auto` takes the fastest the machine has: LiteRT where its wheel is installed, else the
numpy step of `step.npz` where the model has one, else TensorFlow on `model.keras`
(imported only then). `--step-engine` forces one. The choice is made from what was read,
so a model's proof in its child (`server.model.sandbox`) builds the very engine this
process will.
"""

from __future__ import annotations

from pathlib import Path

from server.model.files import ModelFiles, read_model
from server.model.litert import LiteRTStep, StepFunction, litert_available
from server.model.numpy_step import NumpyStep
from server.model.spec import ModelError

BACKENDS = ("auto", "litert", "numpy", "tensorflow")  # the step engines `--step-engine` may force
STEP_FILES = {"litert": "step.tflite", "numpy": "step.npz", "tensorflow": "model.keras"}  # what each builds from


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown step engine {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def read_for(folder: Path, backend: str = "auto", label: str | None = None) -> ModelFiles:
    """Read a model folder with the file ``backend`` builds its step from, checked against model.json.

    LiteRT: step.tflite; numpy: step.npz; TensorFlow: model.keras; auto: step.tflite
    where LiteRT is installed, else step.npz where the model has one, else model.keras.
    """
    if check_backend(backend) == "auto":
        if litert_available():
            return read_model(folder, ("step.tflite",), label)
        return read_model(folder, (), label, first_of=("step.npz", "model.keras"))
    return read_model(folder, (STEP_FILES[backend],), label)


def resolve_backend(model: ModelFiles, backend: str = "auto") -> str:
    """The engine ``backend`` means for ``model`` here: auto is LiteRT if installed, else numpy if the model
    has step.npz (as read), else TensorFlow; a forced engine is itself."""
    if check_backend(backend) != "auto":
        return backend
    if litert_available():
        return "litert"
    return "numpy" if "step.npz" in model.contents else "tensorflow"


def open_step(model: ModelFiles, backend: str = "auto") -> tuple[StepFunction, str]:
    """The step ``backend`` asks for (auto: the fastest available) for a model; returns it and the engine's name."""
    backend = resolve_backend(model, backend)
    if backend == "litert":
        if not litert_available():
            raise ModelError("LiteRT (ai-edge-litert) is not installed; use --step-engine numpy")
        return LiteRTStep(model.file("step.tflite"), model.info.spec, f"{model.label}/step.tflite"), "litert"
    if backend == "numpy":
        return NumpyStep(model.file("step.npz"), model.info.spec, f"{model.label}/step.npz"), "numpy"
    from server.model.network import TensorFlowStep, keras_model_from_bytes

    keras_model = keras_model_from_bytes(model.file("model.keras"), f"{model.label}/model.keras")
    return TensorFlowStep(keras_model, model.info.spec), "tensorflow"
