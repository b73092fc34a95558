"""`make bench-corpus`: the larger corpus really is N copies, and the flatness figure is 10x's peak over 1x's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.learn.data import save_dataset
from server.learn.shards import open_dataset
from server.learn.synth import synthetic_dataset
from server.tools import bench_corpus


def test_the_larger_corpus_is_every_performance_that_many_times_over():
    ds = synthetic_dataset(3, seed=1)
    copies = list(bench_corpus.repeated(ds, 4))
    assert len(copies) == 12
    for i, performance in enumerate(copies):
        np.testing.assert_array_equal(performance, ds.performances[i % 3])


def test_the_table_gives_each_corpus_and_the_ratio_of_peaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Training is replaced by a fake that reads the shards it is given: peak 100 MB per 1,000 events."""
    data = save_dataset(synthetic_dataset(4, seed=2), tmp_path / "d.npz")
    events = sum(len(p) for p in synthetic_dataset(4, seed=2).performances)

    def fake_measure(folder: Path, work: Path, name: str, args) -> dict:
        count = open_dataset(folder).event_count
        return {"corpus": name, "peak_mb": 500.0 + count / 10, "wall_s": 1.0, "epochs": 1,
                "train_events": count, "events_per_s": count}

    monkeypatch.setattr(bench_corpus, "measure", fake_measure)
    out = tmp_path / "b.json"
    assert bench_corpus.main(["--data", str(data), "--times", "3", "--shard-events", "500", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["corpus"] for r in rows] == ["1x-shards", "3x-shards"]
    assert [r["events"] for r in rows] == [events, 3 * events]
    ratio = (500 + 3 * events / 10) / (500 + events / 10)
    assert f"peak memory, shards: 3x the corpus takes {ratio:.2f}x the 1x's (goal for shards: at most 1.5x)" \
        in capsys.readouterr().out
