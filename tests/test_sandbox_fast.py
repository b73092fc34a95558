"""The model's proof, in this process: what `python -m server.model.sandbox_child` does with a model.

The child's functions are called here directly (a child process is invisible to coverage
and to mutmut): the payload it reads, the walk it plays, each check with the message it
refuses a model with, and the one JSON line it answers. Real tiny models (LiteRT and the
TensorFlow fallback) pass; a scripted step shows each way a model can fail, and where.
"""

from __future__ import annotations

import io
import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from server.model import mdn, sandbox, sandbox_child
from server.model.files import ModelFiles, read_model
from server.model.predictor import Predictor
from server.model.spec import ModelError
from tests.tinynet import export_tiny, tiny_info, tiny_model

NEUTRAL = (0.0, 0.5, 0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("sandbox") / "tiny")


@pytest.fixture(scope="module")
def info():
    return tiny_info()


def files(info, *names: str, label: str = "tiny") -> ModelFiles:
    """A model with stand-in bytes for ``names`` (a scripted step never reads them)."""
    return ModelFiles(label, info, {name: b"bytes of " + name.encode() for name in names})


class Scripted:
    """A step with the right shapes and finite values, except at the calls listed in ``bad``.

    Call 0 is the neutral start, calls 1-24 the walk's events, call 25 the start after the reset.
    """

    def __init__(self, spec, bad: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.spec, self.bad, self.events = spec, bad or {}, []
        k, d = spec.mixtures, spec.dims
        self.params = np.concatenate([np.zeros(k * d), np.ones(k * d), np.zeros(k)]).astype(np.float32)

    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = len(self.events)
        self.events.append(np.array(event, np.float64).ravel().tolist())
        if i in self.bad:
            return self.bad[i]
        return self.params.copy(), np.full((1, self.spec.state_size), 0.1 * (i + 1), np.float32)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch):
    """``scripted(info, bad=..., draw=...)``: run_test's Predictor runs a `Scripted` step; returns a record of the run.

    ``draw``: {sample number: event} replaces what the sampler drew (to make a draw non-finite).
    """

    def make(info, bad=None, draw=None):
        run = SimpleNamespace(step=Scripted(info.spec, bad), backends=[], samples=[])

        class Watched(Predictor):
            def sample(self, draws, temperature, sigma_temperature):
                event = super().sample(draws, temperature, sigma_temperature)
                run.samples.append((temperature, sigma_temperature, event))
                return (draw or {}).get(len(run.samples), event)

        def predictor(model, backend):
            run.backends.append(backend)
            return Watched(model, backend, step=(run.step, "scripted"))

        monkeypatch.setattr(sandbox_child, "Predictor", predictor)
        return run

    return make


# --------------------------------------------------------------------------- the walk


def test_the_proof_walk_visits_waits_up_to_past_dt_max_and_the_pads_corners_edges_and_middle(info) -> None:
    walk = sandbox_child.proof_walk(info)
    waits = [0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 1.0, 5.0, 10.0]
    places = [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (0.25, 0.75), (0.9, 0.1), (0.5, 0.0)]
    assert len(walk) == sandbox.PROOF_EVENTS == 24
    assert walk == [(waits[i % 9], *places[i % 8]) for i in range(24)]
    assert sandbox_child.proof_walk(info, 3) == [(0.0, 0.0, 0.0), (0.001, 1.0, 1.0), (0.01, 0.5, 0.5)]


def test_a_sound_model_is_played_through_the_walk_sampled_after_each_event_and_reset(info, scripted) -> None:
    run = scripted(info)
    sandbox_child.run_test(files(info, "step.tflite"), "litert")
    norm = info.normaliser
    expected = [norm.forward_event(NEUTRAL)] + [norm.forward_event(e) for e in sandbox_child.proof_walk(info)]
    expected.append(norm.forward_event(NEUTRAL))  # the reset starts afresh
    np.testing.assert_allclose(run.step.events, expected, rtol=1e-6)
    assert run.backends == ["litert"]
    assert [(t, s) for t, s, _ in run.samples] == [(1.0, 1.0), (0.0, 1.0)] * 24  # free and greedy, unscaled sigmas
    # the draws come from a fixed seed, so a model gets the same verdict every time
    again = Predictor(files(info, "step.tflite"), step=(Scripted(info.spec), "scripted"))
    draws = mdn.RandomBlocks(np.random.default_rng(0), info.spec.dims)
    assert [event for _, _, event in run.samples] == [again.sample(draws, t, 1.0) for _ in range(24) for t in (1.0, 0.0)]


@pytest.mark.parametrize("call, where", [(0, "from a neutral start"), (1, "at test event 1"),
                                         (24, "at test event 24"), (25, "after a reset")])
