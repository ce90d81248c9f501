"""EngineLoop: runs one LLMEngine on a thread of its own and lets other threads talk to it.

The engine is single-threaded. Worker shells (gRPC handlers, on many threads) never touch it
directly: they `call()` a function that runs on the engine thread between two steps, and they
`subscribe()` to a request's outputs, which arrive on a queue. Lifecycle: start() -> any number of
call()/subscribe() -> stop(). After stop() every open subscription receives LoopStopped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from engine.request import RequestOutput
from engine.stats import StepTiming

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerLoad:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_total_blocks: int


class LoopStopped(RuntimeError):
    """The engine loop stopped before the request finished."""


class RequestFailed(RuntimeError):
    """Delivered to a subscriber when its request fails outside the engine (e.g. a KV transfer)."""


Event = RequestOutput | BaseException


class EngineLoop:
    def __init__(
        self,
        engine: Any,
        name: str = "engine",
        on_step: Callable[[StepTiming], None] | None = None,
    ) -> None:
        """on_step, if given, is called on the engine thread after every step that ran."""
        self.engine = engine
        self._name = name
        self._on_step = on_step
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._subscribers: dict[str, queue.SimpleQueue[Event]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._load = self._read_load()

    # -- called from any thread -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            subscribers, self._subscribers = self._subscribers, {}
        for q in subscribers.values():
            q.put(LoopStopped("the worker is shutting down"))

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = 60.0, **kwargs: Any) -> Any:
        """Run fn(*args, **kwargs) on the engine thread between steps; return or raise its result."""
        if self._stopping.is_set():
            raise LoopStopped("the worker is shutting down")
        future: Future = Future()
        self._commands.put((lambda: fn(*args, **kwargs), future))
        self._wakeup.set()
        return future.result(timeout)

    def subscribe(self, request_id: str) -> queue.SimpleQueue[Event]:
        """Outputs of request_id arrive on the returned queue, ending with a finished output or an
        exception. Subscribe before the request is added so no output is missed."""
        q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        with self._lock:
            if request_id in self._subscribers:
                raise ValueError(f"request {request_id} is already running on this worker")
            self._subscribers[request_id] = q
        return q

    def unsubscribe(self, request_id: str) -> None:
        with self._lock:
            self._subscribers.pop(request_id, None)

    def fail(self, request_id: str, error: BaseException) -> None:
        """End request_id's subscription with an error (the engine state is the caller's to free)."""
        with self._lock:
            q = self._subscribers.pop(request_id, None)
        if q is not None:
            q.put(error)

    def load(self) -> WorkerLoad:
        return self._load

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            self._run_commands()
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as exc:  # a bug, not a request error: fail everyone, keep serving
                    log.exception("engine step failed")
                    self._fail_all(exc)
                    continue
                self._deliver(outputs)
                self._load = self._read_load()
                if self._on_step is not None and engine.last_step is not None:
                    self._on_step(engine.last_step)
            else:
                self._load = self._read_load()
                self._wakeup.wait(0.1)
                self._wakeup.clear()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001  handed to the caller
                future.set_exception(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            for out in outputs:
                q = self._subscribers.get(out.request_id)
                if q is None:
                    continue
                q.put(out)
                if out.finished:
                    del self._subscribers[out.request_id]

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            subscribers, self._subscribers = self._subscribers, {}
        for request_id, q in subscribers.items():
            q.put(RequestFailed(f"engine error: {exc}"))
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("request_id=%s: abort after engine error failed", request_id)

    def _read_load(self) -> WorkerLoad:
        e = self.engine
        return WorkerLoad(
            num_running=e.num_running,
            num_waiting=e.num_waiting,
            kv_usage=e.kv_usage,
            num_free_blocks=e.num_free_blocks,
            num_total_blocks=e.num_total_blocks,
        )
