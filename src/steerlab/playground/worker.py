"""One thread that owns the model: jobs run one at a time, in the order they were submitted.

Every job enters and leaves its own hooks; after each job, before its request completes, the worker
checks that the model carries exactly the hooks it had at the start, so an intervention can never
outlive its request. The model must not be used outside the worker while it serves.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


class HookLeakError(RuntimeError):
    """A job left hooks on the model (a bug: hooks are context managers that always exit)."""


def hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks registered on every submodule of `model`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class ModelWorker:
    """A FIFO queue of jobs executed on one thread, the only one that runs the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.baseline_hooks = hook_count(model)
        self.failure: HookLeakError | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="steerlab-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._jobs.qsize()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue `fn(*args, **kwargs)`; the future holds its result or exception."""
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            if self.failure is not None:
                future.set_exception(self.failure)
                continue
            error: BaseException | None = None
            try:
                result = fn(*args, **kwargs)
            except BaseException as raised:  # noqa: BLE001 - handed to the waiting request
                error = raised
            leaked = hook_count(self.model) - self.baseline_hooks
            if leaked:  # checked before the request completes, so it never sees a leaked hook's output
                log.error("a job left %d hooks on the model; no further job will run", leaked)
                self.failure = HookLeakError(f"a job left {leaked} hooks on the model; restart the server")
                error = self.failure
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
