"""`make mutants`: mutation testing of the live path, and its figure.

mutmut (configured in pyproject.toml's `[tool.mutmut]`) changes one thing at a time in
server/live, server/osc, server/model, server/learn/finetune.py and server/monitor, and runs
the fast tests (tests/fast.py) that reach the changed function. A mutant is *killed* when a
test fails (or the tests time out); every other outcome, including a function no fast test
reaches, is a *survivor*. A survivor is either killed by a new test or listed in
tests/mutants-equivalent.txt with the reason it cannot change behaviour:

    server.osc.wire.x_pad__mutmut_3  # `n + 3 & ~3` and `n + 4 & ~3` agree for every n the wire sends

Usage (from the repository root):

    python -m server.tools.mutants                 # the figure, from the last run in mutants/
    python -m server.tools.mutants run             # a fresh run (deletes mutants/), then the figure
    python -m server.tools.mutants run --again     # keep mutants/, re-test the unexplained survivors (tests copied afresh)
    python -m server.tools.mutants run --resume    # keep mutants/, test only what an interrupted run left
    python -m server.tools.mutants run --sample 400 --seed 1   # a uniform random sample: an estimate in an hour
    mutmut show NAME                               # what a mutant changed

A survivor whose only change is inside the arguments of a logging call (`log.warning(...)`,
`logger.exception(...)`, `logger.log(level, ...)`) counts as equivalent by rule, shown apart in the figure: what a log
line says is for a person reading it, not behaviour a test should pin (PIT, the Java
mutation tool, leaves logging calls out by default for the same reason).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

EQUIVALENT = Path("tests/mutants-equivalent.txt")
MUTANTS = Path("mutants")
SAMPLE = "sample.txt"  # under MUTANTS: the names a sampled run tests, one a line, after a `# seed S of T` header
NO_MUTANT = "antiphon-generate-only"  # a filter no mutant matches: mutmut generates them all, then stops
GOAL_PERCENT = 5.0

# mutmut 3's exit codes (mutmut.stats.status_by_exit_code); anything else is "suspicious"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 2: "interrupted",
          None: "not checked", 34: "skipped", 35: "suspicious", 36: "timeout", 37: "type check",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault"}
KILLED = {"killed", "timeout"}  # a test failed, or the mutant made the tests hang past their limit


def statuses(root: Path = MUTANTS) -> dict[str, str]:
    """Every mutant's name and status, from mutmut's `*.py.meta` files under ``root``."""
    out: dict[str, str] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        try:
            codes = json.loads(meta.read_text())["exit_code_by_key"]
        except (OSError, ValueError, KeyError):  # being written by a run still going: read it next time
            print(f"warning: {meta} unreadable (a run still writing it?): its mutants are left out", file=sys.stderr)
            continue
        for name, code in codes.items():
            out[name] = STATUS.get(code, "suspicious")
    return out


def read_equivalents(path: Path = EQUIVALENT) -> tuple[dict[str, str], list[str]]:
    """``{mutant name: reason}`` from the list, and a problem line for each entry without a reason."""
    listed: dict[str, str] = {}
    problems: list[str] = []
    if not path.exists():
        return listed, problems
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, _, reason = text.partition("#")
        name, reason = name.strip(), reason.strip()
        if not reason:
            problems.append(f"{path}:{number}: {name} has no reason: it does not count as equivalent")
            continue
        listed[name] = reason
    return listed, problems


def module_of(name: str) -> str:
    """`server.live.engine` for `server.live.engine.xǁEngineǁstep__mutmut_3`."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith(("x_", "xǁ")):
            return ".".join(parts[:i])
    return name.rsplit(".", 1)[0]


LOGGERS = {"log", "logger"}  # the names server/ gives `logging.getLogger(__name__)`
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}  # `log`: at a level chosen at run time


def _is_log_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_METHODS
            and isinstance(node.func.value, ast.Name) and node.func.value.id in LOGGERS)


