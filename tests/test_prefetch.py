"""The detector prepares the next batch while the model runs the current one: order kept, errors raised, and
never more than two prepared batches at a time."""

from __future__ import annotations

import threading
import time

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
