"""Long requests (compare, τ curve, export): a time budget checked between configurations, a stop when the
client has gone, and a gate that lets interactive requests use the shared model first.

The model is shared state (ALGM's configuration lives on it), so a long job holds the model's lock for one
configuration at a time and, between configurations, waits while an interactive request is running or
waiting: a τ release waits at most one configuration of a running comparison, never the whole of it.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["WorkStopped", "Budget", "PriorityGate", "client_gone"]


class WorkStopped(RuntimeError):
    """A long request stopped between configurations; the message says why and how far it got."""


class Budget:
    """At most ``seconds`` of wall time for one request, and a stop as soon as ``gone()`` says the client has
    left. :meth:`check` is called between configurations (``clock``: seconds, monotonic)."""

    def __init__(self, seconds: float, gone: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"a time budget must be positive, got {seconds}")
        self.seconds, self.gone, self.clock = seconds, gone, clock
        self.start = clock()

    def check(self, done: int, total: int) -> None:
        """Raise :class:`WorkStopped` if the client has gone or the budget is spent (``done`` of ``total``
        configurations finished so far)."""
        if self.gone():
            raise WorkStopped(f"stopped after {done} of {total} configurations: the client disconnected")
        spent = self.clock() - self.start
        if spent > self.seconds:
            raise WorkStopped(f"stopped after {done} of {total} configurations: this request's time budget of "
                              f"{self.seconds:g} s is spent ({spent:.0f} s); ask for fewer methods or values")


class PriorityGate:
    """Interactive requests first: each one runs inside :meth:`interactive`; a long job runs each of its
    steps inside :meth:`background`, which waits until no interactive request runs, then holds the model's lock."""

    def __init__(self) -> None:
        self._active = 0
        self._changed = threading.Condition()

    @contextmanager
    def interactive(self) -> Iterator[None]:
        with self._changed:
            self._active += 1
        try:
            yield
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()

    @contextmanager
    def background(self, lock: Any, check: Callable[[], None] = lambda: None, poll_s: float = 0.5) -> Iterator[None]:
        """Wait for a moment without interactive requests (calling ``check`` every ``poll_s`` seconds, so a
        budget or a disconnect still stops a waiting job), then hold ``lock``."""
        with self._changed:
            while self._active:
                check()
                self._changed.wait(poll_s)
        with lock:
            yield


def client_gone(blocks: Any, session_hash: str | None) -> Callable[[], bool]:
    """A callable that says whether the client of ``session_hash`` has left ``blocks``' queue (Gradio marks
    its running events not alive when the connection closes or the client cancels). Always False
    without a session (direct calls, tests)."""
    if not session_hash or blocks is None:
        return lambda: False

    def gone() -> bool:
        queue = getattr(blocks, "_queue", None)
        for jobs in getattr(queue, "active_jobs", None) or ():
            for job in jobs or ():
                if getattr(job, "session_hash", None) == session_hash and not getattr(job, "alive", True):
                    return True
        return False

    return gone
