"""Overlap of batch preparation with the training step.

`DevicePrefetcher` runs `prepare(batch)` (move to the device, or JPEG decode + the batched augmentation
chain) for the next batches in a background thread while the caller trains on the current one. On CUDA
the thread issues its work on a side stream, so decoding and augmenting batch n+1 runs on the GPU
beside step n instead of between steps; the consumer's stream waits on an event recorded after the
preparation and the batch's tensors are marked as used by that stream (so the caching allocator does
not hand their memory back to the side stream too early). On the CPU the thread's tensor ops release
the GIL, so reading and decoding overlap the step's Python and kernels (both share the cores).

Nothing random happens in `prepare` (every augmentation parameter is drawn with the sample, a pure
function of seed, epoch and index), so the batches are the same with or without prefetching, in the
same order; a run may be resumed with another depth.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Self

import torch

_END = object()


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class DevicePrefetcher:
    """Iterate over `prepare(batch)` for each batch of `batches`, `depth` batches prepared ahead.

    depth 0 prepares each batch in the caller's thread when it is asked for (no overlap). An exception
    raised while reading or preparing is raised again by the iteration, at the batch it concerns.
    Use as a context manager (or call close()) so a loop left early stops the thread and releases the
    loader (its worker processes) before the next one starts.
    """

    def __init__(self, batches: Iterable, prepare: Callable, device: torch.device, depth: int = 1):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.batches, self.prepare, self.device, self.depth = batches, prepare, torch.device(device), depth
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        if self.depth == 0:
            yield from (self.prepare(batch) for batch in self.batches)
            return
        if self._thread is not None:
            raise RuntimeError("a DevicePrefetcher is iterated once")
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, name="vclr-prefetch", daemon=True)
        self._thread.start()
        consumer = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while True:
            item = self._queue.get()
            if item is _END:
                return
            kind, value, ready = item
            if kind == "error":
                raise value
            if consumer is not None:
                consumer.wait_event(ready)
                for tensor in _tensors(value):
                    if tensor.device.type == "cuda":
                        tensor.record_stream(consumer)
            yield value

    def _put(self, item) -> bool:
        """Queue an item unless the consumer has closed; False when it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        stream = iterator = None
        try:
            if self.device.type == "cuda":
                if self.device.index is not None:  # a new thread starts on cuda:0 (DDP ranks use others)
                    torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device)
            iterator = iter(self.batches)
            for batch in iterator:
                if self._stop.is_set():
                    return
                ready = None
                if stream is None:
                    prepared = self.prepare(batch)
                else:
                    with torch.cuda.stream(stream):
                        prepared = self.prepare(batch)
                        ready = torch.cuda.Event()
                        ready.record(stream)
                if not self._put(("batch", prepared, ready)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(("error", error, None))
            return
        finally:  # release the source now: a DataLoader iterator shuts its workers down, a generator closes
            getattr(iterator, "close", lambda: None)()
            del iterator
        self._put(_END)

    def close(self) -> None:
        """Stop the thread (a loop may leave early) and wait for it."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting for room
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
