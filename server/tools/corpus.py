"""`python -m server.tools.corpus build OUT_DIR`: a MIDI corpus from the scores music21 ships, to train at scale.

Only collections whose terms allow a derivative such as MIDI are offered (`COLLECTIONS`;
`LEFT_OUT` says why the others are not; docs/distributed.md has the whole account). Each
score file is parsed in a worker process, since music21 takes seconds over a book of
fifty tunes; every piece in it (a chorale, a tune of an ABC book) becomes
`OUT_DIR/<collection>/<name>.mid`. Names follow the source file (and the tune's place in
its book), files are written beside their final name and renamed into place, and only
when their bytes changed, so a rerun writes the same folder. A piece that fails is
counted and named, never fatal. Nothing is downloaded, and music21's cache of parsed
scores is bypassed (`forceSource`), so nothing is written outside OUT_DIR.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

SHOWN_FAILED = 5  # failed pieces named in the summary; the rest are counted


@dataclass(frozen=True)
class Collection:
    """A folder of music21's corpus: which of its files to take, and the terms they come under."""

    name: str  # music21's folder name (corpus.getComposer)
    suffixes: tuple[str, ...]  # the score files to take; others (analyses, other encoders' files) are left
    terms: str
    skip: tuple[str, ...] = ()  # files whose every tune another file of the folder also holds


COLLECTIONS = (
    Collection("bach", (".mxl", ".xml"),
               "J. S. Bach's chorale harmonisations (public domain); MusicXML by Margaret Greentree "
               "(jsbchorales.net), distributed with music21 by permission, no restriction stated in the files"),
    Collection("ryansMammoth", (".abc",),
               "Ryan's Mammoth Collection (Boston, 1883; public domain); ABC by Ray Davies, Bob Puckette, "
               "John Walsh and others, no restriction stated"),
    Collection("oneills1850", (".abc",),
               "O'Neill's Music of Ireland (Chicago, 1903; public domain); ABC by volunteers (Henrik Norbeck, "
               "Bob Safranek, John Chambers and others), no restriction stated",
               skip=("0626-0635.abc", "0732-0758_mh.abc", "1116-1135_ml.abc", "1556-1576.abc", "1577-1624.abc",
                     "1710-1750.abc")),
    Collection("airdsAirs", (".abc",),
               "Aird's Selection of Scotch, English, Irish and Foreign Airs (Glasgow, 1778-1803; public domain); "
               "ABC by Jack Campin, no restriction stated"),
    Collection("miscFolk", (".abc",),
               "American fife tunes and the Northumbrian Minstrelsy (19th century; public domain); ABC by "
               "Jack Campin, no restriction stated"),
    Collection("nottingham-dataset", (".abc",),
               "two reels of the Nottingham Music Database (traditional), no restriction stated"),
)
LEFT_OUT = {
    "palestrina": "each file: 'Copyright 2000, John Miller. Rights to all derivative electronic formats reserved'",
    "essenFolksong": "its license.txt: permission for non-commercial distribution and use in music21 only",
}


@dataclass(frozen=True)
class Converted:
    """What one score file gave: the MIDI files written (relative to OUT_DIR) with their notes, and what failed."""

    collection: str
    source: str
    written: list[tuple[str, int]] = field(default_factory=list)
    changed: int = 0  # of `written`, files that were new or different
    failed: list[tuple[str, str]] = field(default_factory=list)  # (piece, why)
    cpu: float = 0.0  # seconds of the worker's CPU: the build's cost apart from what else the machine runs


def collection(name: str) -> Collection:
    """The collection called `name`, or a ValueError saying why not (left out for its terms, or unknown)."""
    for c in COLLECTIONS:
        if c.name == name:
            return c
    if name in LEFT_OUT:
        raise ValueError(f"{name} is left out: {LEFT_OUT[name]}")
    raise ValueError(f"no collection {name!r}; known: {', '.join(c.name for c in COLLECTIONS)}")


def sources(collections: Iterable[Collection], limit: int | None = None) -> list[tuple[str, Path]]:
    """(collection, score file) for each file music21 ships in `collections`, sorted; the first `limit` of each."""
    from music21 import corpus

    out: list[tuple[str, Path]] = []
    for c in collections:
        files = sorted(Path(p) for p in corpus.getComposer(c.name) if Path(p).suffix in c.suffixes
                       and Path(p).name not in c.skip)
        out += [(c.name, p) for p in files[:limit]]
    return out


def convert_file(name: str, path: Path, out: Path) -> Converted:
    """Every piece of one score file as OUT/<name>/<stem>[-<place in its book>].mid; runs in a worker process."""
    from music21 import converter, stream

    source, start = f"{name}/{path.name}", time.process_time()
    try:
        parsed = converter.parse(path, forceSource=True)
    except Exception as e:  # music21 raises many kinds on a bad file; the build goes on
        return Converted(name, source, failed=[(source, _why(e))], cpu=time.process_time() - start)
    scores = list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]
    written, changed, failed = [], 0, []
    for place, score in enumerate(scores, 1):
        target = Path(name) / (f"{path.stem}-{place:03d}.mid" if len(scores) > 1 else f"{path.stem}.mid")
        try:
            data, notes = _midi(score)
        except Exception as e:
            failed.append((target.as_posix(), _why(e)))
            continue
        if notes == 0:
            failed.append((target.as_posix(), "no notes"))
            continue
        changed += _write(out / target, data)
        written.append((target.as_posix(), notes))
    return Converted(name, source, written, changed, failed, time.process_time() - start)


