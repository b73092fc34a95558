"""`dataset --midi --jobs N`: parallel import gives the same bytes, names what it skipped, shows progress."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import mido

from server.cli import main
from server.learn.data import load_dataset
from server.learn.importer import ImportProgress, import_midi
from tests.test_midi import song_tracks, write_song

REPO = Path(__file__).resolve().parent.parent
M = mido.Message


def corpus(root: Path, songs: int = 12) -> Path:
    """``songs`` readable files (varied, in nested folders) plus one unreadable, one empty, one too short."""
    for i in range(songs):
        notes = [M("note_on", note=40 + (i * 7 + k * 5) % 40, velocity=30 + k, time=0 if k == 0 else 120 + 10 * i)
                 for k in range(5 + i % 4)]
        write_song(root / f"set{i % 3}" / f"song{i:02d}.mid", [song_tracks()[0], notes])
    (root / "broken.mid").write_bytes(b"MThd not really")
    write_song(root / "empty.mid", [[mido.MetaMessage("set_tempo", tempo=400_000, time=0)]])
    write_song(root / "short.mid", [[M("note_on", note=60, velocity=64, time=0)]])
    return root


def test_jobs_2_writes_the_same_bytes_as_jobs_1_and_names_the_skipped_files(tmp_path, caplog):
    songs = corpus(tmp_path / "songs")
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    assert main(["dataset", "--midi", str(songs), "--jobs", "1", "--out", str(one)]) == 0
    assert main(["dataset", "--midi", str(songs), "--jobs", "2", "--out", str(two)]) == 0
    assert one.read_bytes() == two.read_bytes()
    assert len(load_dataset(two).starts) == 12
    for name, reason in (("broken.mid", "unreadable"), ("empty.mid", "empty"), ("short.mid", "too short")):
        assert any(name in r.getMessage() and reason in r.getMessage() for r in caplog.records), name


def test_the_summary_counts_each_reason_and_progress_reaches_the_end(tmp_path):
    lines: list[str] = []
    got = import_midi([corpus(tmp_path / "songs", songs=3)], jobs=2, progress=ImportProgress(io.StringIO(), lines.append))
    assert got.files == 6 and len(got.performances) == 3
    assert got.summary().endswith("skipped 3 file(s): 1 unreadable, 1 empty, 1 too short")
    assert lines[-1].startswith("parsing MIDI: 6/6 files, 3 skipped")

    live = io.StringIO()
    live.isatty = lambda: True  # type: ignore[method-assign]
    import_midi([tmp_path / "songs"], progress=ImportProgress(live))
    assert live.getvalue().count("\r") == 6 and "[########################] 6/6 files" in live.getvalue()


def test_the_cli_in_its_own_process_imports_in_parallel_without_tensorflow(tmp_path):
    songs = corpus(tmp_path / "songs", songs=4)
    out = tmp_path / "d.npz"
    probe = ("import sys, runpy; sys.argv = ['antiphon', 'dataset', '--midi', %r, '--jobs', '2', '--out', %r]; "
             "import server.cli as c; code = c.main(); "
             "assert 'tensorflow' not in sys.modules, 'the import loaded TensorFlow'; raise SystemExit(code)")
    res = subprocess.run([sys.executable, "-c", probe % (str(songs), str(out))], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "MIDI: 7 MIDI file(s), 4 performance(s)" in res.stdout and "skipped 3 file(s)" in res.stdout
    assert "parsing MIDI: 7/7 files, 3 skipped" in res.stdout
    assert len(load_dataset(out).starts) == 4
