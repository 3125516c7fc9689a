"""Run blocking torch work in a thread that ends with it.

Why not `asyncio.to_thread`: its executor threads live on, and each thread that ran a parallel torch
op keeps its own OpenMP (libgomp) thread pool. Once libgomp manages more threads than there are
CPUs it throttles every pool's spin-wait, so the engine worker's many small kernels each wait for a
futex wake: measured here, one loaded-then-idle executor pool cut the native engine's single-stream
decode from 30 to 22 tok/s on 2 cores (bench/omp_pools.py). A thread that exits frees its pool.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


async def run_in_fresh_thread(fn: Callable[..., T], *args, name: str = "frontier-oneshot") -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result, exc) -> None:
        if done.cancelled():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def target() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine, never lost in the thread
            result, exc = None, e
        loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await asyncio.shield(done)
