"""The detector prepares the next batch while the model runs the current one: order kept, errors raised, and
never more than two prepared batches at a time; a batch of consecutive slices is read without a copy."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lungsight.inference.detector import _prefetched


def test_batches_come_in_order_and_at_most_two_are_prepared_ahead():
    prepared, in_use = [], []
    lock = threading.Lock()

    def prepare(chunk: int) -> int:
        with lock:
            prepared.append(chunk)
            assert len(prepared) - len(in_use) <= 2
        time.sleep(0.01)
        return chunk * 10

    out = []
    for chunk, value in _prefetched(prepare, list(range(7))):
        with lock:
            in_use.append(chunk)
        out.append((chunk, value))
        time.sleep(0.005)
    assert out == [(k, 10 * k) for k in range(7)]


def test_an_error_while_preparing_reaches_the_caller():
    def prepare(chunk: int) -> int:
        if chunk == 2:
            raise ValueError("bad slice")
        return chunk

    with pytest.raises(ValueError, match="bad slice"):
        list(_prefetched(prepare, [0, 1, 2, 3]))
    assert list(_prefetched(prepare, [5])) == [(5, 5)]
    assert list(_prefetched(prepare, [])) == []


def test_without_a_spare_core_the_batches_are_prepared_in_turn():
    threads = []

    def prepare(chunk: int) -> int:
        threads.append(threading.current_thread().name)
        return chunk

    assert list(_prefetched(prepare, [0, 1, 2], ahead=False)) == [(0, 0), (1, 1), (2, 2)]
    assert set(threads) == {threading.current_thread().name}
    threads.clear()
    list(_prefetched(prepare, [0, 1, 2]))
    assert all(name.startswith("lungsight-prep") for name in threads)


def test_the_time_spent_waiting_for_prepared_batches_is_added_up():
    """What ``predict`` reports as ``prepare``: the caller's waits for each batch, not the time it spends on them."""
    from lungsight.inference.detector import _Waited

    def prepare(chunk: int) -> int:
        time.sleep(0.02)
        return chunk

    for ahead in (False, True):
        waited = _Waited(_prefetched(prepare, [0, 1, 2], ahead=ahead))
        used = 0.0
        for chunk, value in waited:
            assert chunk == value
            t = time.perf_counter()
            time.sleep(0.03)  # the caller's own work on the batch is not waiting
            used += time.perf_counter() - t
        assert len(list(waited)) == 0  # exhausted
        if ahead:  # the first batch is waited for whole; the next ones were prepared during the caller's work
            assert 0.02 <= waited.seconds < used
        else:  # every batch is prepared in turn, in the caller's thread
            assert waited.seconds >= 0.06


def test_spare_core_compares_torch_threads_with_the_usable_cores(monkeypatch):
    import torch

    from lungsight import cores

    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cores.usable_cores() == 2 and not cores.spare_core()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cores.spare_core()


def test_a_run_of_consecutive_slices_is_taken_as_a_view_and_any_other_list_as_a_copy():
    from lungsight.inference.detector import _rows

    pixels = np.arange(60, dtype=np.float32).reshape(10, 2, 3)
    run = _rows(pixels, [3, 4, 5])
    assert np.shares_memory(run, pixels) and np.array_equal(run, pixels[[3, 4, 5]])
    for idx in ([3, 5, 6], [5, 4, 3], [2, 2, 3], [7]):
        np.testing.assert_array_equal(_rows(pixels, idx), pixels[idx])
