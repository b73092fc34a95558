"""Model folders: the one name rule, the one models folder, and reading a model whole, checked, into memory.

A model is read once: `model.json` and the bytes of the files a backend needs, each
checked against the SHA-256 that export recorded, all opened through one handle on the
folder so a concurrent re-export (an atomic rename of the folder) cannot mix two
models. The interpreter is then built from those bytes, never from a memory map of a
file someone may rewrite, so nothing done on disk after a load can change or kill the
playing model. No TensorFlow here: the live server reads models through this module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from server.model.spec import ModelError, ModelInfo
from server.places import SHIPPED_MODELS_DIR

DEFAULT_MODELS_DIR = SHIPPED_MODELS_DIR  # the models Antiphon ships (default, touch, chorale); read-only to users
MODEL_FILES = ("model.keras", "step.tflite", "step.npz", "model.json")  # older exports lack step.npz
MAX_MODEL_BYTES = 512 << 20  # no model of ours comes near this; a bigger file is not one of them
READ_ATTEMPTS = 3  # a folder replaced while we read it is read again, from its new contents
RETRY_PAUSE = 0.01  # seconds before a second read: long enough for an export's two renames to finish
REEXPORT = "re-export it (antiphon train --data DATASET.npz --name NAME writes a complete, checked model)"

# ASCII only: a name must mean the same folder on every OS and file system.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
    """Names of the model folders in `models_dir` (those with a model.json), sorted; [] if it cannot be listed."""
    try:
        entries = list(Path(models_dir).iterdir())
    except (OSError, ValueError):
        return []
    return sorted(p.name for p in entries if is_model_name(p.name) and os.path.isfile(p / "model.json"))


def all_models(models_dir: Path, shipped: Path = SHIPPED_MODELS_DIR) -> list[str]:
    """Every model a name can load: those in `models_dir` and those Antiphon ships, sorted, each once."""
    return sorted(set(available_models(models_dir)) | set(available_models(shipped)))


def resolve_model_dir(name_or_path: str, models_dir: Path, allow_paths: bool, shipped: Path = SHIPPED_MODELS_DIR) -> Path:
    """Map a model name to its folder inside `models_dir`, else among the shipped models; a path is accepted only
    where the caller allows it.

    A name must stay inside its models folder once symlinks are resolved, so a link
    planted in `models/` cannot load a model from elsewhere; a link that stays inside
    is returned resolved, because `read_model` never follows a link at the last step
    (so one swapped in after this check cannot be followed either). OSC clients may
    name models only; the command line and config files may also give a folder path.
    Errors about a name never show a path: they may go back to a client.
    """
    models_dir = Path(models_dir)
    if is_model_name(name_or_path):
        # the user's folder first, so a model trained under a shipped name replaces it for that user
        home = next((root for root in (models_dir, shipped) if os.path.isdir(root / name_or_path)), None)
        if home is not None or not allow_paths:
            return _model_in(home or models_dir, name_or_path, shipped)
    elif not allow_paths:
        raise ModelError(f"{name_or_path!r} is not a model name (letters, digits, '-', '_', '.'; no paths)")
    path = Path(name_or_path)
    if not os.path.isdir(path):
        found = ", ".join(available_models(models_dir)) or "none"
        raise ModelError(
            f"no model folder {name_or_path!r} in {models_dir} (found: {found}{_shipped_note(shipped)}), "
            "nor a folder at that path; train one with antiphon train --name NAME"
        )
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def _shipped_note(shipped: Path) -> str:
    return f"; shipped: {', '.join(available_models(shipped)) or 'none'}"


def _model_in(models_dir: Path, name: str, shipped: Path) -> Path:
    """`models_dir/name` once checked to be a folder directly inside `models_dir` (links resolved)."""
    candidate = models_dir / name
    root, real = Path(os.path.realpath(models_dir)), Path(os.path.realpath(candidate))
    if real.parent != root:
        raise ModelError(f"model {name!r} links outside the models folder; refusing to load it")
    if not os.path.isdir(real):
        found = ", ".join(available_models(models_dir)) or "none"
        raise ModelError(f"no model {name!r} (available: {found}{_shipped_note(shipped)})")
    return real if os.path.islink(candidate) else candidate


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


def read_model(folder: Path, names: tuple[str, ...] = ("step.tflite",), label: str | None = None, *,
               first_of: tuple[str, ...] = ()) -> ModelFiles:
    """Read `model.json` and the files `names`, verified against the SHA-256 in model.json.

    ``first_of``: also read the first of these files that model.json records (a step
    engine with a fallback: `step.npz` where the model has one, else `model.keras`).

    `label` names the model in errors (default: the folder path); pass the bare model
    name when the message goes to a client. A model.json without hashes is refused, and
    so is a folder whose last step is a symlink (resolve it first: `resolve_model_dir`).
    A file that is missing or does not match may be a re-export caught half way, so the
    folder is read again, whole, after a pause; then a ModelError says what is wrong.
    """
    label = str(folder) if label is None else label
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_once(Path(folder), names, label, first_of)
        except _Inconsistent as exc:
            if attempt + 1 == READ_ATTEMPTS:
                raise ModelError(str(exc)) from None
            time.sleep(RETRY_PAUSE * (attempt + 1))
    raise AssertionError("unreachable")


class _Inconsistent(ModelError):
    """A file is missing or does not match model.json: maybe a folder being replaced, so read again."""


def _read_once(folder: Path, names: tuple[str, ...], label: str, first_of: tuple[str, ...] = ()) -> ModelFiles:
    dir_fd = _open_folder(folder, label)
    try:
        raw = _read_in(dir_fd, folder, "model.json", label)
        try:
            info = ModelInfo.from_json(json.loads(raw.decode("utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ModelError(f"{label}/model.json is corrupt or from another version ({exc}); {REEXPORT}") from None
        if not all(isinstance(info.files.get(name), str) for name in ("model.keras", "step.tflite")):
            raise ModelError(
                f"{label}/model.json records no SHA-256 of the model files (an older export), so they cannot "
                f"be checked; {REEXPORT}"
            )
        recorded = [name for name in first_of if isinstance(info.files.get(name), str)]
        names = tuple(names) + tuple(recorded[:1])
        for name in names:
            if not isinstance(info.files.get(name), str):
                raise ModelError(f"{label}/model.json records no {name} (the model was exported before {name} "
                                 f"existed); add it with antiphon numpy-step --model MODEL, or {REEXPORT}")
        contents: dict[str, bytes] = {}
        for name in names:
            data = _read_in(dir_fd, folder, name, label)
            if sha256_bytes(data) != info.files[name]:
                raise _Inconsistent(
                    f"{label}/{name} does not match its model.json (SHA-256 differs): it belongs to another "
                    f"model, is damaged or is being rewritten; {REEXPORT}"
                )
            contents[name] = data
        return ModelFiles(label, info, contents)
    finally:
        os.close(dir_fd)


def _open_folder(folder: Path, label: str) -> int:
    """A handle on the folder itself, never through a symlink at its last step."""
    flags = os.O_RDONLY | _O_DIRECTORY
    try:
        if os.open not in os.supports_dir_fd or folder.name in ("", ".", ".."):
            return os.open(folder, flags)  # Windows (no openat), or a path with no last name to check
        parent = os.open(folder.parent, flags)
        try:
            return os.open(folder.name, flags | _O_NOFOLLOW, dir_fd=parent)
        finally:
            os.close(parent)
    except FileNotFoundError:
        raise ModelError(f"{label} does not exist; train it first (antiphon train --name NAME)") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise ModelError(f"{label} is not a folder (or is a symbolic link); give the model folder itself") from None
        raise ModelError(f"{label} cannot be opened ({exc.strerror or exc})") from None
    except ValueError as exc:  # a NUL in a path from a config file
        raise ModelError(f"{label} is not a usable path ({exc})") from None


def _read_in(dir_fd: int, folder: Path, name: str, label: str) -> bytes:
    """One regular file of the folder behind `dir_fd` (no symlinks, no FIFOs), whole; ModelError otherwise."""
    flags = os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        if os.open in os.supports_dir_fd:
            fd = os.open(name, flags, dir_fd=dir_fd)
        else:  # Windows: no openat; the hashes still catch a mixed read
            fd = os.open(folder / name, flags)
    except FileNotFoundError:
        raise _Inconsistent(f"{label}/{name} is missing; {REEXPORT}") from None
    except OSError as exc:
        raise ModelError(f"{label}/{name} cannot be read ({exc.strerror or exc}); {REEXPORT}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelError(f"{label}/{name} is not a regular file; {REEXPORT}")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise ModelError(f"{label}/{name} cannot be read ({exc.strerror or exc}); {REEXPORT}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_MODEL_BYTES:
        raise ModelError(f"{label}/{name} is larger than {MAX_MODEL_BYTES >> 20} MB; not a model file of ours")
    return data
