"""The child side of `server.model.sandbox`: build a model's step from the bytes on stdin and play it.

Run as `python -m server.model.sandbox_child` by `sandbox.prove`, never imported by the
server: the model arrives on stdin (`sandbox.read_payload`), the verdict leaves as one
JSON line on stdout (`{"ok": true}` or `{"refused": reason}`); a crash or a hang is seen
by the parent as this process's death or silence.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from server.model import mdn
from server.model.files import ModelFiles
from server.model.predictor import Predictor
from server.model.sandbox import PROOF_EVENTS, read_payload, tested
from server.model.spec import ModelError, ModelInfo


def proof_walk(info: ModelInfo, n: int = PROOF_EVENTS) -> list[tuple[float, ...]]:
    """The events a test run plays: waits from 0 to `dt_max` (and past it), the corners, edges and middle of the
    model's space of N values (for N = 2, the pad's)."""
    waits = [0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 1.0, float(info.dt_max), float(info.dt_max) * 2]
    pairs = [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (0.25, 0.75), (0.9, 0.1), (0.5, 0.0)]
    values = info.spec.values  # each pair's pattern repeated over the N values: (0, 1) -> 0, 1, 0, 1, ...
    places = [tuple(pair[d % 2] for d in range(values)) for pair in pairs]
    return [(waits[i % len(waits)], *places[i % len(places)]) for i in range(n)]


def run_test(model: ModelFiles, backend: str) -> None:
    """Build the step from ``model`` and play it; ModelError saying what went wrong (names the label only)."""
    what, spec = tested(model), model.info.spec

    def check(when: str, params: np.ndarray, state: np.ndarray) -> None:
        if tuple(np.shape(params)) != (spec.param_size,) or tuple(np.shape(state)) != (1, spec.state_size):
            raise ModelError(f"{what} gives shapes {np.shape(params)} and {np.shape(state)} {when}, expected "
                             f"({spec.param_size},) and (1, {spec.state_size}): not played")
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(state))):
            raise ModelError(f"{what} gives non-finite outputs (NaN or infinity) {when}: the file may be "
                             "damaged; not played")

    predictor = Predictor(model, backend)  # builds the step and runs it once, from a neutral start
    check("from a neutral start", predictor.params, predictor.state)
    draws = mdn.RandomBlocks(np.random.default_rng(0), spec.dims)
    for i, event in enumerate(proof_walk(model.info)):
        predictor.observe(*event)
        check(f"at test event {i + 1}", predictor.params, predictor.state)
        for temperature in (1.0, 0.0):
            event = predictor.sample(draws, temperature, 1.0)
            if not all(math.isfinite(v) for v in event):
                raise ModelError(f"{what}: a draw from its predictions is not finite: not played")
    predictor.reset()
    check("after a reset", predictor.params, predictor.state)


def main() -> int:
    try:  # a crash here is expected now and then: no core file for it
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    model, backend = read_payload(sys.stdin.buffer)
    try:
        run_test(model, backend)
    except ModelError as exc:
        print(json.dumps({"refused": str(exc)}), flush=True)
        return 0
    except Exception as exc:  # noqa: BLE001 - anything the step raises refuses the model, in one line
        print(json.dumps({"refused": f"{tested(model)} failed its test run ({type(exc).__name__}): not played",
                          "detail": str(exc)[:300]}), flush=True)
        return 0
    print(json.dumps({"ok": True, "events": PROOF_EVENTS}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
