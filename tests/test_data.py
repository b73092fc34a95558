"""Datasets, logs, synthetic gestures, splits and normalisation, through real files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from server.learn import data
from server.learn.synth import synthetic_dataset
from server.learn.data import DatasetError
from server.model.normalise import Normaliser

REPO = Path(__file__).resolve().parent.parent


def test_dataset_round_trip_and_format(tmp_path):
    ds = synthetic_dataset(4, seed=1, phrases=3)
    path = data.save_dataset(ds, tmp_path / "d.npz")
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["events", "starts"]
        assert z["events"].dtype == np.float32 and z["events"].shape[1] == 3
        assert z["starts"].dtype == np.int64
    again = data.load_dataset(path)
    np.testing.assert_array_equal(again.events, ds.events)
    np.testing.assert_array_equal(again.starts, ds.starts)
    assert again.sha256() == ds.sha256()


def test_pickled_dataset_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, events=np.array([object()], dtype=object), starts=np.array([0]))
    with pytest.raises(DatasetError, match="evil.npz"):
        data.load_dataset(path)


@pytest.mark.parametrize(
    "events, starts, message",
    [
        (np.zeros((4, 1), np.float32), np.array([0]), "shape"),  # dt and no value
        (np.zeros((4, 18), np.float32), np.array([0]), "shape"),  # 17 values: one more than a model takes
        (np.zeros(4, np.float32), np.array([0]), "shape"),
        (np.zeros((4, 3), np.float64), np.array([0]), "float32"),
        (np.array([[0, 0.5, np.nan]] * 3, np.float32), np.array([0]), "NaN"),
        (np.array([[0, 0.5, 1.5]] * 3, np.float32), np.array([0]), r"\[0, 1\]"),
        (np.zeros((4, 3), np.float32), np.array([0, 9]), "starts"),
    ],
)
def test_malformed_datasets_are_refused(tmp_path, events, starts, message):
    path = tmp_path / "bad.npz"
    np.savez(path, events=events, starts=np.asarray(starts, np.int64))
    with pytest.raises(DatasetError, match=message):
        data.load_dataset(path)


def write_log(path: Path, rows: list[str], truncated: str = "") -> Path:
    path.write_text("time,source,x,y\n" + "".join(r + "\n" for r in rows) + truncated)
    return path


def test_log_reader_streams_and_truncated_last_line(tmp_path):
    rows = [
        "1000.000000,performer,0.1,0.2",
        "1000.500000,model,0.5,0.5",
        "1000.250000,performer,0.3,0.4",
        "1001.250000,model,0.6,0.7",
        "1002.000000,performer,1.2,-0.1",
    ]
    path = write_log(tmp_path / "a.csv", rows, truncated="1003.1,perfor")
    performer, model = data.read_log(path)
    np.testing.assert_allclose(performer, [[0, 0.1, 0.2], [0.25, 0.3, 0.4], [1.75, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(model, [[0, 0.5, 0.5], [0.75, 0.6, 0.7]], atol=1e-6)


def test_dataset_from_log_folder(tmp_path):
    for i in range(3):
        write_log(tmp_path / f"2026010{i}-000000.csv", [f"{t},performer,0.5,0.5" for t in range(5)])
    ds = data.dataset_from_logs([tmp_path])
    assert len(ds.starts) == 3 and len(ds.events) == 15
    with pytest.raises(DatasetError):
        data.dataset_from_logs([tmp_path / "nothing-here"])


def test_log_with_wrong_header_is_refused(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="header"):
        data.read_log(path)


def test_synthetic_is_seeded_and_varied():
    a = synthetic_dataset(10, seed=3)
    b = synthetic_dataset(10, seed=3)
    assert a.sha256() == b.sha256()
    assert a.sha256() != synthetic_dataset(10, seed=4).sha256()
    dt = a.events[:, 0]
    assert (dt < 0.05).mean() > 0.5, "continuous gestures at controller rate"
    assert (dt > 0.3).sum() >= 10 * 5, "pauses between phrases"
    assert ((dt > 0.1) & (dt < 0.5)).sum() > 20, "taps"
    assert a.events[:, 1:].min() >= 0 and a.events[:, 1:].max() <= 1


def test_split_by_whole_performances():
    ds = synthetic_dataset(20, seed=2, phrases=2)
    train, val, held_out = data.split_performances(ds, 0.2, seed=0)
    assert len(train.starts) == 16 and len(val.starts) == 4
    train_rows = {p.tobytes() for p in train.performances}
    assert not any(p.tobytes() in train_rows for p in val.performances)


def test_normaliser_inverts_and_jacobian_is_exact():
    ds = synthetic_dataset(5, seed=9, phrases=4)
    norm = Normaliser.fit(ds.events, 5.0)
    z = norm.forward(ds.events)
    assert abs(z.mean(0)).max() < 1e-3 and np.allclose(z.std(0), 1, atol=1e-3)
    np.testing.assert_allclose(norm.inverse(z), ds.events, atol=1e-4)
    v = np.array([[0.3, 0.2, 0.7]])
    eps = 1e-6
    numeric = 0.0
    for i in range(3):
        dv = np.zeros(3)
        dv[i] = eps
        numeric += np.log((norm.forward(v + dv)[0, i].astype(np.float64) - norm.forward(v - dv)[0, i]) / (2 * eps))
    assert norm.log_jacobian(v)[0] == pytest.approx(numeric, abs=1e-2)
    assert Normaliser.from_json(norm.to_json()) == norm


def test_nothing_in_the_package_pickles():
    """Only IMPSY's reader touches pickle, and only through its own restricted unpickler (tests/test_impsy.py)."""
    restricted = REPO / "server" / "learn" / "impsy.py"
    for path in (REPO / "server").rglob("*.py"):
        text = path.read_text()
        assert "allow_pickle=True" not in text, path
        if path == restricted:
            assert not re.search(r"pickle\.(load|loads|Unpickler\()", text), "only the restricted unpickler"
            assert "def find_class" in text
            continue
        assert not re.search(r"^\s*(import|from)\s+pickle", text, re.M), path


