"""Multi-process pretraining under torchrun: process-group setup, key gathering and shuffle-BN
across processes.

With one process (no torchrun, or WORLD_SIZE=1) nothing is initialised and every function here
reduces to its one-process meaning: gather_keys is the identity, shuffle_across_ranks permutes the
local batch (as vclr.models.vclr.single_process_shuffle does, but from the given generator).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from vclr.errors import VclrError


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name)
        try:
            values[name] = default if text is None else int(text)
        except ValueError:
            raise VclrError(f"environment variable {name}={text!r} is not an integer") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise VclrError(f"environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} are inconsistent")
    return rank, world_size, local_rank


def init_distributed(use_cuda: bool) -> bool:
    """Join torchrun's process group (NCCL when `use_cuda`, else gloo); True if this call created it.

    No-op (False) when WORLD_SIZE is absent or 1, or when a group already exists. With CUDA the
    process is bound to GPU LOCAL_RANK.
    """
    _, world_size, local_rank = distributed_env()
    if world_size == 1 or dist.is_initialized():
        return False
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise VclrError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> a device; under torchrun the process's own GPU (LOCAL_RANK, set by
    init_distributed). VclrError when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise VclrError("device cuda requested but no CUDA device is available")
    if name == "cuda" and world_size() > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels (reproducible runs, slower), or cuDNN autotuning on GPUs."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"


@contextlib.contextmanager
def training_session(global_batch: int, device_name: str):
    """A training run's process setup: under torchrun the global batch must split evenly and the
    process joins the group (left again at the end); the process-global determinism and cuDNN
    switches the run sets (set_determinism) are given back as the caller had them."""
    processes = distributed_env()[1]
    if global_batch % processes:
        raise VclrError(f"batch_size {global_batch} (the global batch) is not divisible by the "
                        f"{processes} processes")
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    created_group = init_distributed(resolve_device(device_name).type == "cuda")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]
        if created_group:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (e.g. while rank 0 writes); no-op with one process."""
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def gather_keys(x: torch.Tensor) -> torch.Tensor:
    """All processes' `x` [n, ...] (equal n on every rank) concatenated in rank order; no gradient."""
    if world_size() == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


@torch.no_grad()
def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average of a tensor over processes (for logging the global loss); identity with one process."""
    if world_size() == 1:
        return x.detach()
    x = x.detach().float().clone()
    dist.all_reduce(x)
    return x / world_size()


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN input: permute the batch of ALL processes, return this rank's slice and the permutation.

    The permutation of the gathered batch (rank order) is drawn on rank 0 from `generator` (a CPU
    generator the training loop checkpoints) and broadcast, so every rank applies the same one.
    """
    count, position = world_size(), rank()
    everything = gather_keys(x)
    total = everything.shape[0]
    if position == 0:
        permutation = torch.randperm(total, generator=generator).to(x.device)
    else:
        permutation = torch.empty(total, dtype=torch.long, device=x.device)
    if count > 1:
        dist.broadcast(permutation, src=0)
    local = x.shape[0]
    return everything[permutation[position * local:(position + 1) * local]], permutation


@torch.no_grad()
def unshuffle_across_ranks(y: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Inverse of shuffle_across_ranks for outputs `y` [n, ...] of the shuffled slice: this rank's
    outputs in its original order."""
    everything = gather_keys(y)[torch.argsort(permutation)]
    local, position = y.shape[0], rank()
    return everything[position * local:(position + 1) * local]
