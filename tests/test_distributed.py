"""Distributed pretraining (torchrun + DDP, gloo on CPU): key gathering, shuffle-BN across processes,
and a 2-process run against the 1-process run with the same global batch.

Run as a script (`python -m torch.distributed.run ... tests/test_distributed.py CLI-ARGS`) this file
is the CLI with every BatchNorm frozen in eval mode: see test_frozen_bn_two_processes_match_one_process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vclr import cli
from vclr.data.pretrain_dataset import rank_indices
from vclr.errors import VclrError
from vclr.models.vclr import single_process_unshuffle
from vclr.train.checkpoint import load_checkpoint
from vclr.train.distributed import (
    gather_keys,
    mean_across_ranks,
    shuffle_across_ranks,
    unshuffle_across_ranks,
)
from vclr.train.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pretrain import SETTINGS, _cli_args, _log, write_tiny_data

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _frozen_batchnorm_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """BatchNorm.train replacement: stay in eval mode (running statistics, mean 0 and var 1 at init)
    whatever train() is called with, so each video's embedding no longer depends on which other
    videos share its batch, hence not on how the global batch is split over processes."""
    return nn.Module.train(self, False)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_data(tmp_path_factory.mktemp("distributed_data"))


def _torchrun(target: list[str], cli_args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 TARGET CLI_ARGS`, importing this checkout's vclr (not an installed one)."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *target, *cli_args],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path})


def _gather_shuffle_worker(rank: int, port: int, world: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        local = 6
        # Row i of rank r: (100 r + i, r) -- an id and its owner.
        rows = lambda r: torch.stack([torch.arange(local) + 100.0 * r, torch.full((local,), float(r))], 1)
        x = rows(rank).requires_grad_()
        everything = torch.cat([rows(r) for r in range(world)])
        keys = gather_keys(x)
        assert torch.equal(keys, everything) and not keys.requires_grad  # rank order, no graph

        shuffled, permutation = shuffle_across_ranks(x.detach(), torch.Generator().manual_seed(7))
        # Rank 0 drew it from its generator and every rank got the same one.
        assert torch.equal(permutation, torch.randperm(world * local, generator=torch.Generator().manual_seed(7)))
        assert torch.equal(shuffled, everything[permutation[rank * local:(rank + 1) * local]])
        assert sorted(gather_keys(shuffled)[:, 0].tolist()) == sorted(everything[:, 0].tolist())
        assert set(shuffled[:, 1].tolist()) == set(range(world))  # each slice mixes both ranks' videos

        # Exact inverse, for outputs of another width (like backbone features of the images).
        outputs = torch.cat([shuffled * 2 + 1, shuffled.sum(1, keepdim=True)], 1)
        restored = unshuffle_across_ranks(outputs, permutation)
        assert torch.equal(restored, torch.cat([x.detach() * 2 + 1, x.detach().sum(1, keepdim=True)], 1))

        assert float(mean_across_ranks(torch.tensor(float(rank)))) == (world - 1) / 2
    finally:
        dist.destroy_process_group()


def test_gather_and_shuffle_across_two_processes():
    mp.spawn(_gather_shuffle_worker, args=(_free_port(), 2), nprocs=2, join=True)


def test_one_process_reduces_to_the_single_process_shuffle():
    x = torch.arange(10.0).unsqueeze(1)
    assert torch.equal(gather_keys(x), x) and torch.equal(mean_across_ranks(x), x)
    shuffled, permutation = shuffle_across_ranks(x, torch.Generator().manual_seed(4))
    assert torch.equal(permutation, torch.randperm(10, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(shuffled, x[permutation])
    assert torch.equal(unshuffle_across_ranks(shuffled, permutation), single_process_unshuffle(shuffled, permutation))
    assert torch.equal(unshuffle_across_ranks(shuffled, permutation), x)


def test_rank_indices_split_every_global_batch_contiguously():
    order = [9, 3, 7, 1, 0, 5, 8, 2, 6, 4]  # 10 videos, global batch 4: 2 batches, 2 videos dropped
    assert rank_indices(order, batch_size=4, world_size=2, rank=0) == [9, 3, 0, 5]
    assert rank_indices(order, batch_size=4, world_size=2, rank=1) == [7, 1, 8, 2]
    assert rank_indices(order, batch_size=4, world_size=2, rank=1, start_iteration=1) == [8, 2]
    assert rank_indices(order, batch_size=4, world_size=1, rank=0) == order[:8]
    with pytest.raises(VclrError, match="global batch 4 is not divisible by the 3 processes"):
        rank_indices(order, batch_size=4, world_size=3, rank=0)


def test_batch_not_divisible_by_the_processes_fails_before_anything(tiny_data, tmp_path, monkeypatch):
    index_csv, frames_dir = tiny_data
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(VclrError, match="batch_size 4 .* not divisible by the 3 processes"):
        pretrain({**SETTINGS, "epochs": 1}, index_csv, frames_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not dist.is_initialized()


def test_two_process_cli_run_with_shuffle_bn(tiny_data, tmp_path):
    """The real CLI (shuffle-BN across processes, a loss term off so DDP must allow unused heads).

    Only rank 0 writes: one log line per step (two writers would append twice), one report line,
    no stray temporary files. The frame queue received 3 chunks of the GLOBAL batch of 4 gathered
    keys (pointer 12, L2-normalised rows), the segment queue one (pointer 4).
    """
    index_csv, frames_dir = tiny_data
    out = tmp_path / "ddp"
    args = _cli_args(index_csv, frames_dir, out, 1, ("--workers", "0", "--max-steps", "1"))
    args[args.index("--losses") + 1] = "inter,intra,segment"
    result = _torchrun(["-m", "vclr"], args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint_last.pt", "log.jsonl"]
    assert result.stdout.count("stopped (resumable): 1 steps") == 1
    log = _log(out)
    assert [record["step"] for record in log] == [1] and set(log[0]) >= {"inter", "intra", "segment", "total"}
    state = load_checkpoint(out / "checkpoint_last.pt")
    assert state["step"] == 1 and state["config"]["batch_size"] == 4
    frame_queue, segment_queue = (state["vclr"][f"{name}.queue"] for name in ("frame_queue", "segment_queue"))
    assert int(state["vclr"]["frame_queue.pointer"]) == 12 and int(state["vclr"]["segment_queue.pointer"]) == 4
    assert torch.allclose(frame_queue[:12].norm(dim=1), torch.ones(12), atol=1e-5)
    assert torch.allclose(segment_queue[:4].norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(frame_queue[12:].norm(dim=1), torch.ones(4), atol=1e-2)  # still the initial rows


def test_frozen_bn_two_processes_match_one_process(tiny_data, tmp_path, monkeypatch):
    """2 processes x 2 videos vs 1 process x 4 videos, BatchNorm frozen, 1 epoch = 2 steps.

    Why they must agree (up to float rounding of different reductions, hence allclose):
    - samples: each video's sample is a function of (seed, epoch, video index), not of the process,
      and rank r loads the r-th half of every global batch, so gathering in rank order rebuilds the
      one-process batch row for row;
    - initial weights and queues: same seed on every process, and DDP copies rank 0's at wrapping;
    - keys: with BN frozen an embedding depends on its own video only, so shuffle-BN (whatever the
      permutation) and the 2/4 split change nothing; gathered in rank order, the queue rows equal
      the one-process rows (x1, x2, x3 chunks of the global batch, then the segment keys);
    - loss: each term is a mean over rows split equally between the processes, so the mean of the
      two per-process losses (what rank 0 logs) is the one-process loss, and DDP's averaged gradient
      is the one-process gradient: step 2 (new weights, momentum encoder, queue) agrees too.
    (With BN in train mode per-process batch statistics differ from the 4-video ones: no equality.)
    The 2-process run is stopped after step 1 and resumed by a second launch, so the comparison
    also covers every process resuming from rank 0's checkpoint.
    """
    index_csv, frames_dir = tiny_data
    one, two = tmp_path / "one", tmp_path / "two"
    script = [str(Path(__file__).resolve())]
    first = _torchrun(script, _cli_args(index_csv, frames_dir, two, 1, ("--workers", "0", "--max-steps", "1")))
    assert first.returncode == 0, first.stderr[-3000:]
    after_step_1 = load_checkpoint(two / "checkpoint_last.pt")
    second = _torchrun(script, _cli_args(index_csv, frames_dir, two, 1, ("--workers", "0")))
    assert second.returncode == 0, second.stderr[-3000:]

    monkeypatch.setattr(nn.modules.batchnorm._BatchNorm, "train", _frozen_batchnorm_train)
    pretrain({**SETTINGS, "epochs": 1, "workers": 0, "max_steps": 1}, index_csv, frames_dir, one)
    reference_step_1 = load_checkpoint(one / "checkpoint_last.pt")
    pretrain({**SETTINGS, "epochs": 1, "workers": 0}, index_csv, frames_dir, one)

    for name in ("frame_queue.queue", "segment_queue.queue"):  # the queues after step 1, row for row
        assert torch.allclose(after_step_1["vclr"][name], reference_step_1["vclr"][name], atol=1e-6), name
    expected, got = _log(one), _log(two)
    assert [record["step"] for record in got] == [record["step"] for record in expected] == [1, 2]
    for want, have in zip(expected, got):
        for term in ("inter", "intra", "segment", "order", "total", "lr"):
            assert have[term] == pytest.approx(want[term], rel=1e-5, abs=1e-6), (have["step"], term)
    final_one, final_two = load_checkpoint(one / "checkpoint_last.pt"), load_checkpoint(two / "checkpoint_last.pt")
    for name, value in final_one["vclr"].items():  # weights, momentum encoder, queues after step 2
        assert torch.allclose(final_two["vclr"][name].float(), value.float(), atol=1e-5), name
    a = torch.load(one / "backbone.pt", weights_only=True)
    b = torch.load(two / "backbone.pt", weights_only=True)
    assert all(torch.allclose(a[key].float(), b[key].float(), atol=1e-5) for key in a)


if __name__ == "__main__":  # launched by torchrun in test_frozen_bn_two_processes_match_one_process
    nn.modules.batchnorm._BatchNorm.train = _frozen_batchnorm_train
    sys.exit(cli.main(sys.argv[1:]))