def test_readme_generated_sections_are_current():
    from server.cli import COMMANDS
    from server.tools.docs import update

    commands = {name: help for name, (_, _, help) in COMMANDS.items()}
    assert update(REPO, True, commands) == [], "README.md or docs/ is stale: run .venv/bin/antiphon docs"
    text = (REPO / "README.md").read_text()
    assert text.startswith("# Antiphon\n") and "make run" in text and "make test" in text


def test_a_stray_quote_costs_only_its_own_line(tmp_path, caplog):
    rows = [f"{t}.0,performer,0.{t},0.5" for t in range(1, 6)]
    path = write_log(tmp_path / "q.csv", rows[:2] + ['3.0,"performer,0.3,0.5'] + rows[3:])
    with caplog.at_level("WARNING"):
        (performer,) = data.read_log(path)
    np.testing.assert_allclose(performer[:, 1], [0.1, 0.2, 0.4, 0.5], atol=1e-6)
    assert any("q.csv" in r.getMessage() and "line 4" in r.getMessage() for r in caplog.records)


def test_quoted_fields_bom_and_crlf_from_a_spreadsheet_are_read(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes('\ufeff"time","source","x","y"\r\n1.0,"performer",0.1,0.2\r\n2.0,performer,0.3,0.4\r\n'.encode())
    (performer,) = data.read_log(path)
    np.testing.assert_allclose(performer, [[0, 0.1, 0.2], [1.0, 0.3, 0.4]], atol=1e-6)


def test_a_line_too_long_to_be_a_row_is_an_error_naming_it(tmp_path):
    path = write_log(tmp_path / "long.csv", ["1.0,performer,0.5,0.5", "2.0,performer," + "1" * 200_000 + ",0.5"])
    with pytest.raises(DatasetError, match=r"long\.csv: line 3 is longer than"):
        data.read_log(path)


def test_zeros_a_power_cut_leaves_at_the_end_are_no_error(tmp_path):
    path = write_log(tmp_path / "cut.csv", ["1.0,performer,0.5,0.5", "2.0,performer,0.5,0.5"], truncated="\0" * 300_000)
    (performer,) = data.read_log(path)
    assert len(performer) == 2


def test_save_dataset_writes_whole_files_or_says_why(tmp_path):
    ds = synthetic_dataset(2, seed=1, phrases=2)
    path = data.save_dataset(ds, tmp_path / "d.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]  # no temporary left behind
    with pytest.raises(DatasetError, match="cannot write"):
        data.save_dataset(ds, tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetError, match="cannot write"):
        data.save_dataset(ds, tmp_path / "file" / "d.npz")
    assert data.load_dataset(path).sha256() == ds.sha256()
