"""Model names: one rule for the CLI, the config file and `/model`, so no client can reach outside models/."""

from __future__ import annotations

import re

# ASCII only: a name must mean the same folder on every OS and file system.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def check_model_name(name: str) -> str:
    """Return `name` if it is a bare model folder name, else raise ValueError saying why.

    Allowed: 1-64 ASCII letters, digits, `-`, `_` and `.`, not starting with `.` and
    never containing `..`; so no separators, no drive letters, no absolute paths and no
    hidden folders.
    """
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use a bare folder name under models/ "
            "(1-64 letters, digits, '-', '_' or '.', not starting with '.', no '..')"
        )
    return name
