"""The README as a user meets it: its Python snippet runs against a real server and fails clearly without one."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from tests.live import REPO, OscPeer, start_server

README = REPO / "README.md"


def snippet(port: int) -> str:
    """The README's first Python block, aimed at ``port`` instead of 5710."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert 'server = ("127.0.0.1", 5710)' in code
    return code.replace('server = ("127.0.0.1", 5710)', f'server = ("127.0.0.1", {port})')


def run(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_the_python_snippet_plays_and_leaves_the_server_as_it_found_it(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--mode", "respond", "--send", "127.0.0.1:9")
    peer = OscPeer()
    peer.target = ("127.0.0.1", srv.port)
    try:
        done = run(snippet(srv.port))
        status = peer.status()
    finally:
        assert srv.stop() == 0
        peer.close()
    assert done.returncode == 0, done.stderr
    answers = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(answers) == 9, done.stdout  # the answer to the gesture, then 8 played on its own
    for line in answers:
        x, y = (float(v) for v in line.strip("[]").split(","))
        assert 0 <= x <= 1 and 0 <= y <= 1
    assert status["mode"] == "respond"  # as the snippet found it, not generate


def test_the_python_snippet_says_so_within_seconds_when_no_server_runs() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run(snippet(port), timeout=30.0)  # not forever: the snippet's own timeout is 3 s
    assert done.returncode == 1
    assert f"no /prediction from 127.0.0.1:{port}: is the server running? (make run)" in done.stderr
    assert "Traceback" not in done.stderr


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _links(text: str) -> list[str]:
    """Every Markdown link target outside code fences and inline code."""
    out, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            out += LINK.findall(re.sub(r"`[^`]*`", "", line))
    return out


def test_every_link_and_anchor_in_the_readme_and_docs_resolves() -> None:
    from server.tools.docs import headings, pages, slug

    anchors = {page.resolve(): {slug(t) for _, t in headings(page.read_text())} for page in pages(REPO)}
    broken = []
    for page in pages(REPO):
        for target in _links(page.read_text()):
            if re.match(r"^[a-z]+:", target):  # https:, mailto: -- not this machine's to check
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page.resolve()
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors.get(file, {slug(t) for _, t in headings(file.read_text())}):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_reads_in_five_minutes_and_starts_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "## Contents" in text and "make run" in text.split("## Two commands")[1][:200]
    assert "make test" in text.split("## Two commands")[1][:200]