def _midi(score) -> tuple[bytes, int]:
    """The score as Standard MIDI File bytes, and its notes as mido counts them (what `dataset --midi` will read)."""
    import mido
    from music21 import midi

    _unshare(score)
    data = midi.translate.streamToMidiFile(score).writestr()
    notes = sum(1 for track in mido.MidiFile(file=io.BytesIO(data)).tracks for m in track
                if m.type == "note_on" and m.velocity > 0)
    return data, notes


def _unshare(score) -> None:
    """Give each site its own copy of an object music21's ABC reader put in two measures (a repeated
    time signature), which its MIDI writer would otherwise refuse as 'already found in this Stream'."""
    import copy

    seen: set[int] = set()
    for site in score.recurse(streamsOnly=True, includeSelf=True):
        for el in list(site.getElementsNotOfClass("Stream")):
            if id(el) in seen:
                site.replace(el, copy.deepcopy(el))
            seen.add(id(el))


def _write(target: Path, data: bytes) -> bool:
    """Write `data` to `target` through a temporary file renamed into place, unless it holds them already."""
    if target.is_file() and target.read_bytes() == data:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return True


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def build(todo: Sequence[tuple[str, Path]], out: Path, jobs: int,
          echo: Callable[[str], None] = print) -> list[Converted]:
    """Convert `todo` with `jobs` processes, a progress line per tenth; the results in `todo`'s order.

    The largest files start first: a book of two hundred tunes is one task, and the longest."""
    import multiprocessing

    if not todo:
        return []
    start, results, pieces, failed = time.monotonic(), {}, 0, 0
    order = sorted(range(len(todo)), key=lambda i: -todo[i][1].stat().st_size)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method)) as pool:
        futures = {pool.submit(convert_file, *todo[i], out): i for i in order}
        for done, future in enumerate(as_completed(futures), 1):
            got = results[futures[future]] = future.result()
            pieces, failed = pieces + len(got.written), failed + len(got.failed)
            if 10 * done // len(todo) != 10 * (done - 1) // len(todo):
                echo(f"converting: {done}/{len(todo)} score files, {pieces} pieces written, {failed} failed, "
                     f"{time.monotonic() - start:.0f} s")
    return [results[i] for i in range(len(todo))]


def prune(out: Path, results: Iterable[Converted]) -> int:
    """Remove the .mid files of the built collections' folders that this build did not write; how many."""
    results = list(results)
    kept = {out / name for r in results for name, _ in r.written}
    stale = [f for c in {r.collection for r in results} for f in (out / c).glob("*.mid") if f not in kept]
    for f in stale:
        f.unlink()
    return len(stale)


def summary(results: Sequence[Converted]) -> list[str]:
    """Lines for the end of a build: files and notes per collection, totals, and the first failures by name."""
    lines, failed = [], [f for r in results for f in r.failed]
    for name in dict.fromkeys(r.collection for r in results):
        mine = [r for r in results if r.collection == name]
        lines.append(f"{name}: {sum(len(r.written) for r in mine)} MIDI files from {len(mine)} score files, "
                     f"{sum(n for r in mine for _, n in r.written):,} notes"
                     + (f", {sum(len(r.failed) for r in mine)} failed" if any(r.failed for r in mine) else ""))
    written = [w for r in results for w in r.written]
    lines.append(f"total: {len(written)} MIDI files ({sum(r.changed for r in results)} new or changed), "
                 f"{sum(n for _, n in written):,} notes; {len(failed)} pieces failed; "
                 f"{sum(r.cpu for r in results):.0f} s of CPU in the workers")
    lines += [f"  failed: {piece}: {why}" for piece, why in failed[:SHOWN_FAILED]]
    if len(failed) > SHOWN_FAILED:
        lines.append(f"  ... and {len(failed) - SHOWN_FAILED} more")
    return lines


def _terms_file(out: Path) -> None:
    """OUT/SOURCES.txt: where the files of each collection in OUT came from and their terms, so the folder
    carries its provenance (whichever builds filled it)."""
    import music21

    collections = [c for c in COLLECTIONS if (out / c.name).is_dir()]
    text = (f"MIDI written by `python -m server.tools.corpus build` from the corpus of music21 {music21.__version__}\n"
            "music21's corpus/license.txt: each piece is out of copyright in the US or licensed for use, any\n"
            "restriction being stated in the files or folders; those taken here state none.\n\n"
            + "".join(f"{c.name}: {c.terms}\n" for c in collections))
    _write(out / "SOURCES.txt", text.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.tools.corpus", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="write the chosen collections as MIDI files under OUT_DIR")
    p.add_argument("out", type=Path, metavar="OUT_DIR")
    p.add_argument("--collections", default=",".join(c.name for c in COLLECTIONS),
                   help="comma-separated (default: all of " + ", ".join(c.name for c in COLLECTIONS) + ")")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N score files of each collection (its folder then holds only their pieces)")
    args = parser.parse_args(argv)
    try:
        chosen = [collection(n.strip()) for n in args.collections.split(",") if n.strip()]
    except ValueError as e:
        parser.error(str(e))
    if args.jobs < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--jobs and --limit are 1 or more")
    start = time.monotonic()
    todo = sources(chosen, args.limit)
    print(f"{len(todo)} score files in {', '.join(c.name for c in chosen)}; {args.jobs} processes", flush=True)
    results = build(todo, args.out, args.jobs, lambda line: print(line, flush=True))
    stale = prune(args.out, results)
    _terms_file(args.out)
    print("\n".join(summary(results)) + (f"\nremoved {stale} stale file(s)" if stale else ""))
    print(f"wrote {args.out} in {time.monotonic() - start:.0f} s")
    return 0 if any(r.written for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
