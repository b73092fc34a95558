"""The fast tests, as a pytest plugin: `pytest -p tests.fast` (and `make mutants`, which loads it for mutmut).

A fast test runs in this process and trains nothing, so a mutant of the live path it reaches
can be caught by it in a second or so. The rest are left out, visibly:

- a test that starts a process (a server, the monitor, Pd, sclang, Chromium, the CLI in a
  subprocess) is skipped at the moment it tries, whether in the test or in a fixture: the
  code it exercises runs in the other process, where mutmut cannot see which mutant it hit;
- a test that trains a model is skipped the same way: Keras' fit costs ~10 s a mutant even on a
  network of 4 units (tracing the training step). Training is `server.learn.train.train` (the
  session fixtures `tiny_model` and `region_models`, the CLI's `train`) and `fit_within`, the
  fit itself, which `train` and `server.learn.finetune.fine_tune` both call. A test may still
  call `fine_tune` when it stands in for the fit (`monkeypatch.setattr(finetune, "fit_within",
  ...)`): everything around the fit (the phrases, the budget, the gate, the lineage, the
  conversion and export of a tiny network) then runs here in a few seconds. A `fine_tune` that
  would really fit is skipped at once, before it reads its parent;
- a test marked `@pytest.mark.slow` is deselected (for slow work in this process that
  neither rule catches; `[tool.mutmut]` in pyproject.toml also ignores a few such files).

TensorFlow without training is fast enough: a test may build a network of a few units
(`server.model.network.build_model`), convert and export it (~1-2 s), as tests/tinynet.py does.

Hypothesis runs derandomised, without deadlines and with at most `EXAMPLES` examples a test,
so every mutant meets the same examples, a slow (mutated) example is not a failure, and a
fuzz test costs a second rather than ten.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

SANDBOX = "server.model.sandbox_child"  # a model's proof: a short child every load starts, often from a worker thread
EXAMPLES = 50  # hypothesis examples a test at most (the full suite runs each test's own number)

_running = False  # inside a test (setup, call or teardown): the guards act only then
_tainted: str | None = None  # why the running test is not fast, when it found out inside an event loop


def _not_fast(reason: str) -> None:
    """Leave the test now (a skip); inside a running event loop, fail the call and report a skip at the end.

    A skip raised inside asyncio (`create_subprocess_exec`) would escape the loop and leave it
    marked running, so there the process just fails to start and the test's outcome becomes the skip.
    """
    global _tainted
    try:
        in_loop = asyncio.get_running_loop() is not None
    except RuntimeError:
        in_loop = False
    if not in_loop:
        pytest.skip(reason)
    _tainted = _tainted or reason
    raise OSError(reason)


def _guard_popen() -> None:
    original = subprocess.Popen.__init__
    if getattr(original, "_fast_guard", False):
        return

    def init(self, args, *rest, **kwargs):
        shown = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
        if _running and SANDBOX not in shown:
            _not_fast(f"not fast: starts a process ({shown[:80]})")
        return original(self, args, *rest, **kwargs)

    init._fast_guard = True  # type: ignore[attr-defined]
    subprocess.Popen.__init__ = init  # type: ignore[method-assign]


def _guard_browser() -> None:
    """Playwright starts its driver inside its own event loop: skip before it gets there."""
    try:
        from playwright import sync_api
    except ImportError:
        return
    original = sync_api.sync_playwright
    if getattr(original, "_fast_guard", False):
        return

    def sync_playwright(*args, **kwargs):
        if _running:
            pytest.skip("not fast: drives a browser")
        return original(*args, **kwargs)

    sync_playwright._fast_guard = True  # type: ignore[attr-defined]
    sync_api.sync_playwright = sync_playwright


def _guard_training() -> None:
    """Training skips the test: `train`, and the fit that `train` and `fine_tune` share (`fit_within`).

    `fine_tune` itself runs when the test has replaced `server.learn.finetune.fit_within` with a
    stand-in; while the real (guarded) fit is still in place it skips at once, before it spends
    a second reading and scoring its parent.
    """
    import importlib

    def guard(module_name: str, name: str, wrap):
        module = importlib.import_module(module_name)
        original = getattr(module, name, None)
        if original is None:
            raise pytest.UsageError(f"tests/fast.py guards {module_name}.{name}, which is gone: update the guard")
        if not getattr(original, "_fast_guard", False):
            guarded = wrap(original, module)
            guarded._fast_guard = True  # type: ignore[attr-defined]
            setattr(module, name, guarded)

    def trains(original, module):
        def guarded(*args, **kwargs):
            if _running:
                pytest.skip("not fast: trains a model")
            return original(*args, **kwargs)

        return guarded

    def fine_tunes(original, module):
        def guarded(*args, **kwargs):
            if _running and getattr(module.fit_within, "_fast_guard", False):
                pytest.skip("not fast: trains a model (fine_tune with the real fit)")
            return original(*args, **kwargs)

        return guarded

    guard("server.learn.train", "train", trains)
    guard("server.learn.train", "fit_within", trains)
    guard("server.learn.finetune", "fit_within", trains)  # imported by name there: its own reference
    guard("server.learn.finetune", "fine_tune", fine_tunes)


def pytest_configure(config: pytest.Config) -> None:
    from hypothesis import settings

    settings.register_profile("fast", derandomize=True, deadline=None, database=None, print_blob=True)
    settings.load_profile("fast")
    import platform

    platform.processor()  # runs `uname -p` once and caches it: TensorFlow's lazy imports (h5py) ask for it in a test
    _guard_popen()
    _guard_browser()
    _guard_training()
    # `-m "not slow"` unless the command line chose markers itself
    if not config.option.markexpr:
        config.option.markexpr = "not slow"


def pytest_collection_modifyitems(items) -> None:
    from hypothesis import settings

    for item in items:
        test = getattr(item, "obj", None)
        chosen = getattr(test, "_hypothesis_internal_use_settings", None)  # read by @given at each call
        if chosen is not None and chosen.max_examples > EXAMPLES:
            test._hypothesis_internal_use_settings = settings(chosen, max_examples=EXAMPLES)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _running, _tainted
    _running, _tainted = True, None
    try:
        yield
    finally:
        _running, _tainted = False, None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _tainted and report.failed:
        path, line, _ = item.location
        report.outcome, report.longrepr = "skipped", (str(path), (line or 0) + 1, f"Skipped: {_tainted}")
