"""Where branch code runs: a lean thread pool, process pools, and the worker-side entry.

``rb.map`` runs branches on threads by default. For tiny branches the cost of
``concurrent.futures`` itself (a ``Future`` with its ``Condition`` per task,
a semaphore per submit) was the largest single cost of a durable fan-out, so
the default pool here is a plain queue with worker threads: the fan-out
driver needs no per-task future (every branch reports through the driver's
queue). Any ``concurrent.futures.Executor`` can still be passed in.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from .context import StepContext, bind, unbind


class ThreadWorkers:
    """Up to ``size`` threads running submitted calls in order; one pool per fan-out.

    Calls must not raise (the fan-out's branch runner catches everything).
    Threads are daemons: a branch left running when the program exits is
    abandoned like a killed process, and its claim is found interrupted.
    """

    def __init__(self, size: int, name: str = "nbrunbook-branch") -> None:
        self.size = max(1, size)
        self.name = name
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; starts another thread while fewer than ``size`` run."""
        self._q.put((fn, args))
        if len(self._threads) < self.size:
            t = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the threads after the calls already queued (join them if ``wait``)."""
        for _ in self._threads:
            self._q.put(None)
        if wait:
            for t in self._threads:
                t.join()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args = item
            fn(*args)


def default_threads(n: int, max_workers: int | None) -> int:
    """Threads for ``n`` branches: ``max_workers``, else the stdlib default, never more than ``n``."""
    return max(1, min(max_workers or min(32, (os.cpu_count() or 1) + 4), n))


def process_pool(n: int, max_workers: int | None) -> Executor:
    """A process pool for ``n`` branches, started with forkserver (or spawn): never a
    plain fork of this multi-threaded process (store writer, kernel threads)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    workers = max(1, min(max_workers or os.cpu_count() or 1, n))
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def runs_in_process(executor: object) -> bool:
    """True if branch code run by ``executor`` shares this process (threads)."""
    return isinstance(executor, (ThreadWorkers, ThreadPoolExecutor))


def ship(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What a process worker receives: cloudpickle's by-value form when it is installed,
    so functions defined in a notebook (``__main__``) reach the worker too."""
    try:
        import cloudpickle
    except ImportError:
        return (fn, args, kwargs)
    data: bytes = cloudpickle.dumps((fn, args, kwargs))
    return data


def call_in_worker(work: Any, snapshot: dict[str, Any]) -> Any:
    """Entry point in a worker process: bind the branch's (store-less) context, run it."""
    if isinstance(work, bytes):
        import pickle

        work = pickle.loads(work)  # made by ship() in the parent process
    fn, args, kwargs = work
    token = bind(StepContext(**snapshot))
    try:
        return fn(*args, **kwargs)
    finally:
        unbind(token)
