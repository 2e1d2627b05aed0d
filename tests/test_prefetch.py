"""formats/prefetch.py: the streaming tools' worker threads give results in order, keep at most
their budget in flight, stop at an error, and restore torch's thread count."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from ellama_megatron.formats.prefetch import ordered_map, parallel_work


def test_results_come_in_order_from_several_threads():
    threads = set()

    def work(i):
        threads.add(threading.current_thread().name)
        time.sleep(random.Random(i).random() / 200)
        return i * i

    assert list(ordered_map(work, range(50), workers=3)) == [i * i for i in range(50)]
    assert len(threads) > 1


def test_items_in_flight_stay_within_the_count_and_the_byte_budget():
    lock = threading.Lock()
    started = 0
    most = 0

    def work(i):
        nonlocal started, most
        with lock:
            started += 1
        return i

    consumed = 0
    for _ in ordered_map(work, range(40), workers=4, cost=lambda i: 300, budget=1000):
        time.sleep(0.002)  # a slow writer: the workers run ahead as far as they may
        consumed += 1
        with lock:
            most = max(most, started - consumed)
    assert most <= 3  # 3 items of 300 bytes fit 1000
    assert list(ordered_map(lambda i: i, range(5), cost=lambda i: 10**9, budget=1)) == list(range(5))


def test_an_error_is_raised_at_its_item_and_stops_the_rest():
    done = []

    def work(i):
        if i == 3:
            raise ValueError("item 3")
        time.sleep(0.01)
        done.append(i)
        return i

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for r in ordered_map(work, range(100), workers=2, ahead=4):
            got.append(r)
    assert got == [0, 1, 2] and len(done) < 20


def test_parallel_work_restores_torch_threads():
    before = torch.get_num_threads()
    with parallel_work():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
