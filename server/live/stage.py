"""What every voice shares: the loop, the settings, the outputs, the stream maths and the counters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from server.live.outputs import Outputs
from server.live.settings import Settings
from server.live.status import LatencyWindow
from server.live.streams import StreamMaths


@dataclass
class Stage:
    loop: asyncio.AbstractEventLoop
    settings: Settings
    outputs: Outputs
    streams: StreamMaths
    counts: dict[str, int]
    latency: LatencyWindow  # observe + predict + sample, per step
    lateness: LatencyWindow  # how long after it should have left each model event left
