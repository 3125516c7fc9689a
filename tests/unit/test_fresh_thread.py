import asyncio
import threading

import pytest

from service.engine.fresh_thread import run_in_fresh_thread


def test_runs_in_a_thread_that_ends_and_returns_the_result():
    seen = {}

    def work(a, b):
        seen["thread"] = threading.current_thread()
        return a + b

    assert asyncio.run(run_in_fresh_thread(work, 2, 3)) == 5
    seen["thread"].join(timeout=5)
    assert seen["thread"] is not threading.main_thread()
    assert not seen["thread"].is_alive()  # its OpenMP pool went with it


def test_exceptions_reach_the_caller():
    def boom():
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        asyncio.run(run_in_fresh_thread(boom))
