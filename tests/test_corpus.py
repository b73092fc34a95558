"""`make corpus`'s converter (music21's own scores to MIDI files) and `make corpus-train`'s worker launcher.

Real files throughout: music21's corpus as installed, tunes cut from it, and the MIDI
read back by mido; the launcher runs stand-in commands, so no test trains a model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mido
import pytest

pytest.importorskip("music21")

from music21 import corpus as m21corpus  # noqa: E402

from server.tools import corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FOLK = Path(m21corpus.getComposer("miscFolk")[0]).parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _notes(path: Path) -> int:
    return sum(1 for track in mido.MidiFile(path).tracks for m in track if m.type == "note_on" and m.velocity > 0)


def _tune(x: int) -> str:
    """Tune X:`x` of the American fife book music21 ships, as ABC text."""
    text = (FOLK / "americanfifeopus.abc").read_text(encoding="utf-8", errors="replace")
    start = text.index(f"\nX:{x}\n") + 1
    end = text.find("\nX:", start + 1)
    return text[start:end if end > 0 else None].rstrip() + "\n"


def test_two_collections_become_midi_files_mido_reads_and_a_rerun_changes_nothing(tmp_path):
    out = tmp_path / "midi"
    run = _cli("server.tools.corpus", "build", str(out), "--collections", "bach,ryansMammoth", "--limit", "2",
               "--jobs", "2")
    assert run.returncode == 0, run.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mid"))
    assert [f for f in files if f.startswith("bach/")] == ["bach/bwv1.6.mid", "bach/bwv10.7.mid"]
    assert len([f for f in files if f.startswith("ryansMammoth/")]) == 2
    notes = {f: _notes(out / f) for f in files}
    assert all(n > 100 for n in notes.values()), notes  # a chorale's four voices, a reel played through its repeats
    assert f"bach: 2 MIDI files from 2 score files, {notes['bach/bwv1.6.mid'] + notes['bach/bwv10.7.mid']:,} notes" \
        in run.stdout
    assert f"total: 4 MIDI files (4 new or changed), {sum(notes.values()):,} notes; 0 pieces failed" in run.stdout
    assert "Margaret Greentree" in (out / "SOURCES.txt").read_text()

    before = {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in files}
    again = _cli("server.tools.corpus", "build", str(out), "--collections", "bach,ryansMammoth", "--limit", "2",
                 "--jobs", "1")
    assert again.returncode == 0, again.stderr
    assert "total: 4 MIDI files (0 new or changed)" in again.stdout
    assert {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in files} == before  # not even rewritten
    assert not list(out.rglob("*.tmp"))


def test_a_collection_left_out_for_its_terms_is_refused_with_the_reason(tmp_path):
    run = _cli("server.tools.corpus", "build", str(tmp_path), "--collections", "bach,palestrina")
    assert run.returncode == 2 and "palestrina is left out" in run.stderr and "derivative" in run.stderr
    assert not list(tmp_path.iterdir())


def test_pieces_that_fail_are_counted_and_named_and_the_rest_are_written(tmp_path):
    src, out = tmp_path / "src", tmp_path / "midi"
    src.mkdir()
    rests = "X:99\nT:Rests only\nM:4/4\nL:1/4\nK:C\nz4|z4|]\n"
    (src / "book.abc").write_text(_tune(1) + "\n" + _tune(8) + "\n" + rests)  # music21 cannot expand X:8's repeats
    (src / "broken.mxl").write_bytes(b"PK\x03\x04 not a zip")
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "stale.mid").write_bytes(b"from an earlier build")
    chorale = Path(m21corpus.getWork("bwv66.6"))
    todo = [("bach", chorale), ("mine", src / "book.abc"), ("mine", src / "broken.mxl")]
    lines: list[str] = []

    results = corpus.build(todo, out, jobs=2, echo=lines.append)

    assert [r.source for r in results] == ["bach/bwv66.6.mxl", "mine/book.abc", "mine/broken.mxl"]
    assert [name for name, _ in results[1].written] == ["mine/book-001.mid"]
    assert [piece for piece, _ in results[1].failed] == ["mine/book-002.mid", "mine/book-003.mid"]
    assert results[1].failed[1][1] == "no notes" and not (out / "mine" / "book-003.mid").exists()
    assert [piece for piece, _ in results[2].failed] == ["mine/broken.mxl"]
    assert _notes(out / "mine" / "book-001.mid") == results[1].written[0][1] > 0
    assert _notes(out / "bach" / "bwv66.6.mid") > 0
    assert len(lines) == 3 and lines[-1].startswith("converting: 3/3 score files, 2 pieces written, 3 failed")
    assert corpus.prune(out, results) == 1 and not (out / "mine" / "stale.mid").exists()
    text = "\n".join(corpus.summary(results))
    assert "mine: 1 MIDI files from 2 score files" in text and ", 3 failed" in text
    assert "3 pieces failed" in text
    assert "failed: mine/book-002.mid: " in text and "failed: mine/broken.mxl: " in text


def test_a_tune_whose_time_signature_music21_put_in_two_measures_still_converts(tmp_path):
    # O'Neill's first tune: the ABC reader puts one TimeSignature object in bars 0 and 18
    oneills = Path(m21corpus.getComposer("oneills1850")[0])
    text = oneills.read_text(encoding="utf-8", errors="replace")
    first = text[text.index("X: 1"):text.index("X: 2")]
    (tmp_path / "enchanted.abc").write_text(first)
    got = corpus.convert_file("oneills1850", tmp_path / "enchanted.abc", tmp_path / "out")
    assert got.failed == [] and got.written[0][0] == "oneills1850/enchanted.mid"
    assert _notes(tmp_path / "out" / "oneills1850" / "enchanted.mid") == got.written[0][1] > 50


# --------------------------------------------------------------------------- the launcher

FAKE_TRAIN = textwrap.dedent("""
    import os, sys, time
    index = int(sys.argv[sys.argv.index("--worker-index") + 1])
    print("worker", index, "of", sys.argv[sys.argv.index("--workers") + 1], "args", sys.argv[1:3], flush=True)
    open(os.path.join(sys.argv[1], f"pid{index}"), "w").write(str(os.getpid()))
    if sys.argv[2] == "fail" and index == 1:
        time.sleep(0.5)
        print("cannot reach the chief", flush=True)
        sys.exit(3)
    time.sleep(float(sys.argv[3]))
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the launcher has waited for its workers: an ended one is gone, not a zombie
    except ProcessLookupError:
        return False
    return True