def test_a_model_answering_nan_is_refused_saying_where(info, scripted, call, where) -> None:
    spec = info.spec
    nan = np.full(spec.param_size, np.nan, np.float32)
    run = scripted(info, bad={call: (nan, np.zeros((1, spec.state_size), np.float32))})
    with pytest.raises(ModelError) as caught:
        sandbox_child.run_test(files(info, "step.tflite"), "litert")
    assert str(caught.value) == (f"tiny/step.tflite gives non-finite outputs (NaN or infinity) {where}: "
                                 "the file may be damaged; not played")
    assert len(run.step.events) == call + 1  # refused at once


def test_a_model_whose_state_turns_infinite_is_refused(info, scripted) -> None:
    spec = info.spec
    params = Scripted(spec).params
    scripted(info, bad={5: (params, np.full((1, spec.state_size), np.inf, np.float32))})
    with pytest.raises(ModelError, match=r"^tiny/model.keras gives non-finite outputs \(NaN or infinity\) at test event 5:"):
        sandbox_child.run_test(files(info, "model.keras"), "tensorflow")


def test_a_model_of_the_wrong_shape_is_refused_with_both_shapes(info, scripted) -> None:
    spec = info.spec
    p, s = spec.param_size, spec.state_size
    params = Scripted(spec).params
    scripted(info, bad={0: (np.zeros(p + 1, np.float32), np.zeros((1, s), np.float32))})
    with pytest.raises(ModelError) as caught:
        sandbox_child.run_test(files(info, "step.tflite"), "litert")
    assert str(caught.value) == (f"tiny/step.tflite gives shapes ({p + 1},) and (1, {s}) from a neutral start, "
                                 f"expected ({p},) and (1, {s}): not played")
    scripted(info, bad={3: (params, np.zeros((1, s + 2), np.float32))})  # the params right, the state not
    with pytest.raises(ModelError) as caught:
        sandbox_child.run_test(files(info, "step.tflite"), "litert")
    assert str(caught.value) == (f"tiny/step.tflite gives shapes ({p},) and (1, {s + 2}) at test event 3, "
                                 f"expected ({p},) and (1, {s}): not played")


def test_a_model_whose_draws_are_not_finite_is_refused(info, scripted) -> None:
    run = scripted(info, draw={7: (math.nan, 0.5, 0.5)})
    with pytest.raises(ModelError) as caught:
        sandbox_child.run_test(files(info, "step.tflite"), "litert")
    assert str(caught.value) == "tiny/step.tflite: a draw from its predictions is not finite: not played"
    assert len(run.samples) == 7


@pytest.mark.parametrize("backend, names", [("litert", ("step.tflite",)), ("tensorflow", ("model.keras",))])
def test_a_real_tiny_model_passes_its_test_run_on_either_backend(folder, backend, names) -> None:
    sandbox_child.run_test(read_model(folder, names, "tiny"), backend)


def test_a_real_model_answering_nan_is_refused(folder) -> None:
    from server.model.export import convert_to_tflite

    model = read_model(folder, ("step.tflite",), "tiny")
    broken = tiny_model(model.info.spec, seed=3)
    weights = broken.get_weights()
    weights[-1] = np.full_like(weights[-1], np.nan)
    broken.set_weights(weights)
    damaged = ModelFiles("tiny", model.info, {"step.tflite": convert_to_tflite(broken, model.info.spec)})
    with pytest.raises(ModelError, match=r"^tiny/step.tflite gives non-finite outputs .* from a neutral start"):
        sandbox_child.run_test(damaged, "litert")


# --------------------------------------------------------------------------- the child's main: one JSON line


class Pipe:
    """A stdout whose text reaches the parent only when flushed (a child can die right after printing)."""

    def __init__(self) -> None:
        self.pending, self.sent = "", ""

    def write(self, text: str) -> int:
        self.pending += text
        return len(text)

    def flush(self) -> None:
        self.sent, self.pending = self.sent + self.pending, ""


@pytest.fixture
def child(monkeypatch: pytest.MonkeyPatch, info):
    """``child(outcome)``: run `main` on a model sent as `sandbox.prove` sends it; returns (exit code, lines, run_test calls).

    ``outcome``: None (the test run passes) or the exception run_test raises.
    """
    import resource

    limits: list[tuple] = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, limit: limits.append((which, limit)))

    def run(outcome: Exception | None, backend: str = "litert"):
        model = files(info, "step.tflite")
        calls = []

        def run_test(*args):
            calls.append(args)
            if outcome is not None:
                raise outcome

        monkeypatch.setattr(sandbox_child, "run_test", run_test)
        monkeypatch.setattr("sys.stdin", SimpleNamespace(buffer=io.BytesIO(sandbox._payload(model, backend))))
        pipe = Pipe()
        monkeypatch.setattr("sys.stdout", pipe)
        code = sandbox_child.main()
        monkeypatch.undo()  # sys.stdout back before anything prints
        assert limits == [(resource.RLIMIT_CORE, (0, 0))]  # no core file from a crash
        assert calls == [(model, backend)]
        return code, [json.loads(line) for line in pipe.sent.splitlines()], pipe.pending

    return run


