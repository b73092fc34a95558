"""`make mutants`' figure: what counts as killed, listed, equivalent by the log-line rule, and unexplained."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.tools import mutants

MODULE = '''
import logging
log = logging.getLogger(__name__)

def x_warn__mutmut_orig(n):
    if n > 3:
        log.warning("too many: %d", n)
    return n

def x_warn__mutmut_1(n):
    if n > 3:
        log.warning("XXtoo many: %dXX", n)
    return n

def x_warn__mutmut_2(n):
    if n > 3:
        log.warning(None, n)
    return n

def x_warn__mutmut_3(n):
    if n >= 3:
        log.warning("too many: %d", n)
    return n

def x_warn__mutmut_4(n):
    if n > 3:
        print("too many: %d", n)
    return n

def x_say__mutmut_orig(level, n):
    log.log(level, "said %d", n)
    return n + 1

def x_say__mutmut_1(level, n):
    log.log(None, "XXsaid %dXX", n)
    return n + 1

def x_say__mutmut_2(level, n):
    log.log(level, "said %d", n)
    return n + 2
'''


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(MODULE)
    return tmp_path


def test_only_changes_inside_a_logging_call_are_equivalent_by_rule(tree: Path) -> None:
    names = [f"pkg.mod.x_warn__mutmut_{i}" for i in (1, 2, 3, 4)]
    assert mutants.log_only(names, tree) == {"pkg.mod.x_warn__mutmut_1", "pkg.mod.x_warn__mutmut_2"}


def test_a_logging_call_at_a_level_chosen_by_the_caller_is_a_logging_call_too(tree: Path) -> None:
    names = ["pkg.mod.x_say__mutmut_1", "pkg.mod.x_say__mutmut_2"]
    assert mutants.log_only(names, tree) == {"pkg.mod.x_say__mutmut_1"}


def test_a_mutant_whose_module_is_missing_is_not_equivalent(tree: Path) -> None:
    assert mutants.log_only(["pkg.gone.x_warn__mutmut_1", "pkg.mod.x_warn__mutmut_9"], tree) == set()


def test_the_figure_counts_killed_listed_by_rule_and_unexplained(capsys: pytest.CaptureFixture[str]) -> None:
    status = {"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "timeout", "m.x_f__mutmut_3": "survived",
              "m.x_f__mutmut_4": "no tests", "m.x_f__mutmut_5": "survived", "m.x_f__mutmut_6": "not checked"}
    figures = mutants.report(status, {"m.x_f__mutmut_3": "same for every input"}, [],
                             logging_only={"m.x_f__mutmut_5"})
    out = capsys.readouterr().out
    assert figures["killed"] == 2 and figures["total"] == 6 and figures["survived"] == 3
    assert figures["equivalent"] == 2 and figures["unexplained_names"] == ["m.x_f__mutmut_4"]
    assert figures["percent"] == pytest.approx(100 / 6)
    assert "1 listed in" in out and "1 changing only a log line" in out and "1 not checked" in out


def test_a_listed_name_without_a_reason_does_not_count(tmp_path: Path) -> None:
    listing = tmp_path / "eq.txt"
    listing.write_text("# header\nm.x_f__mutmut_3  # same for every input\nm.x_f__mutmut_4\n")
    listed, problems = mutants.read_equivalents(listing)
    assert listed == {"m.x_f__mutmut_3": "same for every input"}
    assert len(problems) == 1 and "m.x_f__mutmut_4" in problems[0]


def test_a_meta_file_being_written_is_left_out_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.py.meta").write_text('{"exit_code_by_key": {"m.x_f__mutmut_1": 1, "m.x_f__mutmut_2": 0}}')
    (tmp_path / "b.py.meta").write_text("")  # mutmut is writing it
    assert mutants.statuses(tmp_path) == {"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "survived"}
    assert "b.py.meta unreadable" in capsys.readouterr().err


def test_a_sample_is_uniform_without_repeats_and_the_same_for_the_same_seed() -> None:
    names = [f"m.x_f__mutmut_{i}" for i in range(1, 1001)]
    first = mutants.sample_names(names, 100, seed=1)
    assert len(set(first)) == 100 and set(first) <= set(names)
    assert mutants.sample_names(list(reversed(names)), 100, seed=1) == first  # the order given does not matter
    assert mutants.sample_names(names, 100, seed=2) != first
    assert sorted(mutants.sample_names(names[:30], 100, seed=1), key=mutants._natural) == names[:30]


def test_the_wilson_interval_matches_its_closed_form() -> None:
    low, high = mutants.wilson(0, 500)  # no hits: from 0 to z^2 / (n + z^2)
    assert low == 0.0 and high == pytest.approx(100 * 1.96 ** 2 / (500 + 1.96 ** 2))
    low, high = mutants.wilson(50, 100)  # symmetric about a half
    assert low + high == pytest.approx(100.0) and 40.0 < low < 41.0


def test_a_sampled_figure_says_so_and_estimates_the_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / mutants.SAMPLE).write_text("# seed 1, 2 of 9\nm.x_f__mutmut_1\nm.x_f__mutmut_2\n")
    names, header = mutants.read_sample(tmp_path)
    assert names == ["m.x_f__mutmut_1", "m.x_f__mutmut_2"] and header == "seed 1, 2 of 9"
    figures = mutants.report({"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "survived"}, {}, [], sampled=header)
    out = capsys.readouterr().out
    assert out.startswith("mutants (a random sample: seed 1, 2 of 9): 1 killed / 2 total")
    assert figures["interval"] == mutants.wilson(1, 2) and "95 %" in out
    assert mutants.read_sample(tmp_path / "none") is None


def test_again_retests_against_the_tests_as_they_are_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mutmut copies tests/ once, when it generates: `--again` copies them afresh before re-testing."""
    root, tests = tmp_path / "mutants", tmp_path / "tests"
    (root / "tests" / "__pycache__").mkdir(parents=True)
    (root / "tests" / "test_old.py").write_text("stale")
    (tests / "__pycache__").mkdir(parents=True)
    (tests / "__pycache__" / "x.pyc").write_bytes(b"")
    (tests / "test_new.py").write_text("def test_kills(): ...")
    mutants.refresh_tests(root, tests)
    assert sorted(p.name for p in (root / "tests").iterdir()) == ["test_new.py"]
    assert (root / "tests" / "test_new.py").read_text() == "def test_kills(): ..."

    refreshed: list[bool] = []
    monkeypatch.setattr(mutants, "MUTANTS", root)
    monkeypatch.setattr(mutants, "refresh_tests", lambda: refreshed.append(True))
    monkeypatch.setattr(mutants, "statuses", lambda: {})
    monkeypatch.setattr(mutants, "read_sample", lambda: (["a.x_f__mutmut_1"], "# seed 1"))
    monkeypatch.setattr(mutants, "log_only", lambda names: set())
    ran: list[list[str]] = []
    monkeypatch.setattr(mutants, "_mutmut", lambda cmd, log, append: ran.append(cmd) or 0)
    assert mutants.run_mutmut(2, again=True, resume=False, log=tmp_path / "run.log") == 0
    assert refreshed == [True] and ran and ran[0][-1] == "a.x_f__mutmut_1"
