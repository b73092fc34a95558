"""What the engine says in `/status`: every key with its meaning (the table in docs/osc.md is generated from it)."""

from __future__ import annotations

import numpy as np

from server.live.schedule import LATE_TOLERANCE, MAX_PENDING

STATUS_KEYS: dict[str, str] = {
    "mode": "interaction mode",
    "paused": "1 while output is paused",
    "temperature": "mixture-weight temperature",
    "sigma_temperature": "scale temperature: the one set, else the playing model's own (calibrated at training)",
    "timescale": "factor on every predicted wait",
    "threshold": "seconds of silence before `respond` takes over",
    "max_rate": "most model events per second, per voice",
    "lookahead": "seconds a model event is sent before its time, as a timetagged bundle (0: plain, on time)",
    "model": "the playing model's name",
    "loading": "the model being loaded off the loop, or empty",
    "backend": "the step engine in use: `litert`; where LiteRT is missing `numpy` (or `tensorflow` for a model "
               "without step.npz); or the one `--step-engine` forces",
    "dims": "N, the values per event the playing model takes and plays (`/gesture v1 .. vN`)",
    "inputs": "performer events received",
    "outputs": "model events played",
    "dropped": f"answers dropped because {MAX_PENDING} were already waiting in their voice",
    "late_dropped": f"model events dropped because they would have left more than {LATE_TOLERANCE * 1000:.0f} ms "
                    "late (a stall)",
    "rate_dropped": "answers dropped to hold `max_rate`",
    "untagged": "model events sent plain although `lookahead` > 0, because they could not leave before their time "
                "(never a timetag in the past)",
    "clamped": "performer positions outside [0, 1], clamped",
    "sink_errors": "outputs (OSC, MIDI, log) that raised",
    "model_swaps": "models swapped in",
    "model_load_errors": "model loads that failed (the old model kept playing)",
    "voices_refused": "performer events refused a new voice: every voice was taken, or their sender already had "
                      "`max_voices_per_sender`",
    "voices_denied": "requests refused because the voice they named belongs to another sender",
    "voices_expired": "voices forgotten after their performer's silence",
    "voices_policy": "`one` or `per-sender`",
    "voices": "voices playing now (all senders')",
    "pending": "model events scheduled and not yet played",
    "step_us_median": "observe + predict + sample, median over the last 2,048 steps (µs)",
    "step_us_p99": "the same, 99th percentile (µs)",
    "late_us_median": "how long after it should have left a model event left, median (µs)",
    "late_us_p99": "the same, 99th percentile (µs)",
    "uptime_s": "seconds since start",
    "voice<n>_from": "per-sender only, for each voice n the asker owns (every voice with `/status all` from "
                     "loopback; none in the `status` stream): who plays it (`host:port`, or `midi channel c`)",
    "voice<n>_mode": "its mode (its own, or the global one)",
    "voice<n>_temperature": "its temperature (its own, or the global one)",
    "voice<n>_inputs": "its performer events",
    "voice<n>_outputs": "its model events played",
    "voice<n>_idle_s": "seconds since its performer's last event",
}
VOICE_STATUS_KEYS = tuple(k.removeprefix("voice<n>_") for k in STATUS_KEYS if k.startswith("voice<n>_"))
COUNTERS = ("inputs", "outputs", "dropped", "late_dropped", "rate_dropped", "untagged", "clamped", "sink_errors",
            "model_swaps", "model_load_errors", "voices_refused", "voices_denied", "voices_expired")


def new_counts() -> dict[str, int]:
    """The engine's counters, all zero, in `/status` order."""
    return dict.fromkeys(COUNTERS, 0)


class LatencyWindow:
    """The last N step latencies, for median and p99 in `/status` without unbounded growth."""

    def __init__(self, size: int = 2048) -> None:
        self._values = np.zeros(size)
        self._n = 0

    def add(self, seconds: float) -> None:
        self._values[self._n % len(self._values)] = seconds
        self._n += 1

    def percentile(self, q: float) -> float:
        return self.percentiles((q,))[0]

    def percentiles(self, qs: tuple[float, ...]) -> tuple[float, ...]:
        """Several at once: one sort for all (the status push reads two per window four times a second)."""
        n = min(self._n, len(self._values))
        return tuple(float(v) for v in np.percentile(self._values[:n], qs)) if n else tuple(0.0 for _ in qs)


def micro(name: str, seconds: tuple[float, ...]) -> dict[str, float]:
    """`<name>_median` and `<name>_p99` in microseconds, to 0.1."""
    return {f"{name}_median": round(seconds[0] * 1e6, 1), f"{name}_p99": round(seconds[1] * 1e6, 1)}
