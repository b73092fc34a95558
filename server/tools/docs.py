"""README sections generated from the code's own tables, so the docs cannot drift.

Sections sit between `<!-- BEGIN name -->` and `<!-- END name -->` markers;
`python -m server docs` rewrites them and `--check` (run by the tests) fails if stale.
"""

from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Callable, Mapping

PROGRAM = ".venv/bin/antiphon"  # the one spelling of a command in the docs: works after `make`


def _osc() -> str:
    from server.osc.namespace import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SEND_PORT, OUTPUTS, STREAMS, namespace_markdown

    rows = ["| address out | arguments and when |", "|---|---|"]
    rows += [f"| `{address}` | {meaning} |" for address, meaning in OUTPUTS.items()]
    rows += ["", "| stream (`/subscribe`) | sends |", "|---|---|"]
    rows += [f"| `{name}` | {meaning} |" for name, meaning in STREAMS.items()]
    return (
        f"Listens on `{DEFAULT_HOST}:{DEFAULT_PORT}` (UDP) and sends to `{DEFAULT_HOST}:{DEFAULT_SEND_PORT}` "
        f"unless told otherwise.\n\n{namespace_markdown()}\n\n" + "\n".join(rows)
    )


def _status() -> str:
    from server.live.engine import STATUS_KEYS
    from server.live.learning import Learner
    from server.live.recorder import Recorder
    from server.midi.link import MidiInput, MidiOutput
    from server.osc.output import OscStats
    from server.osc.protocol import OscServerProtocol

    groups = [
        ("", STATUS_KEYS),
        ("", Learner.STATUS_KEYS),
        ("", Recorder.STATUS_KEYS),
        ("osc_", {**OscStats.docs(), **OscServerProtocol.EXTRA_COUNTERS}),
        ("midi_in_", MidiInput.STATUS_KEYS),
        ("midi_out_", MidiOutput.STATUS_KEYS),
    ]
    rows = ["| key | meaning |", "|---|---|"]
    rows += [f"| `{prefix}{key}` | {meaning} |" for prefix, keys in groups for key, meaning in keys.items()]
    return "\n".join(rows) + "\n\n`midi_*` keys appear only when MIDI is in use."


def _modes() -> str:
    from server.live.modes import Mode

    return "\n".join(f"- `{m.value}`: {m.description}" for m in Mode)


def _sizes() -> str:
    from server.model.spec import DEFAULT_SIZE, SIZES

    rows = ["| size | LSTM units x layers |", "|---|---|"]
    rows += [f"| `{k}`{' (default)' if k == DEFAULT_SIZE else ''} | {u} x {layers} |" for k, (u, layers) in SIZES.items()]
    return "\n".join(rows)


def _config() -> str:
    from server.config import config_reference_markdown

    return config_reference_markdown()


def _commands(commands: Mapping[str, str]) -> str:
    return "\n".join(f"- `{PROGRAM} {name}`: {help}" for name, help in commands.items())


SECTIONS: dict[str, Callable[[], str]] = {
    "osc": _osc,
    "status": _status,
    "modes": _modes,
    "sizes": _sizes,
    "config": _config,
}


def render(text: str, commands: Mapping[str, str]) -> str:
    """Return ``text`` with every generated section replaced by its current content.

    `commands` (name -> help) comes from the caller, the command line, so this module
    never imports it back.
    """
    sections = {"commands": lambda: _commands(commands), **SECTIONS}
    for name, make in sections.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README lacks the markers for section {name!r}")
        body = make()
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def update(path: Path, check: bool, commands: Mapping[str, str]) -> bool:
    """Rewrite the README's generated sections; with ``check`` only report whether they are current."""
    text = path.read_text(encoding="utf-8")
    fresh = render(text, commands)
    if check:
        return fresh == text
    path.write_text(fresh, encoding="utf-8")
    return True
