"""Which model plays, and changing it without stopping the music: read, checked and built off the loop.

A load runs in a worker thread (files, checks, a test run of the step in a child process,
then the interpreter) and the result is handed to `install` on the loop; of two loads
racing, the one asked for last wins, and a failed load leaves the playing model alone.
The test run (`server.model.sandbox`) is what keeps a damaged file from ever reaching this
process's interpreter: a step that crashes, hangs or answers NaN there is refused here.
Reasons name the model, never a path.

Each installed model has a generation (0 for the one the server started with, one more per
swap), so a caller can tell "the model playing now" from "a model of the same name": a
load may be made conditional on the generation it was asked against (`only_over`), which
is how `/learn` swaps in its fine-tune only over the very model it was trained from.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.live.controls import ControlError
from server.model.files import check_model_name, resolve_model_dir
from server.model.predictor import Predictor
from server.model.spec import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Playing:
    """Which model plays now: its name, its generation (which install it is), and any model being loaded."""

    name: str
    generation: int
    loading: str = ""


class ModelSwap:
    """The playing model's name and folder, and the loads that may replace it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, models_dir: Path, name: str, folder: Path | None,
                 install: Callable[[Predictor], None], counts: dict[str, int], step_engine: str = "auto") -> None:
        """``step_engine``: what every model loaded here runs on (`--step-engine`: auto, or one forced)."""
        self._loop = loop
        self._step_engine = step_engine
        self.models_dir = Path(models_dir)
        self.name = name  # the playing model's name
        self.folder = folder if folder is not None else self.models_dir / name  # where it came from
        self.loading = ""  # the model being loaded, if any
        self._install = install
        self._counts = counts
        self.generation = 0  # one more per model installed: which load is playing, whatever its name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._serial = 0
        self._stopped = False

    def playing(self) -> Playing:
        """The model playing now (name and generation) and the one being loaded, if any."""
        return Playing(self.name, self.generation, self.loading)

    def load(self, name: str, on_error: Callable[[str], None] | None = None,
             on_loaded: Callable[[], None] | None = None, *, only_over: int | None = None) -> None:
        """Start loading models/<name>; ControlError at once for a bad name, `on_error(reason)` later if it fails.

        ``only_over``: install it only while generation ``only_over`` still plays; if another
        model was installed, or a later load superseded this one, `on_error` says so (a plain
        load superseded by a later one is dropped silently: the later request answers).
        """
        try:
            check_model_name(name)
        except ValueError as e:
            raise ControlError(str(e)) from None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._serial += 1
        serial = self._serial
        self.loading = name
        future = self._loop.run_in_executor(self._pool, self._read, name)
        future.add_done_callback(lambda f: self._loaded(f, serial, name, on_error, on_loaded, only_over))

    def stop(self) -> None:
        """Abandon any load in flight."""
        self._serial += 1
        self._stopped = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _read(self, name: str) -> tuple[Predictor, Path]:
        """Worker thread: files, checks, a test run in a child process, then the interpreter; errors name the
        model, never a path. Also returns the folder it came from (the user's models or the shipped ones)."""
        folder = resolve_model_dir(name, self.models_dir, allow_paths=False)
        return Predictor.load(folder, self._step_engine, label=name, prove=True), folder

    def _loaded(self, future: asyncio.Future[tuple[Predictor, Path]], serial: int, name: str,
                on_error: Callable[[str], None] | None, on_loaded: Callable[[], None] | None,
                only_over: int | None) -> None:
        if serial != self._serial or future.cancelled():  # a later request (or stop) superseded this one
            if not future.cancelled():
                future.exception()  # retrieved: a superseded load's failure is no one's news
            if only_over is not None and on_error is not None and not self._stopped:
                on_error(f"model {name!r} not swapped in: {self.loading or 'another model'!r} was asked for "
                         "while it loaded")
            return
        self.loading = ""
        error = future.exception()
        if error is not None:
            self._counts["model_load_errors"] += 1
            if isinstance(error, (ModelError, OSError, ValueError)):
                reason = f"model {name!r} not loaded, keeping {self.name!r}: {error}"
            else:
                log.error("loading model %s failed", name, exc_info=error)
                reason = f"model {name!r} not loaded, keeping {self.name!r}: internal error"
            if on_error is not None:
                on_error(reason)
            return
        if only_over is not None and only_over != self.generation:  # cannot happen while loads are serial
            if on_error is not None:
                on_error(f"model {name!r} not swapped in: {self.name!r} began playing while it loaded")
            return
        predictor, folder = future.result()
        self.name, self.folder = name, folder
        self.generation += 1
        self._counts["model_swaps"] += 1
        log.info("model swapped to %s (%s)", name, predictor.backend)
        self._install(predictor)
        if on_loaded is not None:
            on_loaded()
