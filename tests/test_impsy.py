"""IMPSY's formats come in through `dataset --impsy` and `dataset --impsy-logs`, on small files made in its layout.

IMPSY's dataset is a pickled object array; what it may contain is numbers, and a pickle
asking for anything else is refused before it runs (the malicious file here is live:
numpy's own loader, allowed to unpickle, runs it).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from server.cli import main
from server.learn.data import load_dataset


def impsy_npz(path: Path, perfs: list[np.ndarray]) -> Path:
    """A dataset as IMPSY's `dataset` command writes it: `perfs`, an object array of float32 [n, 1 + N]."""
    arr = np.empty(len(perfs), dtype=object)
    for i, p in enumerate(perfs):
        arr[i] = np.asarray(p, np.float32)
    np.savez_compressed(path, perfs=arr)
    return path


def performance(rng: np.random.Generator, n: int, values: int, grid: int = 128) -> np.ndarray:
    dt = rng.lognormal(np.log(0.05), 1.0, n)
    dt[::25] = 40.0  # IMPSY keeps long pauses unclipped
    return np.column_stack([dt, rng.integers(0, grid, (n, values)) / grid])


def dataset(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["dataset", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_impsy_dataset_comes_in_whole_with_dt_clipped_and_empty_performances_left_out(tmp_path, capsys):
    rng = np.random.default_rng(0)
    perfs = [performance(rng, 120, 3), np.zeros((0, 4)), performance(rng, 60, 3), np.zeros((0, 4))]
    src = impsy_npz(tmp_path / "training-dataset-4d.npz", perfs)
    code, out, err = dataset(["--impsy", str(src), "--out", str(tmp_path / "ds.npz")], capsys)
    assert code == 0, err
    assert "2 performances of dt and 3 value(s)" in out and "2 empty left out" in out
    assert "dt clipped to 5 s in 8 events" in out  # 5 + 3 pauses of 40 s
    ds = load_dataset(tmp_path / "ds.npz")
    assert ds.values == 3 and list(ds.starts) == [0, 120]
    expected = np.concatenate([perfs[0], perfs[2]]).astype(np.float32)
    np.testing.assert_array_equal(ds.events[:, 1:], expected[:, 1:])
    np.testing.assert_array_equal(ds.events[:, 0], np.minimum(expected[:, 0], 5.0))


def test_equal_length_performances_in_impsy_layout_come_in_too(tmp_path, capsys):
    """numpy makes a list of equal-length arrays with dtype=object a 3-D object array of floats."""
    rng = np.random.default_rng(1)
    perfs = np.array([performance(rng, 30, 8, grid=127) for _ in range(3)], dtype=object)
    assert perfs.ndim == 3
    np.savez_compressed(tmp_path / "d.npz", perfs=perfs)
    code, out, err = dataset(["--impsy", str(tmp_path / "d.npz"), "--dt-max", "60", "--out", str(tmp_path / "o.npz")],
                             capsys)
    assert code == 0, err
    ds = load_dataset(tmp_path / "o.npz")
    assert ds.values == 8 and len(ds.starts) == 3
    np.testing.assert_allclose(ds.events, perfs.reshape(-1, 9).astype(np.float32))


def _npy_with_pickle(payload: bytes) -> bytes:
    """An .npy of one object: its header, then the pickle (how numpy stores object arrays)."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return f.getvalue() + payload


def _npz(path: Path, member: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("perfs.npy", member)
    return path


class _MakeDir:
    """A pickle that creates a folder when loaded: harmless, and visible."""

    def __init__(self, where: Path) -> None:
        self.where = str(where)

    def __reduce__(self):
        return (os.mkdir, (self.where,))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "it-ran"
    evil = _npz(tmp_path / "evil.npz", _npy_with_pickle(pickle.dumps(np.array([_MakeDir(marker)], dtype=object))))
    with np.load(evil, allow_pickle=True) as z:  # the payload is live: numpy's own loader runs it
        z["perfs"]
    assert marker.is_dir()
    marker.rmdir()
    code, _, err = dataset(["--impsy", str(evil), "--out", str(tmp_path / "o.npz")], capsys)
    assert code == 1
    assert "evil.npz" in err and "posix.mkdir" in err and "refused" in err
    assert not marker.exists() and not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("payload, says", [
    # numpy's own names, asked for something they must not build
    (b"\x80\x03cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00K\x00\x86X\x01\x00\x00\x00b\x87R.",
     "rebuild something other than a plain array"),  # shape (0, 0)
    (b"\x80\x03cnumpy\ndtype\nX\x02\x00\x00\x00V8\x89\x88\x87R.", "not numbers"),  # raw bytes, not numbers
    (b"\x80\x03cnumpy\nndarray\nK\x05\x85R.", "not callable"),  # ndarray itself is never called
    (b"\x80\x03cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "builtins.eval"),
], ids=["an-array-of-another-shape", "a-dtype-not-numbers", "ndarray-called", "eval"])
def test_a_pickle_asking_numpy_for_anything_but_arrays_of_numbers_is_refused(tmp_path, capsys, payload, says):
    bad = _npz(tmp_path / "bad.npz", _npy_with_pickle(payload))
    code, _, err = dataset(["--impsy", str(bad), "--out", str(tmp_path / "o.npz")], capsys)
    assert code == 1 and "bad.npz" in err and says in err, err


def test_a_file_that_is_not_an_impsy_dataset_is_named(tmp_path, capsys):
    np.savez(tmp_path / "ours.npz", events=np.zeros((3, 3), np.float32), starts=np.zeros(1, np.int64))
    code, _, err = dataset(["--impsy", str(tmp_path / "ours.npz")], capsys)
    assert code == 1 and "ours.npz" in err and "no array 'perfs'" in err


# --------------------------------------------------------------------------- logs


def impsy_log(folder: Path, start: str, dimension: int, rows: list[tuple[float, str, list[float]]]) -> Path:
    """A log as IMPSY writes it: `<ISO time>,<source>,v1,...` and no header, named by its dimension."""
    from datetime import datetime, timedelta

    t0 = datetime.fromisoformat(start)
    lines = [f"{(t0 + timedelta(seconds=t)).isoformat()},{source},{','.join(map(str, vs))}" for t, source, vs in rows]
    path = folder / f"{start.replace(':', '-')}-{dimension}d-mdrnn.log"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_impsy_logs_come_in_one_performance_per_log_the_performer_only_unless_asked(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    impsy_log(logs, "2024-05-01T20:00:00", 4, [
        (0.0, "interface", [0.1, 0.2, 0.3]), (0.25, "rnn", [0.5, 0.5, 0.5]), (0.5, "interface", [0.4, 0.5, 0.6]),
        (0.75, "rnn", [0.6, 0.6, 0.6]), (9.5, "interface", [1.0, 0.0, 1.2])])
    impsy_log(logs, "2024-05-02T20:00:00", 4, [(0.0, "interface", [0.0, 0.0, 0.0]), (0.1, "interface", [1, 1, 1])])
    with (logs / "2024-05-02T20-00-00-4d-mdrnn.log").open("a") as f:
        f.write("not,a,row\n")
    (logs / "notes.txt").write_text("not a log")
    code, out, err = dataset(["--impsy-logs", str(logs), "--out", str(tmp_path / "o.npz")], capsys)
    assert code == 0, err
    assert "IMPSY logs: 2 performances of dt and 3 value(s), 5 events" in out
    assert "dt clipped to 5 s in 1 events" in out and "1 values clipped to [0, 1]" in out
    ds = load_dataset(tmp_path / "o.npz")
    np.testing.assert_allclose(ds.performances[0], [[0, .1, .2, .3], [.5, .4, .5, .6], [5, 1, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(ds.performances[1], [[0, 0, 0, 0], [.1, 1, 1, 1]], atol=1e-6)
    code, out, err = dataset(["--impsy-logs", str(logs), "--include-model", "--out", str(tmp_path / "m.npz")], capsys)
    assert code == 0, err
    model_stream = load_dataset(tmp_path / "m.npz").performances[1]
    np.testing.assert_allclose(model_stream, [[0, .5, .5, .5], [.5, .6, .6, .6]], atol=1e-6)


def test_impsy_logs_of_different_dimensions_are_not_mixed(tmp_path, capsys):
    impsy_log(tmp_path, "2024-05-01T20:00:00", 4, [(0.0, "interface", [0.1, 0.2, 0.3]), (1, "interface", [0, 0, 0])])
    impsy_log(tmp_path, "2024-05-02T20:00:00", 9, [(0.0, "interface", [0.5] * 8), (1, "interface", [0.1] * 8)])
    code, _, err = dataset(["--impsy-logs", str(tmp_path), "--out", str(tmp_path / "o.npz")], capsys)
    assert code == 1 and "4d: 1 log(s)" in err and "9d: 1 log(s)" in err
    code, out, err = dataset(["--impsy-logs", str(tmp_path / "2024-05-02T20-00-00-9d-mdrnn.log"),
                              "--out", str(tmp_path / "o.npz")], capsys)
    assert code == 0 and load_dataset(tmp_path / "o.npz").values == 8, err


def test_impsy_data_and_ours_of_another_width_are_not_mixed(tmp_path, capsys):
    src = impsy_npz(tmp_path / "d.npz", [performance(np.random.default_rng(2), 10, 3)])
    log = tmp_path / "ours.csv"
    log.write_text("time,source,x,y\n1.0,performer,0.1,0.2\n1.5,performer,0.3,0.4\n")
    code, _, err = dataset([str(log), "--impsy", str(src), "--out", str(tmp_path / "o.npz")], capsys)
    assert code == 1 and "differ in their values per event (dt + 2, dt + 3)" in err