def test_the_launcher_gives_each_worker_the_cluster_and_its_own_index(tmp_path):
    run = _cli("server.tools.workers", "2", "--", sys.executable, "-c", FAKE_TRAIN, str(tmp_path), "ok", "0.2")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = sorted(line for line in run.stdout.splitlines() if " worker " in line)
    assert [line[:13] for line in lines] == ["[0] worker 0 ", "[1] worker 1 "]  # the prefix is the worker's index
    clusters = {line.split(" of ")[1].split()[0] for line in lines}
    assert len(clusters) == 1  # the same list for both
    ports = [int(w.split(":")[1]) for w in clusters.pop().split(",")]
    assert len(set(ports)) == 2 and all(w.endswith(f"args ['{tmp_path}', 'ok']") for w in lines)


def test_one_failing_worker_ends_the_others_and_the_launcher_says_so_and_fails(tmp_path):
    start = time.monotonic()
    run = _cli("server.tools.workers", "2", "--", sys.executable, "-c", FAKE_TRAIN, str(tmp_path), "fail", "120")
    assert run.returncode == 3, run.stdout + run.stderr
    assert time.monotonic() - start < 30  # not the 120 s the other worker would have slept
    assert "[1] cannot reach the chief" in run.stdout
    assert "workers: worker 1 exited with 3; ending the others" in run.stdout
    assert not _alive(int((tmp_path / "pid0").read_text()))


GRACEFUL_TRAIN = textwrap.dedent("""
    import signal, sys, time
    index = sys.argv[sys.argv.index("--worker-index") + 1]
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print("worker", index, "up", flush=True)
    while not stop:
        time.sleep(0.05)
    time.sleep(1.0)  # as train does: stop at the next sync, then the chief exports
    print("worker", index, "exported", flush=True)
""")


def test_ctrl_c_reaches_the_workers_and_the_launcher_waits_for_their_last_lines():
    launcher = subprocess.Popen([sys.executable, "-m", "server.tools.workers", "2", "--", sys.executable, "-c",
                                 GRACEFUL_TRAIN], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    up = [line for _, line in zip(range(3), launcher.stdout)]  # the ports line, then each worker's (no 4th read)
    assert sum(" up" in line for line in up) == 2, up
    os.killpg(launcher.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
    rest = launcher.communicate(timeout=30)[0]
    assert launcher.returncode == 0, rest
    assert "[0] worker 0 exported" in rest and "[1] worker 1 exported" in rest
    assert "waiting for the workers to stop" in rest


def test_the_launcher_wants_two_workers_and_a_command():
    for args in (["2"], ["1", "--", "true"], ["2", "--"]):
        run = _cli("server.tools.workers", *args)
        assert run.returncode == 2 and "usage:" in run.stderr
