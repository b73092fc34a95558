"""Proving a model before the server runs it: its step built and run first in a short-lived child process.

A model whose files match their SHA-256 can still be unsafe to run: the hash proves the
bytes are the ones export wrote, not that the interpreter survives them (one flipped bit
in `step.tflite` can crash the process with SIGSEGV, hang it, or make it answer NaN).
So before a step is built in the server, `prove` hands the very bytes that were read and
checked to a child process (`python -m server.model.sandbox_child`), which builds the step
from them and plays it: a neutral start, a fixed walk of events over the pad, its edges
and waits from 0 to `dt_max`, a draw from the sampler after each, and a reset. Every
output must have its expected shape and be finite, the whole run must end within the
time limit, and the child must exit cleanly. A crash, a hang or a non-finite output
refuses the model with a `ModelError` that names it by its label (the bare model name
for OSC clients), never by a path.

The child imports numpy and the model package only (LiteRT, or nothing more for the
numpy step, or TensorFlow for a model without step.npz where LiteRT is missing), never the live server, and writes no core
file. It costs one short-lived process: see docs/stage.md, "Models proven in a sandbox".
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from server.model.files import ModelFiles
from server.model.litert import litert_available
from server.model.engines import resolve_backend
from server.model.spec import ModelError, ModelInfo

log = logging.getLogger(__name__)

PROOF_SECONDS = 10.0  # the whole test run (process start, imports, build, steps): LiteRT or numpy need ~0.2 s
PROOF_SECONDS_TENSORFLOW = 120.0  # the fallback step imports TensorFlow first: ~7 s on the 2-core VM
PROOF_EVENTS = 24  # events played in the test run (after the neutral start), then a reset
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `server/`, for the child's import path
_CHILD = (sys.executable, "-m", "server.model.sandbox_child")  # reads the model on stdin, one JSON line on stdout


def prove(model: ModelFiles, backend: str, seconds: float | None = None) -> None:
    """Build and run ``model``'s step for ``backend`` (as `Predictor` takes it) in a child; ModelError if it fails.

    Blocks for the child's run (a fraction of a second with LiteRT): call it off the
    event loop. ``seconds`` is the time limit (default: `PROOF_SECONDS`, or
    `PROOF_SECONDS_TENSORFLOW` for the fallback).
    """
    if backend == "litert" and not litert_available():
        return  # nothing to build: the caller's own open_step says LiteRT is missing
    backend = resolve_backend(model, backend)  # decided here: the child must not pick an engine this process would not
    if seconds is None:
        seconds = PROOF_SECONDS_TENSORFLOW if backend == "tensorflow" else PROOF_SECONDS
    payload = _payload(model, backend)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    label, what = model.label, tested(model)
    try:
        done = subprocess.run(_CHILD, input=payload, capture_output=True, timeout=seconds, env=env)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{what} did not finish a test run within {seconds:g} s (a hang?): not played") from None
    except OSError as exc:
        raise ModelError(f"{what} could not be tested ({exc.strerror or exc}): not played") from None
    report = _last_json(done.stdout)
    tail = done.stderr.decode("utf-8", "replace").strip().splitlines()
    if done.returncode < 0:
        if tail:
            log.debug("model %s: test run died; its last words: %s", label, tail[-1][:300])
        raise ModelError(f"{what} crashed a test run in a separate process ({_signal_name(-done.returncode)}): "
                         "the file may be damaged; not played")
    if "refused" in report:
        if report.get("detail"):
            log.debug("model %s: test run refused it: %s", label, report["detail"])
        raise ModelError(str(report["refused"]))
    if done.returncode != 0 or not report.get("ok"):
        if tail:
            log.debug("model %s: test run failed: %s", label, tail[-1][:300])
        raise ModelError(f"{what} failed its test run (exit {done.returncode}): not played")


def tested(model: ModelFiles) -> str:
    """How messages name the file under test: ``label/step.tflite`` (``step.npz`` or ``model.keras`` without LiteRT)."""
    name = next((n for n in ("step.tflite", "step.npz") if n in model.contents), "model.keras")
    return f"{model.label}/{name}"


def _payload(model: ModelFiles, backend: str) -> bytes:
    """What the child reads on stdin: a JSON header line, then the named files' bytes in its order."""
    names = sorted(model.contents)
    header = {"label": model.label, "backend": backend, "info": model.info.to_json(),
              "files": [[name, len(model.contents[name])] for name in names]}
    return json.dumps(header).encode() + b"\n" + b"".join(model.contents[name] for name in names)


def _last_json(out: bytes) -> dict[str, Any]:
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def read_payload(stream: Any) -> tuple[ModelFiles, str]:
    """The child's side of `_payload`: the model files and the backend to build them with."""
    header = json.loads(stream.readline())
    contents = {str(name): stream.read(int(size)) for name, size in header["files"]}
    return ModelFiles(str(header["label"]), ModelInfo.from_json(header["info"]), contents), str(header["backend"])
