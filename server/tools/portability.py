"""`make portability`: can `pip install antiphon` get a binary wheel of every stage dependency, and which step runs?

For each platform a musician plays on (Linux x86_64 and aarch64, macOS arm64 and
x86_64, Windows amd64) and each Python from 3.11 to 3.13, pip's own resolver is asked,
as `pip download --only-binary=:all: --platform ... --python-version ...` would be, for
the stage's dependencies as pyproject.toml declares them, their markers evaluated for
that platform; `--dry-run --report` resolves from the index's metadata without fetching
the wheels. It needs the package registry, so it is no part of `make test`. These are
resolutions, not runs: only the machine's own platform is also run by the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
LITERT = "ai-edge-litert"
RTMIDI = "python-rtmidi"  # MIDI ports; OSC needs nothing of it
PYTHONS = ("3.11", "3.12", "3.13")


@dataclass(frozen=True)
class Platform:
    name: str
    system: str  # platform_system as markers see it
    machine: str  # platform_machine as markers see it
    tags: tuple[str, ...]  # pip --platform values, newest first (pip widens macOS tags to older versions itself)


def _manylinux(arch: str, newest: int) -> tuple[str, ...]:
    """glibc 2.17 (manylinux2014) up to `newest`: the wheels a distribution with that glibc can load."""
    return (*(f"manylinux_2_{minor}_{arch}" for minor in range(newest, 16, -1)), f"manylinux2014_{arch}")


PLATFORMS = (
    Platform("Linux x86_64", "Linux", "x86_64", _manylinux("x86_64", 35)),  # Ubuntu 22.04's glibc
    Platform("Linux aarch64 (Raspberry Pi OS 64-bit)", "Linux", "aarch64", _manylinux("aarch64", 36)),  # bookworm
    Platform("macOS arm64", "Darwin", "arm64", ("macosx_14_0_arm64",)),
    Platform("macOS x86_64", "Darwin", "x86_64", ("macosx_13_0_x86_64",)),
    Platform("Windows amd64", "Windows", "AMD64", ("win_amd64",)),
)

SYS_PLATFORM = {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}


def stage_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """What `pip install antiphon` installs (the train extra left out), as pyproject.toml says."""
    with pyproject.open("rb") as file:
        return [Requirement(line) for line in tomllib.load(file)["project"]["dependencies"]]


def marker_environment(platform: Platform, python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "platform_system": platform.system,
            "platform_machine": platform.machine, "sys_platform": SYS_PLATFORM[platform.system],
            "os_name": "nt" if platform.system == "Windows" else "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "extra": ""}


def resolves(requirements: list[str], platform: Platform, python: str) -> bool:
    """True if pip finds binary wheels for all of `requirements` and what they need, for that platform and Python."""
    if not requirements:
        return True
    abi = "cp" + python.replace(".", "")
    with tempfile.TemporaryDirectory() as target:
        argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                "--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", abi,
                "--target", target, "--report", str(Path(target) / "report.json"),
                *(arg for tag in platform.tags for arg in ("--platform", tag)), *requirements]
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=600).returncode == 0


@dataclass(frozen=True)
class Row:
    platform: str
    python: str
    missing: tuple[str, ...]  # stage dependencies with no binary wheel there
    engine: str
    midi: bool  # python-rtmidi installs (from a wheel) for MIDI ports
    note: str


def check(platform: Platform, python: str, requirements: list[Requirement]) -> Row:
    env = marker_environment(platform, python)
    needed = [r for r in requirements if r.marker is None or r.marker.evaluate(env)]
    plain = [_without_marker(r) for r in needed]
    missing: tuple[str, ...] = ()
    if not resolves(plain, platform, python):
        missing = tuple(r.name for r, text in zip(needed, plain) if not resolves([text], platform, python))
        missing = missing or ("(together)",)
    litert = next((r for r in requirements if r.name == LITERT), None)
    wanted = any(r.name == LITERT for r in needed)
    engine = "LiteRT" if wanted and LITERT not in missing else "numpy"
    note = ""
    if not wanted and litert is not None and resolves([_without_marker(litert)], platform, python):
        note = f"{litert} has a wheel here: the marker leaves it out"
    midi = any(r.name == RTMIDI for r in needed) and RTMIDI not in missing
    return Row(platform.name, python, missing, engine, midi, note)


def _without_marker(requirement: Requirement) -> str:
    return f"{requirement.name}{requirement.specifier}"


def table(rows: list[Row]) -> str:
    lines = ["| platform | Python | every stage dependency has a binary wheel | step engine | MIDI ports |",
             "|---|---|---|---|---|"]
    for r in rows:
        wheels = "yes" if not r.missing else "no: " + ", ".join(r.missing)
        midi = "yes" if r.midi else f"{RTMIDI} by hand"
        lines.append(f"| {r.platform} | {r.python} | {wheels}{' (' + r.note + ')' if r.note else ''} | {r.engine} "
                     f"| {midi} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.tools.portability", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    requirements = stage_requirements()
    combos = [(p, v) for p in PLATFORMS for v in PYTHONS]
    with ThreadPoolExecutor(max_workers=4) as pool:  # pip waits on the network, not the CPU
        rows = list(pool.map(lambda c: check(c[0], c[1], requirements), combos))
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return 0 if all(not r.missing for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