def test_the_child_says_ok_and_how_many_events_it_played(child) -> None:
    code, lines, unsent = child(None)
    assert (code, lines, unsent) == (0, [{"ok": True, "events": 24}], "")


def test_the_child_passes_a_refusal_on_word_for_word(child) -> None:
    code, lines, unsent = child(ModelError("tiny/step.tflite gives shapes (3,) ...: not played"), "tensorflow")
    assert (code, lines, unsent) == (0, [{"refused": "tiny/step.tflite gives shapes (3,) ...: not played"}], "")


def test_the_child_refuses_a_model_whose_step_raises_naming_the_error_type(child) -> None:
    code, lines, unsent = child(RuntimeError("x" * 400))
    assert (code, unsent) == (0, "")
    assert lines == [{"refused": "tiny/step.tflite failed its test run (RuntimeError): not played", "detail": "x" * 300}]


# --------------------------------------------------------------------------- the payload and signals


def test_the_payload_carries_the_model_and_backend_to_the_child(folder) -> None:
    model = read_model(folder, ("model.keras", "step.tflite"), "tiny")
    stream = io.BytesIO(sandbox._payload(model, "tensorflow") + b"rest")
    got, backend = sandbox.read_payload(stream)
    assert got == model and backend == "tensorflow"
    assert got.label == "tiny" and sorted(got.contents) == ["model.keras", "step.tflite"]
    assert stream.read() == b"rest"  # it reads exactly the files' bytes


def test_a_signal_is_named_when_it_has_a_name() -> None:
    assert sandbox._signal_name(signal.SIGSEGV) == "SIGSEGV"
    assert sandbox._signal_name(9) == "SIGKILL"
    assert sandbox._signal_name(1234) == "signal 1234"


# --------------------------------------------------------------------------- prove: reading the child's answer


@pytest.fixture
def answered(monkeypatch: pytest.MonkeyPatch, folder):
    """``answered(stdout, returncode)``: run `prove` on the tiny model with the child's run replaced by that answer."""

    def make(stdout: bytes, returncode: int = 0, stderr: bytes = b"") -> None:
        def run(*args, **kwargs):
            return SimpleNamespace(stdout=stdout, stderr=stderr, returncode=returncode)

        monkeypatch.setattr(sandbox.subprocess, "run", run)
        sandbox.prove(read_model(folder, ("step.npz",), "tiny"), "numpy")

    return make


def test_a_child_that_printed_after_its_answer_is_still_understood(answered) -> None:
    """A library's warning on stdout after the JSON line must not turn a sound model into a refused one."""
    answered(b'{"ok": true, "events": 24}\nW0000 some library warning\n')


def test_a_child_that_exits_cleanly_without_saying_ok_is_a_failed_test_run(answered) -> None:
    with pytest.raises(ModelError, match=r"^tiny/step.npz failed its test run \(exit 0\): not played$"):
        answered(b'{"events": 24}\n')


def test_a_child_that_died_is_refused_by_its_signal_and_its_last_words_are_logged(answered, caplog) -> None:
    """Whatever bytes a dying library leaves on stderr (here not UTF-8), the refusal names the signal."""
    with caplog.at_level("DEBUG", logger="server.model.sandbox"), \
            pytest.raises(ModelError, match=r"^tiny/step.npz crashed a test run in a separate process \(SIGSEGV\)"):
        answered(b"", -11, b"loading\nFatal Python error: Segmentation fault \xff\n")
    assert caplog.messages == ["model tiny: test run died; its last words: Fatal Python error: Segmentation fault \ufffd"]


def test_a_sound_child_that_warned_on_stderr_passes(answered) -> None:
    answered(b'{"ok": true, "events": 24}\n', 0, b"W0000 a library's warning\n")


def test_the_childs_tensorflow_is_told_to_keep_its_log_lines_to_itself(monkeypatch: pytest.MonkeyPatch, folder) -> None:
    """TensorFlow's start-up lines on stderr would be taken for a dying child's last words."""
    envs = []

    def run(*args, **kwargs):
        envs.append(kwargs["env"])
        return SimpleNamespace(stdout=b'{"ok": true, "events": 24}\n', stderr=b"", returncode=0)

    monkeypatch.setattr(sandbox.subprocess, "run", run)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    sandbox.prove(read_model(folder, ("step.npz",), "tiny"), "numpy")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # a user's own choice is kept
    sandbox.prove(read_model(folder, ("step.npz",), "tiny"), "numpy")
    assert [env["TF_CPP_MIN_LOG_LEVEL"] for env in envs] == ["3", "1"]
