"""Model folders: the one name rule, the one models folder, and reading a model whole, checked, into memory.

A model is read once: `model.json` and the bytes of the files a backend needs, each
checked against the SHA-256 that export recorded, all opened through one handle on the
folder so a concurrent re-export (an atomic rename of the folder) cannot mix two
models. The interpreter is then built from those bytes, never from a memory map of a
file someone may rewrite, so nothing done on disk after a load can change or kill the
playing model. No TensorFlow here: the live server reads models through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from server.model.spec import ModelError, ModelInfo

DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
MODEL_FILES = ("model.keras", "step.tflite", "model.json")
MAX_MODEL_BYTES = 512 << 20  # no model of ours comes near this; a bigger file is not one of them
READ_ATTEMPTS = 3  # a folder replaced while we read it is read again, from its new contents
REEXPORT = "re-export it (antiphon train ...)"

# ASCII only: a name must mean the same folder on every OS and file system.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def check_model_name(name: object) -> str:
    """Return `name` if it is a bare model folder name, else raise ValueError saying why.

    Allowed: 1-64 ASCII letters, digits, `-`, `_` and `.`, not starting with `.` and
    never containing `..`; so no separators, no drive letters, no absolute paths, no
    hidden folders and no control characters (`fullmatch`: a trailing newline fails).
    """
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use a bare folder name under models/ "
            "(1-64 letters, digits, '-', '_' or '.', not starting with '.', no '..')"
        )
    return name


def is_model_name(name: str) -> bool:
    try:
        check_model_name(name)
    except ValueError:
        return False
    return True


def available_models(models_dir: Path) -> list[str]:
    """Names of the model folders in `models_dir` (those with a model.json), sorted."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if is_model_name(p.name) and (p / "model.json").is_file())


def resolve_model_dir(name_or_path: str, models_dir: Path, allow_paths: bool) -> Path:
    """Map a model name to its folder inside `models_dir`; a path is accepted only where the caller allows it.

    A name must stay inside the models folder once symlinks are resolved, so a link
    planted in `models/` cannot load a model from elsewhere. OSC clients may name models
    only; the command line and config files may also give a folder path.
    """
    models_dir = Path(models_dir)
    if is_model_name(name_or_path):
        candidate = models_dir / name_or_path
        if candidate.is_dir() or not allow_paths:
            root = models_dir.resolve()
            real = candidate.resolve()
            if real.parent != root:
                raise ModelError(f"model {name_or_path!r} links outside the models folder; refusing to load it")
            if not real.is_dir():
                found = ", ".join(available_models(models_dir)) or "none"
                raise ModelError(f"no model {name_or_path!r} (available: {found})")
            return candidate
    elif not allow_paths:
        raise ModelError(f"{name_or_path!r} is not a model name (letters, digits, '-', '_', '.'; no paths)")
    path = Path(name_or_path)
    if not path.is_dir():
        found = ", ".join(available_models(models_dir)) or "none"
        raise ModelError(
            f"no model folder {name_or_path!r} in {models_dir} (found: {found}), "
            "nor a folder at that path; train one with antiphon train --name NAME"
        )
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(Path(path).read_bytes())


@dataclass(frozen=True)
class ModelFiles:
    """A model as read from disk: its description and the checked bytes of its files."""

    label: str  # how messages name it: the model name for OSC clients, the folder on the command line
    info: ModelInfo
    contents: dict[str, bytes]

    def file(self, name: str) -> bytes:
        try:
            return self.contents[name]
        except KeyError:
            raise ModelError(f"{self.label}: {name} was not read") from None


def read_info(folder: Path, label: str | None = None) -> ModelInfo:
    """Read and check `model.json` alone (for commands that only describe a model)."""
    return read_model(folder, (), label).info


def read_model(folder: Path, names: tuple[str, ...] = ("step.tflite",), label: str | None = None) -> ModelFiles:
    """Read `model.json` and the files `names`, verified against the SHA-256 in model.json.

    `label` names the model in errors (default: the folder path); pass the bare model
    name when the message goes to a client. A model.json without hashes is refused.
    Retries when the folder changes under it (a concurrent export), then gives up with
    a ModelError.
    """
    label = str(folder) if label is None else label
    error: ModelError | None = None
    for _ in range(READ_ATTEMPTS):
        try:
            return _read_once(Path(folder), names, label)
        except _Changed as exc:
            error = ModelError(
                f"{label}/{exc} does not match its model.json (SHA-256 differs): it belongs to another model, "
                f"is damaged or is being rewritten; {REEXPORT}"
            )
    assert error is not None
    raise error


class _Changed(Exception):
    """A file did not match model.json: maybe a half-replaced folder, so read again."""


def _read_once(folder: Path, names: tuple[str, ...], label: str) -> ModelFiles:
    try:
        dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        raise ModelError(f"{label} does not exist; train it first (antiphon train --name NAME)") from None
    except OSError as exc:
        raise ModelError(f"{label} cannot be opened ({exc.strerror or exc})") from None
    try:
        raw = _read_in(dir_fd, folder, "model.json", label)
        try:
            info = ModelInfo.from_json(json.loads(raw.decode("utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ModelError(f"{label}/model.json is corrupt or from another version ({exc}); {REEXPORT}") from None
        if not all(name in info.files for name in ("model.keras", "step.tflite")):
            raise ModelError(
                f"{label}/model.json records no SHA-256 of the model files (an older export), so they cannot "
                f"be checked; {REEXPORT}"
            )
        contents: dict[str, bytes] = {}
        for name in names:
            data = _read_in(dir_fd, folder, name, label)
            if sha256_bytes(data) != info.files[name]:
                raise _Changed(name)
            contents[name] = data
        return ModelFiles(label, info, contents)
    finally:
        os.close(dir_fd)


def _read_in(dir_fd: int, folder: Path, name: str, label: str) -> bytes:
    """One file of the folder behind `dir_fd` (no symlinks), whole; ModelError when it cannot be."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        if os.open in os.supports_dir_fd:
            fd = os.open(name, flags, dir_fd=dir_fd)
        else:  # Windows: no openat; the hashes still catch a mixed read
            fd = os.open(folder / name, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ModelError(f"{label}/{name} is missing; {REEXPORT}") from None
    except OSError as exc:
        raise ModelError(f"{label}/{name} cannot be read ({exc.strerror or exc}); {REEXPORT}") from None
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_MODEL_BYTES + 1)
    if len(data) > MAX_MODEL_BYTES:
        raise ModelError(f"{label}/{name} is larger than {MAX_MODEL_BYTES >> 20} MB; not a model file of ours")
    return data
