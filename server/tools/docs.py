"""Sections of README.md and docs/*.md generated from the code's own tables, so the docs cannot drift.

Sections sit between `<!-- BEGIN name -->` and `<!-- END name -->` markers, each in exactly
one file; docs/README.md's table of contents (`toc`) is made from the headings of the
other pages. `python -m server docs` rewrites them and `--check` (run by the tests) fails
if any is stale.
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


def render(text: str, commands: Mapping[str, str], only: set[str] | None = None,
           toc: Callable[[], str] | None = None) -> str:
    """Return ``text`` with its generated sections replaced by their current content.

    ``only``: the sections this file must hold (None: all of them, as one README would).
    `commands` (name -> help) comes from the caller, the command line, so this module
    never imports it back.
    """
    sections = {"commands": lambda: _commands(commands), **SECTIONS}
    if toc is not None:
        sections["toc"] = toc
    for name, make in sections.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            if only is None or name in only:
                raise ValueError(f"the docs lack the markers for section {name!r}")
            continue
        body = make()
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def pages(repo: Path) -> list[Path]:
    """README.md, then docs/README.md (the index), then every other page of docs/ by name."""
    docs = repo / "docs"
    return [repo / "README.md", docs / "README.md", *sorted(p for p in docs.glob("*.md") if p.name != "README.md")]


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of each Markdown heading outside code fences."""
    out, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^(#{1,6}) (.+?)\s*$", line)):
            out.append((len(m.group(1)), m.group(2)))
    return out


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def table_of_contents(repo: Path) -> str:
    """Each docs page's title and its second- and third-level headings, linked."""
    lines = []
    for page in pages(repo)[2:]:
        found = headings(page.read_text(encoding="utf-8"))
        title = next((t for level, t in found if level == 1), page.stem)
        lines.append(f"- [{title}]({page.name})")
        lines += [f"{'  ' * (level - 1)}- [{t}]({page.name}#{slug(t)})" for level, t in found if level in (2, 3)]
    return "\n".join(lines)


def update(repo: Path, check: bool, commands: Mapping[str, str]) -> list[Path]:
    """Rewrite the generated sections of every page; with ``check`` only list the stale pages.

    Each section must sit in exactly one page (ValueError otherwise)."""
    texts = {page: page.read_text(encoding="utf-8") for page in pages(repo) if page.exists()}
    names = ["commands", "toc", *SECTIONS]
    for name in names:
        holders = [p.name for p, t in texts.items() if f"<!-- BEGIN {name} -->" in t]
        if len(holders) != 1:
            raise ValueError(f"section {name!r} should be in exactly one page, is in {holders or 'none'}")
    stale = []
    for page, text in texts.items():
        fresh = render(text, commands, only=set(), toc=lambda: table_of_contents(repo))
        if fresh != text:
            stale.append(page)
            if not check:
                page.write_text(fresh, encoding="utf-8")
    return stale
