"""`python -m server.tools.bench_corpus --data CORPUS`: does training memory stay flat as the corpus grows?

Writes the corpus as shards once as it is (1x) and once with every performance repeated
`--times` times (written as it streams, never in memory), then trains a model on each in a
fresh process for `--epochs` epochs and reports each process's peak memory (its maximum
resident set, from the kernel) and events trained per second. With `--npz` the same two
corpora are also trained from a single `.npz` in memory, for contrast. Prints a table and
writes it as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from server.learn.data import Dataset, save_dataset
from server.learn.shards import ShardedDataset, open_dataset, write_shards

# run as a child: the train command in a grandchild, then the grandchild's peak RSS (ru_maxrss, KiB on Linux)
MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
FLAT_GOAL = 1.5  # peak memory on 10x the corpus, as a multiple of 1x's, that still counts as flat
EPOCH = re.compile(r"^epoch\s+(\d+)\s+(\d+):(\d\d) elapsed")


def performances(ds: Dataset | ShardedDataset) -> Iterator[np.ndarray]:
    return iter(ds.performances) if isinstance(ds, Dataset) else ds.performances()


def repeated(ds: Dataset | ShardedDataset, times: int) -> Iterator[np.ndarray]:
    """Every performance `times` times over (the whole corpus, then again): a larger corpus of the same music."""
    for _ in range(times):
        yield from performances(ds)


def measure(data: Path, work: Path, name: str, args: argparse.Namespace) -> dict:
    """Train on `data` in a fresh process: its peak memory, wall time and events trained per second."""
    cmd = [sys.executable, "-m", "server", "train", "--data", str(data), "--name", name, "--models-dir",
           str(work / "models"), "--size", args.size, "--epochs", str(args.epochs), "--minutes", str(args.minutes),
           "--no-report", "--patience", str(args.epochs + 1)]
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    wall = time.monotonic() - started
    if out.returncode != 0:
        raise SystemExit(f"{name}: train failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    peak = int(re.search(r"PEAK_KIB (\d+)", out.stdout).group(1))
    epochs = [EPOCH.match(line) for line in out.stdout.splitlines()]
    last = [m for m in epochs if m][-1]
    fit_s = int(last.group(2)) * 60 + int(last.group(3))
    trained = int(re.search(r"\((\d+) events\) to train", out.stdout).group(1))
    return {"corpus": name, "peak_mb": round(peak / 1024, 1), "wall_s": round(wall, 1), "epochs": int(last.group(1)),
            "train_events": trained, "events_per_s": round(trained * int(last.group(1)) / max(fit_s, 1))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a dataset .npz or shard folder (the 1x corpus)")
    p.add_argument("--times", type=int, default=10, help="the larger corpus is this many copies (default 10)")
    p.add_argument("--shard-events", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--size", default="xs")
    p.add_argument("--npz", action="store_true", help="also train from one .npz in memory, for contrast")
    p.add_argument("--out", type=Path, default=Path("bench-corpus.json"))
    args = p.parse_args(argv)
    ds = open_dataset(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for times in (1, args.times):
            shards = write_shards(repeated(ds, times), work / f"shards{times}x", args.shard_events)
            rows.append({**measure(shards.folder, work, f"{times}x-shards", args), "events": shards.event_count})
            if args.npz:
                npz = save_dataset(Dataset.from_performances(repeated(ds, times)), work / f"{times}x.npz")
                rows.append({**measure(npz, work, f"{times}x-npz", args), "events": shards.event_count})
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'corpus':>12} {'events':>10} {'peak MB':>8} {'events/s':>9} {'wall s':>7}")
    for r in rows:
        print(f"{r['corpus']:>12} {r['events']:>10} {r['peak_mb']:>8} {r['events_per_s']:>9} {r['wall_s']:>7}")
    for kind in ("shards", "npz"):
        small, large = (next((r for r in rows if r["corpus"] == f"{t}x-{kind}"), None) for t in (1, args.times))
        if small and large:
            print(f"peak memory, {kind}: {args.times}x the corpus takes {large['peak_mb'] / small['peak_mb']:.2f}x "
                  f"the 1x's (goal for shards: at most {FLAT_GOAL:g}x)")
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
