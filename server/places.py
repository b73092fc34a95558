"""Where Antiphon's files live: what it ships (models, patches) and the one per-user folder for what a user makes.

A wheel carries the shipped models and patches as package data under `server/shipped/`
(mapped at build time from the repository's top-level `models/` and `patches/`, see
setup.py); a checkout reads those top-level folders themselves. What a user trains,
learns on stage or records goes to the per-user data folder (platformdirs:
`~/.local/share/antiphon` on Linux), never into the package or the repository, unless
`--models-dir` / `--log-dir` say otherwise. The folder is looked up when asked for, so
`XDG_DATA_HOME` (or the platform's own setting) set by the caller is honoured.
"""

from __future__ import annotations

from pathlib import Path

from platformdirs import user_data_dir

PACKAGE = Path(__file__).resolve().parent
APP_NAME = "antiphon"


def _shipped(name: str) -> Path:
    """The package data in a wheel, else the checkout's top-level folder of that name."""
    inside = PACKAGE / "shipped" / name
    return inside if inside.is_dir() else PACKAGE.parent / name


SHIPPED_MODELS_DIR = _shipped("models")
PATCHES_DIR = _shipped("patches")


def user_folder() -> Path:
    """The per-user data folder: the user's models and performance logs live under it."""
    return Path(user_data_dir(APP_NAME, appauthor=False))


def user_models_dir() -> Path:
    return user_folder() / "models"


def user_logs_dir() -> Path:
    return user_folder() / "logs"


def copy_patches(dest: Path) -> list[Path]:
    """Copy the client patches into `dest` (created if missing) and return the files written.

    Nothing is overwritten: if any file is already there, FileExistsError names it and
    nothing is copied, so a patch the user has edited is never lost.
    """
    sources = sorted(p for p in PATCHES_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    targets = [dest / p.relative_to(PATCHES_DIR) for p in sources]
    taken = [t for t in targets if t.exists() or t.is_symlink()]
    if taken:
        raise FileExistsError(f"{taken[0]} already exists ({len(taken)} of the {len(targets)} patch files are "
                              f"there); copy into another folder or move those away")
    for source, target in zip(sources, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return targets
