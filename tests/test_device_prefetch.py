"""DevicePrefetcher: batches prepared ahead in a thread, in order, errors re-raised, clean early exit."""

from __future__ import annotations

import threading

import pytest
import torch

from vclr.data.device_prefetch import DevicePrefetcher
from vclr.errors import VclrError

CPU = torch.device("cpu")


def _double(batch: dict) -> dict:
    return {"x": batch["x"] * 2, "nested": [batch["x"] + 1]}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_yields_every_prepared_batch_in_order(depth):
    batches = [{"x": torch.full((2,), float(i))} for i in range(7)]
    with DevicePrefetcher(batches, _double, CPU, depth=depth) as prefetcher:
        assert len(prefetcher) == 7
        got = list(prefetcher)
    assert [float(item["x"][0]) for item in got] == [2.0 * i for i in range(7)]
    assert [float(item["nested"][0][0]) for item in got] == [i + 1.0 for i in range(7)]


def test_the_next_batch_is_prepared_while_the_current_one_is_used():
    """Batch 1's preparation must run while the consumer still holds batch 0 (no timing involved:
    without overlap the consumer would wait for an event nobody sets)."""
    second_prepared = threading.Event()

    def prepare(batch: int) -> int:
        if batch == 1:
            second_prepared.set()
        return batch

    with DevicePrefetcher(range(3), prepare, CPU, depth=1) as prefetcher:
        for batch in prefetcher:
            if batch == 0:
                assert second_prepared.wait(timeout=30), "batch 1 was not prepared during step 0"
    with DevicePrefetcher(range(3), prepare, CPU, depth=0) as prefetcher:
        second_prepared.clear()
        for batch in prefetcher:
            if batch == 0:
                assert not second_prepared.is_set()  # depth 0: prepared on demand, in this thread


@pytest.mark.parametrize("where", ["prepare", "loader"])
def test_an_error_reaches_the_consumer_at_its_batch(where):
    def batches():
        for i in range(5):
            if where == "loader" and i == 2:
                raise VclrError("shard.vpk: video 'v2' is truncated")
            yield i

    def prepare(batch: int) -> int:
        if where == "prepare" and batch == 2:
            raise VclrError("manifest.json: video 'v2': a frame decodes to (40, 48)")
        return batch

    seen = []
    with DevicePrefetcher(batches(), prepare, CPU, depth=2) as prefetcher, pytest.raises(VclrError, match="'v2'"):
        seen.extend(prefetcher)
    assert seen == [0, 1]


def test_leaving_early_stops_the_thread_and_releases_the_source():
    released = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:  # what a DataLoader iterator does when released: shut its workers down
            released.set()

    prefetcher = DevicePrefetcher(endless(), lambda batch: batch, CPU, depth=2)
    for batch in prefetcher:
        if batch == 3:
            break
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    assert released.wait(timeout=30)
    with pytest.raises(ValueError, match="depth"):
        DevicePrefetcher([], _double, CPU, depth=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_are_prepared_on_a_side_stream_and_safe_to_use():
    device = torch.device("cuda")
    main_stream = torch.cuda.current_stream(device)
    streams = []

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        streams.append(torch.cuda.current_stream(device))
        return (batch.to(device, non_blocking=True).float() * 2).sum(dim=1)

    batches = [torch.arange(i, i + 4096 * 64, dtype=torch.int64).reshape(64, 4096).pin_memory() for i in range(6)]
    with DevicePrefetcher(batches, prepare, device, depth=2) as prefetcher:
        got = [value.cpu() for value in prefetcher]
    assert all(stream != main_stream for stream in streams)
    for batch, value in zip(batches, got):
        assert torch.equal(value, (batch.float() * 2).sum(dim=1))
