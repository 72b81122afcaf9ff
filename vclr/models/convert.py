"""`vclr eval convert`: the authors' released VCLR weights (`vclr_k400.pth`) -> our backbone.pt.

The layout, read from the authors' code (amazon-science/video-contrastive-learning: models/resnet_mlp.py,
utils/util.py save_checkpoint, train_vclr.py): the file is a dict with
  model       the query network, saved from its DistributedDataParallel wrapper: "module." + a
              torchvision-named ResNet-50 trunk (conv1, bn1, layer1..4; no fc) + the heads fc_inter,
              fc_intra, fc_order, fc_tsn (Linear-ReLU-Linear with --model_mlp: keys .0 and .2) +
              fc_order_classifier (Linear(6 * 128, 4));
  model_ema   the momentum network, same keys without "module." (it was never wrapped);
  contrast / contrast_tsn   the frame and segment queues ("memory" [131072, 128], "params");
  opt, optimizer, scheduler, epoch   (opt is an argparse.Namespace).
It is NOT the MoCo layout (module.encoder_q.*): that is the ImageNet initialisation, read by
vclr.models.backbones.load_moco_v2. Their heads map onto ours: fc_inter -> inter, fc_intra -> intra,
fc_order -> order, fc_tsn -> segment, fc_order_classifier -> order_classifier (the same
[query tuple, key tuple] input order). Every key must land somewhere: missing or unexpected keys are
a VclrError listing them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from vclr.errors import VclrError
from vclr.io_utils import atomic_open
from vclr.models.backbones import BACKBONES, build_backbone, copy_checked
from vclr.models.vclr import VclrModel

DDP_PREFIX = "module."
HEAD_NAMES = {"fc_inter": "inter", "fc_intra": "intra", "fc_order": "order", "fc_tsn": "segment"}
ORDER_CLASSIFIER = "fc_order_classifier"
QUEUES = {"contrast": "frame_queue", "contrast_tsn": "segment_queue"}
RELEASED_FORMAT = "vclr-released-model/1"


def read_released_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True, argparse.Namespace (their `opt`) allowed and nothing else."""
    path = Path(path)
    if not path.is_file():
        raise VclrError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors come in many types
        raise VclrError(f"{path}: not a readable PyTorch checkpoint with tensors only ({error})") from None
    if not isinstance(checkpoint, dict):
        raise VclrError(f"{path}: expected a dict holding 'model', got {type(checkpoint).__name__}")
    return checkpoint


