"""The worker threads of a command's event loop: daemon threads, so abandoned work cannot
hold up the exit."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonThreads(ThreadPoolExecutor):
    """The event loop's default executor (``asyncio.to_thread``) for a command: each call runs
    in a daemon thread, at most ``max_workers`` at once.

    A thread cannot be stopped, only abandoned. A pool's threads are joined when the
    interpreter exits, so agent work blocked in one would hold up the exit after SIGINT or
    SIGTERM; a daemon thread does not, and the exit hooks (telemetry, tracing) run as on any
    exit. A subclass only because :meth:`asyncio.loop.set_default_executor` takes nothing else;
    it uses none of the pool's machinery.
    """

    def __init__(self, max_workers: int, name: str = "prowzi-worker") -> None:
        super().__init__(max_workers=max_workers)
        self._name = name
        self._slots = threading.BoundedSemaphore(max_workers)
        self._pending: set[Future[Any]] = set()
        self._threads: set[threading.Thread] = set()
        self._guard = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._guard:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending.add(future)

        def work() -> None:
            with self._slots:
                with self._guard:
                    self._pending.discard(future)
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)

        thread = threading.Thread(target=work, name=self._name, daemon=True)
        with self._guard:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
        thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._guard:
            self._closed = True
            pending, threads = list(self._pending), list(self._threads)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            for thread in threads:
                thread.join()
        super().shutdown(wait=False)
