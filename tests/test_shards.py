"""A corpus larger than memory: `dataset --shard-events` writes shards, `train` and `evaluate` stream them.

The promises: the shards hold the performances whole and in order, each within N events
(a longer one alone); a damaged, swapped or escaping shard is refused by name; a failed
write leaves nothing; the normaliser, the split and every training window are the same
as for the corpus in memory; `train` on a folder writes a model that plays, and
`evaluate` on the folder gives the figure it gives on the `.npz`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.learn.data import Dataset, DatasetError, load_dataset, save_dataset, split_performances
from server.learn.shards import INDEX, ShardWriter, open_dataset, open_shards, write_shards
from server.learn.streaming import StreamedWindows, split_sharded
from server.learn.synth import synthetic_dataset
from server.learn.train import TrainConfig, _windows
from server.model.normalise import Normaliser

REPO = Path(__file__).resolve().parent.parent


def corpus(seed: int = 3) -> Dataset:
    """Performances of many lengths: some shorter than a window, one longer than a shard."""
    ds = synthetic_dataset(30, seed=seed, phrases=3)
    rng = np.random.default_rng(seed)
    long = np.concatenate(ds.performances[:6])
    perfs = [p[: int(rng.integers(1, len(p)))].copy() for p in ds.performances[6:]] + [long]
    for p in perfs:
        p[:, 1] = np.round(p[:, 1] * 127) / 127  # x on a grid, as MIDI pitch, for the normaliser to find
    return Dataset.from_performances(perfs)


def test_shards_hold_the_performances_whole_in_order_each_within_n_events(tmp_path):
    ds = corpus()
    sharded = write_shards(ds.performances, tmp_path / "shards", 400)
    assert sharded.performance_count == len(ds.starts) and sharded.event_count == len(ds.events)
    got = list(sharded.performances())
    assert len(got) == len(ds.performances) and all(np.array_equal(a, b) for a, b in zip(got, ds.performances))
    sizes = [s.events for s in sharded.shards]
    longest = max(len(p) for p in ds.performances)
    assert longest > 400 and longest in sizes  # the long one alone, never cut
    assert all(n <= 400 for n in sizes if n != longest) and len(sizes) >= 4
    assert list(sharded.lengths()) == [len(p) for p in ds.performances]
    assert open_dataset(tmp_path / "shards").sha256() == sharded.sha256() != ds.sha256()


def test_a_damaged_swapped_or_escaping_shard_is_refused_by_name(tmp_path):
    ds = corpus()
    folder = tmp_path / "shards"
    sharded = write_shards(ds.performances, folder, 400)
    first, second = folder / sharded.shards[0].file, folder / sharded.shards[1].file
    kept = first.read_bytes()
    first.write_bytes(second.read_bytes())  # swapped: a valid dataset, not the one the index names
    with pytest.raises(DatasetError, match=f"{first.name}: differs from"):
        list(open_shards(folder).performances())
    first.write_bytes(kept)
    edited = load_dataset(second)
    edited.events[3, 1] = 0.5 if edited.events[3, 1] != 0.5 else 0.25  # one value changed: same counts
    save_dataset(edited, second)
    with pytest.raises(DatasetError, match=f"{second.name}: differs from"):
        list(open_shards(folder).performances())
    first.write_bytes(kept[:-10])  # torn
    with pytest.raises(DatasetError, match=first.name):
        list(open_shards(folder).performances())
    index = json.loads((folder / INDEX).read_text())
    index["shards"][0]["file"] = "../elsewhere.npz"
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="not a file name in the folder"):
        open_shards(folder)
    (folder / INDEX).write_text("{")
    with pytest.raises(DatasetError, match="not JSON"):
        open_shards(folder)


def test_a_failed_write_leaves_no_folder_and_an_old_one_intact(tmp_path):
    ds = corpus()
    folder = tmp_path / "shards"
    old = write_shards(ds.performances[:5], folder, 400)
    mixed = [*ds.performances, np.zeros((5, 4), np.float32)]  # a wider event at the end: refused when flushed
    with pytest.raises(DatasetError, match="one kind of event"):
        write_shards(mixed, folder, 400)
    assert open_shards(folder) == old and sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
    with pytest.raises(DatasetError, match="at least 100"):
        ShardWriter(tmp_path / "x", 99)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a shard folder"):
        ShardWriter(tmp_path / "plain", 400)


def test_sharded_and_in_memory_training_split_normalise_and_see_the_same_windows(tmp_path):
    ds = corpus()
    sharded = write_shards(ds.performances, tmp_path / "shards", 400)
    cfg = TrainConfig(sequence_length=20, stride=4)
    train_mem, val_mem, held_mem = split_performances(ds, cfg.val_fraction, cfg.seed)
    part, val, held = split_sharded(sharded, cfg.val_fraction, cfg.seed)
    assert held == held_mem and np.array_equal(val.events, val_mem.events)
    norm = Normaliser.fit_performances(lambda: train_mem.performances, 5.0)
    assert Normaliser.fit_performances(lambda: part.performances, 5.0) == norm  # to the bit
    assert norm.grid[1] == pytest.approx(1 / 127) and norm.grid[2] == 0
    memory, _ = _windows(train_mem, val_mem, norm, cfg)
    streamed, _ = _windows(part, val, norm, cfg)
    assert isinstance(streamed, StreamedWindows)
    assert (streamed.windows, streamed.performances, streamed.events) == (len(memory.data), memory.performances,
                                                                          memory.events)
    dims = memory.data.shape[-1] - 1
    streamed.write(tmp_path)
    seen = sorted(x.tobytes() + y.tobytes() for xs, ys in streamed.dataset(7, np.zeros(dims), seed=1, folder=tmp_path)
                  for x, y in zip(xs.numpy(), ys.numpy()))
    expected = sorted(w[:-1, :-1].tobytes() + w[1:, :].tobytes() for w in memory.data)
    assert seen == expected  # one epoch: each window once, the same windows


def test_each_worker_reads_its_own_shards_and_takes_the_same_steps(tmp_path):
    ds = corpus()
    sharded = write_shards(ds.performances, tmp_path / "shards", 400)
    part, val, _ = split_sharded(sharded, 0.15, 0)
    norm = Normaliser.fit_performances(lambda: part.performances, 5.0)
    streamed = StreamedWindows.of(part, norm, 20, 4)
    dims = len(norm.shift)
    seen = []
    for index in (0, 1):
        folder = tmp_path / f"windows{index}"
        folder.mkdir()
        streamed.write(folder, workers=2, index=index)
        assert all(int(f.stem.split("-")[1]) % 2 == index for f in folder.iterdir())  # only its own shards
        ds1 = streamed.dataset(8, np.zeros(dims), seed=0, workers=2, index=index, folder=folder)
        steps = streamed.steps_per_epoch(8, 2)
        got = [x.numpy() for x, _ in ds1.take(steps)]
        assert len(got) == steps  # endless: a worker whose shards are fewer windows still has a batch
        seen.append({w.tobytes() for b in got for w in b})
    assert not seen[0] & seen[1]  # no window read by both
    with pytest.raises(FileNotFoundError, match="write was not called"):
        streamed.dataset(8, np.zeros(dims), seed=0, workers=2, index=1, folder=tmp_path / "windows0")
    one = write_shards(ds.performances, tmp_path / "one", 10_000)
    part, _, _ = split_sharded(one, 0.15, 0)
    with pytest.raises(DatasetError, match="1 shard.s. for 2 workers leave worker 1 no training window"):
        StreamedWindows.of(part, norm, 20, 4).check_workers(2)
    StreamedWindows.of(part, norm, 20, 4).check_workers(1)


def _run(*args: str, cwd: Path, tmp: Path | None = None) -> str:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd), **({"TMPDIR": str(tmp)} if tmp else {})}
    res = subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_dataset_train_and_evaluate_on_a_shard_folder_through_the_cli(tmp_path):
    ds = synthetic_dataset(16, seed=2, phrases=3)
    save_dataset(ds, tmp_path / "d.npz")
    logs = tmp_path / "logs"
    logs.mkdir()
    for i, p in enumerate(ds.performances):  # logs, as a session leaves them
        t = np.cumsum(p[:, 0]) + 1_700_000_000.0
        rows = "".join(f"{a:.6f},performer,{x:.6f},{y:.6f}\n" for a, (x, y) in zip(t, p[:, 1:]))
        (logs / f"2026-01-{i + 1:02d}.csv").write_text("time,source,x,y\n" + rows)
    out = _run("dataset", str(logs), "--shard-events", "500", "--out", "shards", cwd=tmp_path)
    assert "16 performances" in out and "shard(s) of at most 500 events" in out
    assert len(open_shards(tmp_path / "shards").shards) >= 3
    (tmp_path / "tmp").mkdir()
    out = _run("train", "--data", "shards", "--size", "xs", "--name", "streamed", "--models-dir", "models",
               "--epochs", "2", "--minutes", "1", "--sequence-length", "20", "--no-report", cwd=tmp_path,
               tmp=tmp_path / "tmp")
    assert "wrote models/streamed" in out, out
    assert not list((tmp_path / "tmp").glob("antiphon-windows-*"))  # the windows cut for training are gone with it
    folder = tmp_path / "models" / "streamed"
    assert json.loads((folder / "model.json").read_text())["dataset_sha256"] == open_shards(tmp_path / "shards").sha256()
    on_folder = _run("evaluate", "--model", str(folder), "--data", "shards", cwd=tmp_path)
    save_dataset(Dataset.from_performances(open_shards(tmp_path / "shards").performances()), tmp_path / "same.npz")
    on_file = _run("evaluate", "--model", str(folder), "--data", "same.npz", cwd=tmp_path)
    assert on_folder.splitlines()[0] == on_file.splitlines()[0] and "nats per event over" in on_folder
