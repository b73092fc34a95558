"""The engine's OSC output: `/prediction` when a model event leaves, and the displays' streams.

Implements the engine's `Sink` (every played event) and `StreamSink` (the `mixture`
and `surprise` maths while someone subscribes), so an answer goes from its voice
straight to the socket.
"""

from __future__ import annotations

import asyncio
import time

from server.event import Event
from server.osc.namespace import STREAMS
from server.osc.output import OscOutput
from server.osc.streams import Subscriptions
from server.osc.wire import ntp_timetag


class OscSink:
    """Sends model events to their destinations (timetagged when handed over early) and the streams to subscribers."""

    def __init__(self, loop: asyncio.AbstractEventLoop, output: OscOutput) -> None:
        self._loop = loop
        self._output = output
        if output.streams is None:
            output.streams = Subscriptions(output, tuple(STREAMS))
        self._streams: Subscriptions = output.streams

    def emit(self, event: Event) -> None:
        streams = self._streams
        voice = () if event.voice is None else (event.voice,)
        if event.source == "model":
            timetag = None
            if event.timetagged:  # the event's time, from the loop's monotonic schedule to the wall clock
                timetag = ntp_timetag(time.time() + (event.time - self._loop.time()))
            self._output.send_prediction(event.values, event.voice, event.route, timetag)
            if streams.active("prediction"):  # displays get plain messages as they leave
                streams.send("prediction", "/prediction", *event.values, *voice)
        elif streams.active("performer"):
            streams.send("performer", "/performer", *event.values, *voice)

    def silence(self, voice: int | None) -> None:
        """OSC holds no notes: a client hears only what was sent."""

    def retune(self, values: int) -> None:
        """A model of another width plays: `/model/dims N` to every destination, so a patch can follow."""
        self._output.broadcast("/model/dims", values)

    def wants(self, stream: str) -> bool:
        return self._streams.active(stream)

    def mixture(self, values: list[float], voice: int | None) -> None:
        self._streams.send("mixture", "/mixture", int(values[0]), *values[1:], *(() if voice is None else (voice,)))

    def surprise(self, nll: float, smoothed: float, voice: int | None) -> None:
        self._streams.send("surprise", "/surprise", nll, smoothed, *(() if voice is None else (voice,)))