def _tensor_dict(value: object, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not value or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise VclrError(f"{where}: expected a non-empty state dict of tensors")
    return value


def strip_ddp_prefix(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Drop "module." when every key has it (a DDP-wrapped save); a mix of both is an error."""
    prefixed = [key for key in state if key.startswith(DDP_PREFIX)]
    if not prefixed:
        return dict(state)
    if len(prefixed) != len(state):
        bare = [key for key in state if not key.startswith(DDP_PREFIX)]
        raise VclrError(f"{where}: keys with and without '{DDP_PREFIX}': {', '.join(bare[:4])}"
                        f"{', ...' if len(bare) > 4 else ''}")
    return {key[len(DDP_PREFIX):]: value for key, value in state.items()}


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}


def convert_network(state: dict[str, torch.Tensor], backbone_name: str, where: str) -> tuple[nn.Module, VclrModel | None]:
    """(trunk, VclrModel or None) from one of their networks' state dicts ("module." or not).

    Without any fc_* key the state is a bare trunk (None for the model); with one, all four MLP
    heads and the order classifier must be there.
    """
    state = strip_ddp_prefix(_tensor_dict(state, where), where)
    head_prefixes = (*HEAD_NAMES, ORDER_CLASSIFIER)
    trunk = {key: value for key, value in state.items() if key.split(".", 1)[0] not in head_prefixes}
    backbone, feature_dim = build_backbone(backbone_name)
    copy_checked(backbone, trunk, f"{where} (trunk -> {backbone_name})")
    if len(trunk) == len(state):
        return backbone, None
    missing = [f"{name}.{suffix}" for name in HEAD_NAMES for suffix in ("0.weight", "0.bias", "2.weight", "2.bias")
               if f"{name}.{suffix}" not in state]
    missing += [f"{ORDER_CLASSIFIER}.{suffix}" for suffix in ("weight", "bias")
                if f"{ORDER_CLASSIFIER}.{suffix}" not in state]
    if missing:
        raise VclrError(f"{where}: heads incomplete (the MLP heads of --model_mlp are expected); missing "
                        f"({len(missing)}): {', '.join(missing)}")
    embed_dim = state["fc_inter.2.weight"].shape[0]
    classifier_in = state[f"{ORDER_CLASSIFIER}.weight"].shape[1]
    if classifier_in % (2 * embed_dim):
        raise VclrError(f"{where}: {ORDER_CLASSIFIER}.weight takes {classifier_in} inputs, not a multiple of "
                        f"2 x {embed_dim}")
    model = VclrModel(backbone, feature_dim, num_segments=classifier_in // (2 * embed_dim), embed_dim=embed_dim)
    for theirs, ours in HEAD_NAMES.items():
        copy_checked(model.heads[ours], _part(state, theirs), f"{where} ({theirs} -> head {ours!r})")
    copy_checked(model.order_classifier, _part(state, ORDER_CLASSIFIER), f"{where} ({ORDER_CLASSIFIER})")
    return backbone, model


def convert_released(checkpoint: dict, backbone_name: str = "resnet50", where: str = "checkpoint",
                     encoder: str = "query") -> dict:
    """Map a released checkpoint (read_released_checkpoint) onto our modules.

    Returns {"backbone": trunk state dict of `encoder` (query = `model`, the one every downstream
    protocol uses; momentum = `model_ema`), "model": VclrModel state dict or None, "momentum": the
    same for model_ema or None, "frame_queue"/"segment_queue": [size, dim] or None}.
    A dict without `model` is taken as a bare state dict of the query network.
    """
    if encoder not in ("query", "momentum"):
        raise VclrError(f"encoder must be 'query' or 'momentum', got {encoder!r}")
    if "model" not in checkpoint:
        if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            checkpoint = {"model": checkpoint}
        else:
            raise VclrError(f"{where}: no 'model' entry (top-level keys: {', '.join(map(str, list(checkpoint)[:8]))})"
                            f"; not a released VCLR checkpoint")
    query_trunk, query_model = convert_network(checkpoint["model"], backbone_name, f"{where} ['model']")
    momentum_trunk = momentum_model = None
    if checkpoint.get("model_ema") is not None:
        momentum_trunk, momentum_model = convert_network(checkpoint["model_ema"], backbone_name,
                                                         f"{where} ['model_ema']")
    if encoder == "momentum" and momentum_trunk is None:
        raise VclrError(f"{where}: no 'model_ema' entry, so no momentum encoder to convert")
    result = {
        "backbone": (query_trunk if encoder == "query" else momentum_trunk).state_dict(),
        "model": query_model.state_dict() if query_model is not None else None,
        "momentum": momentum_model.state_dict() if momentum_model is not None else None,
    }
    for theirs, ours in QUEUES.items():
        entry = checkpoint.get(theirs)
        memory = entry.get("memory") if isinstance(entry, dict) else None
        if memory is not None and (not isinstance(memory, torch.Tensor) or memory.ndim != 2):
            raise VclrError(f"{where} ['{theirs}']['memory']: expected a [size, dim] tensor")
        result[ours] = memory
    return result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="the authors' release, e.g. vclr_k400.pth")
    parser.add_argument("--out", required=True, type=Path,
                        help="backbone.pt to write (the format of pretraining's backbone.pt)")
    parser.add_argument("--backbone", default="resnet50", choices=BACKBONES)
    parser.add_argument("--encoder", default="query", choices=("query", "momentum"),
                        help="which network's trunk goes into --out (protocols use the query encoder)")
    parser.add_argument("--model-out", type=Path,
                        help="also write the heads, momentum network and queues here (format "
                             f"{RELEASED_FORMAT}: VclrModel state dicts)")


def main(args: argparse.Namespace) -> int:
    converted = convert_released(read_released_checkpoint(args.checkpoint), args.backbone,
                                 str(args.checkpoint), args.encoder)
    if args.model_out is not None and converted["model"] is None:
        raise VclrError(f"{args.checkpoint}: no heads in 'model', nothing for --model-out")
    with atomic_open(args.out, "wb") as handle:
        torch.save(converted["backbone"], handle)
    if args.model_out is not None:
        with atomic_open(args.model_out, "wb") as handle:
            torch.save({"format": RELEASED_FORMAT, "source": str(args.checkpoint.resolve()),
                        **{key: value for key, value in converted.items() if key != "backbone"}}, handle)
    present = [name for name in ("model", "momentum", "frame_queue", "segment_queue") if converted[name] is not None]
    print(f"{args.checkpoint}: {args.encoder} trunk ({len(converted['backbone'])} tensors) -> {args.out}"
          f"; also present: {', '.join(present) or 'nothing else'}"
          + (f" -> {args.model_out}" if args.model_out else ""))
    return 0
