"""The wheel's package data that lives outside server/: the shipped models and the client patches.

The repository keeps models/ and patches/ at its top level (DESIGN.md's layout); the
wheel carries them as `server/shipped/models/<name>` and `server/shipped/patches/...` by
mapping those package names onto the top-level folders, so nothing is copied into the
tree. Only the models named here ship: anything else in models/ stays out of the wheel.
`server.places` finds them in the wheel, and at the top level in a checkout.
Everything else about the package is in pyproject.toml.
"""

import os

from setuptools import find_packages, setup

SHIPPED_MODELS = ("default", "touch", "chorale")


def _folders(root: str) -> list[str]:
    """`root` and every folder under it (setuptools maps package data per folder)."""
    return sorted(path for path, _, _ in os.walk(root) if "__pycache__" not in path.split(os.sep))


DATA = {"server.shipped." + folder.replace(os.sep, "."): folder
        for folder in [*(os.path.join("models", name) for name in SHIPPED_MODELS), *_folders("patches")]}

setup(
    packages=find_packages(include=["server", "server.*"]) + list(DATA),
    package_dir=DATA,
    package_data={"server.monitor": ["static/*"], **{name: ["*"] for name in DATA}},
)
