"""Resumable pretraining checkpoints: the whole Vclr module (query model, momentum encoder, both
queues), the optimiser, the position in training and every RNG state the loop can touch.

Saved atomically (a crash while saving leaves the previous checkpoint intact) and loaded with
torch.load(weights_only=True): RNG states are stored as tensors and plain lists, never pickled objects.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vclr.errors import VclrError
from vclr.io_utils import atomic_open

CHECKPOINT_FORMAT = "vclr-pretrain-checkpoint/1"


def rng_states(generators: dict[str, torch.Generator] | None = None) -> dict:
    """python, numpy (legacy global), torch CPU, every CUDA device, and the loop's own generators."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: generator.get_state() for name, generator in (generators or {}).items()},
    }


def restore_rng_states(states: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for name, generator in (generators or {}).items():
        generator.set_state(states["generators"][name])


def save_checkpoint(path: str | os.PathLike, *, vclr: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    iteration: int, step: int, config: dict,
                    generators: dict[str, torch.Generator] | None = None) -> None:
    """Write the training state; (epoch, iteration) is the NEXT batch to consume, `step` the steps done."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "vclr": vclr.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "step": step,
        "config": config,
        "rng": rng_states(generators),
    }
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VclrError(f"{path}: checkpoint not found") from None
    except Exception as error:  # zip/pickle errors come in many types
        raise VclrError(f"{path}: not a readable checkpoint ({error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise VclrError(f"{path}: not a VCLR pretraining checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return state


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """VclrError naming a few missing / unexpected / reshaped keys if `state` is another architecture."""
    own = module.state_dict()
    problems = {
        "missing": [key for key in own if key not in state],
        "unexpected": [key for key in state if key not in own],
        "shape mismatch": [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
                           for key in own if key in state and state[key].shape != own[key].shape],
    }
    if any(problems.values()):
        details = "; ".join(f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                            for label, keys in problems.items() if keys)
        raise VclrError(f"{where}: checkpoint does not fit this model: {details}")


def restore_checkpoint(path: str | os.PathLike, state: dict, *, vclr: nn.Module,
                       optimizer: torch.optim.Optimizer,
                       generators: dict[str, torch.Generator] | None = None) -> None:
    """Load a checkpoint's tensors into the module and optimiser and restore every RNG state."""
    check_state_dict(vclr, state["vclr"], str(path))
    vclr.load_state_dict(state["vclr"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_states(state["rng"], generators)