class _BlankLogArguments(ast.NodeTransformer):
    """Every logging call with its arguments removed: what is left is the function's behaviour."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if _is_log_call(node):
            return ast.Call(func=node.func, args=[], keywords=[])
        return self.generic_visit(node)


def _behaviour(function: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    body = _BlankLogArguments().visit(ast.Module(body=copy.deepcopy(function.body), type_ignores=[]))
    return ast.dump(function.args) + ast.dump(body)


def log_only(names: list[str], root: Path = MUTANTS) -> set[str]:
    """The mutants among ``names`` that differ from their function only inside logging calls' arguments.

    mutmut keeps each function's original (`<name>__mutmut_orig`) beside its mutants in the
    mutated copy of the module under ``root``, so both can be compared as syntax trees.
    """
    found: set[str] = set()
    functions: dict[Path, dict[str, ast.FunctionDef | ast.AsyncFunctionDef]] = {}
    for name in names:
        module = module_of(name)
        path = root / (module.replace(".", "/") + ".py")
        if path not in functions:
            try:
                tree = ast.parse(path.read_text())
            except (OSError, SyntaxError):
                tree = ast.Module(body=[], type_ignores=[])
            functions[path] = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        defs = functions[path]
        mangled = name[len(module) + 1:]
        original, mutant = defs.get(mangled.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"), defs.get(mangled)
        if original is not None and mutant is not None and _behaviour(original) == _behaviour(mutant):
            found.add(name)
    return found


def _natural(name: str) -> tuple[str, int]:
    """`..._mutmut_9` before `..._mutmut_10`."""
    stem, _, number = name.rpartition("__mutmut_")
    return (stem, int(number)) if number.isdigit() else (name, 0)


def sample_names(names: list[str], size: int, seed: int) -> list[str]:
    """A uniform random sample of ``size`` mutants (all when fewer), the same for the same names and seed.

    The whole live path is ~8,000 mutants, 7-14 hours on two cores; a uniform sample of a few
    hundred gives the survival rate to within a few per cent in under an hour.
    """
    chosen = random.Random(seed).sample(sorted(names), min(size, len(names)))
    return sorted(chosen, key=_natural)


def read_sample(root: Path = MUTANTS) -> tuple[list[str], str] | None:
    """The names of a sampled run in ``root``, and its header; None when the last run was not sampled."""
    path = root / SAMPLE
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    header = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")], header


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson interval of a proportion, in per cent: honest at 0 hits, unlike p +- 2 sd."""
    if n == 0:
        return 0.0, 100.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def report(all_status: dict[str, str], listed: dict[str, str], problems: list[str], names: bool = True,
           logging_only: set[str] | None = None, sampled: str = "") -> dict:
    """Print the figure (one line), then what to look at; return the numbers.

    ``logging_only``: survivors that change only a logging call's arguments (equivalent by rule).
    ``sampled``: the sample's description when ``all_status`` is a random sample of the mutants;
    the figure then also gives the 95 % interval of the whole path's unexplained share.
    """
    logging_only = logging_only or set()
    total = len(all_status)
    counts = Counter(all_status.values())
    killed = sum(counts[s] for s in KILLED)
    unchecked = counts["not checked"]
    survivors = sorted((n for n, s in all_status.items() if s not in KILLED | {"not checked"}), key=_natural)
    equivalent = [n for n in survivors if n in listed or n in logging_only]
    by_rule = [n for n in survivors if n in logging_only and n not in listed]
    unexplained = [n for n in survivors if n not in listed and n not in logging_only]
    percent = 100.0 * len(unexplained) / total if total else 0.0
    interval = wilson(len(unexplained), total - unchecked) if sampled else None
    print((f"mutants (a random sample: {sampled}): " if sampled else "mutants: ")
          + f"{killed} killed / {total} total, {len(survivors)} survived "
          f"({len(equivalent)} equivalent: {len(equivalent) - len(by_rule)} listed in {EQUIVALENT}, "
          f"{len(by_rule)} changing only a log line), "
          f"{len(unexplained)} unexplained ({percent:.1f} %"
          + (f"; of the whole path, 95 % between {interval[0]:.1f} and {interval[1]:.1f} %)" if interval else ")")
          + (f", {unchecked} not checked: the run did not finish" if unchecked else ""))
    others = {s: c for s, c in sorted(counts.items()) if s not in KILLED | {"survived", "not checked"}}
    if others or counts["timeout"]:
        detail = ", ".join(f"{c} {s}" for s, c in [("timeout", counts["timeout"])] + list(others.items()) if c)
        print(f"  of which: {detail} (timeouts count as killed; 'no tests' means no fast test reaches the function)")
    for problem in problems:
        print(f"  warning: {problem}")
    stale = sorted(n for n in listed if all_status.get(n) in KILLED or (n not in all_status and not sampled))
    for name in stale:
        why = "is killed now" if name in all_status else "is no longer a mutant (the code moved)"
        print(f"  warning: {EQUIVALENT} lists {name}, which {why}: remove or re-triage the line")
    if names and unexplained:
        by_module: dict[str, list[str]] = defaultdict(list)
        for name in unexplained:
            by_module[module_of(name)].append(name)
        print(f"unexplained survivors ({len(unexplained)}; `mutmut show NAME` shows the change):")
        for module, members in sorted(by_module.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            print(f"  {module}: {len(members)}")
            for name in members:
                print(f"    {name}  [{all_status[name]}]")
    return {"killed": killed, "total": total, "survived": len(survivors), "equivalent": len(equivalent),
            "unexplained": len(unexplained), "percent": percent, "not_checked": unchecked,
            "unexplained_names": unexplained, "interval": interval}


def _mutmut(cmd: list[str], log: Path, append: bool) -> int:
    if shutil.which("nice"):
        cmd = ["nice", "-n", "10", *cmd]
    with open(log, "a" if append else "w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode


def refresh_tests(root: Path = MUTANTS, tests: Path = Path("tests")) -> None:
    """Copy ``tests`` into ``root`` afresh: mutmut copies them once, when it generates, so `--again` would
    otherwise re-test the survivors against the tests as they were, not the ones written to kill them."""
    shutil.rmtree(root / "tests", ignore_errors=True)
    shutil.copytree(tests, root / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run_mutmut(children: int, again: bool, resume: bool, log: Path, sample: int = 0, seed: int = 0) -> int:
    """Run mutmut (niced) with its output in ``log``: a fresh run, unless ``again`` or ``resume``.

    ``sample``: test only that many mutants, drawn uniformly with ``seed`` from all of them
    (mutmut first generates them all, with a filter that matches none, to know their names).
    """
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = [str(mutmut), "run", "--max-children", str(children)]
    if (again or resume) and not MUTANTS.exists():
        print("no earlier run in mutants/: run without --again or --resume first", file=sys.stderr)
        return 2
    drawn = read_sample() if (again or resume) else None
    if sample and not (again or resume):
        shutil.rmtree(MUTANTS, ignore_errors=True)
        MUTANTS.mkdir()
        print("mutmut: generating every mutant to draw the sample ...", flush=True)
        _mutmut([*cmd, NO_MUTANT], log, append=False)
        everything = list(statuses())
        if not everything:
            tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
            print("mutmut generated no mutants:\n" + "\n".join(tail), file=sys.stderr)
            return 2
        chosen = sample_names(everything, sample, seed)
        (MUTANTS / SAMPLE).write_text(f"# seed {seed}, {len(chosen)} of {len(everything)}\n" + "\n".join(chosen) + "\n")
        drawn = (chosen, "")
        resume = True
    if again:
        refresh_tests()
        listed, _ = read_equivalents()
        found = statuses()
        pool = drawn[0] if drawn else list(found)
        left = [n for n in pool if found.get(n, "not checked") not in KILLED and n not in listed]
        by_rule = log_only(left)
        names = [n for n in left if n not in by_rule]
        if not names:
            return 0
        cmd += names
    elif resume and drawn:
        found = statuses()
        left = [n for n in drawn[0] if found.get(n, "not checked") == "not checked"]
        if not left:
            return 0
        cmd += left
    elif not resume:
        shutil.rmtree(MUTANTS, ignore_errors=True)
    MUTANTS.mkdir(exist_ok=True)
    started = time.monotonic()
    print(f"mutmut: {children} at a time, output in {log} ...", flush=True)
    code = _mutmut(cmd, log, append=resume or again)
    print(f"mutmut: finished in {(time.monotonic() - started) / 60:.1f} min (exit {code})", flush=True)
    if code != 0:
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.tools.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["report", "run"], default="report")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--again", action="store_true", help="keep mutants/ and re-test only the unexplained survivors")
    parser.add_argument("--resume", action="store_true", help="keep mutants/ and test only the mutants not yet tested")
    parser.add_argument("--sample", type=int, default=0, metavar="N",
                        help="test a uniform random sample of N mutants (a fresh run): the figure estimates the whole")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="the figure only, no survivor names")
    parser.add_argument("--fail-over", type=float, metavar="PERCENT",
                        help=f"exit 1 if more than PERCENT %% survive unexplained (the goal is {GOAL_PERCENT:g})")
    args = parser.parse_args(argv)
    if args.command == "run":
        code = run_mutmut(args.children, args.again, args.resume, MUTANTS / "run.log", args.sample, args.seed)
        if code != 0:
            return code
    found = statuses()
    if not found:
        print("no mutmut results in mutants/: run `make mutants` first", file=sys.stderr)
        return 2
    drawn = read_sample()
    if drawn:
        found = {n: found.get(n, "not checked") for n in drawn[0]}
    listed, problems = read_equivalents()
    survivors = [n for n, s in found.items() if s not in KILLED | {"not checked"}]
    figures = report(found, listed, problems, names=not args.quiet, logging_only=log_only(survivors),
                     sampled=drawn[1] if drawn else "")
    if args.fail_over is not None and figures["percent"] > args.fail_over:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
