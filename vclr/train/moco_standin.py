"""A MoCo v2-layout stand-in for the paper's ImageNet initialisation, for profiles without it (tiny).

The paper starts VCLR from ImageNet MoCo v2 weights (`moco_v2_200ep_pretrain.pth.tar`, a ResNet-50).
The `tiny` profile has neither the network nor ImageNet nor a ResNet-50, so its initialisation
ablation (MoCo v2 vs random) needs a stand-in of the same kind: instance discrimination alone - the
L_inter term of the pretraining loop, which is MoCo v2's objective (InfoNCE against a queue, momentum
key encoder, MLP head, the same augmentation chain; the positive is another frame of the video
rather than another crop of an image) - trained on the profile's own pretraining videos and written
in MoCo v2's checkpoint layout (`state_dict` with `module.encoder_q.<trunk key>` and the MLP as
`module.encoder_q.fc.0/fc.2`). A run with `init: moco_v2` then loads it through the same code as the
real file (vclr.models.backbones.load_moco_v2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from vclr.errors import VclrError
from vclr.io_utils import atomic_open
from vclr.models.backbones import MOCO_MLP_KEYS, MOCO_TRUNK_PREFIX
from vclr.train import pretrain as pretraining
from vclr.train.checkpoint import load_checkpoint

TRUNK, HEAD = "model.backbone.", "model.heads.inter."  # the query encoder's parts in a VCLR checkpoint


def moco_v2_state(vclr_state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A VCLR training state (vclr.train.checkpoint, key `vclr`) -> MoCo v2's `state_dict`: the
    query trunk and the inter head (Linear, ReLU, Linear = MoCo v2's MLP)."""
    trunk = {key[len(TRUNK):]: value for key, value in vclr_state.items() if key.startswith(TRUNK)}
    head = {key[len(HEAD):]: value for key, value in vclr_state.items() if key.startswith(HEAD)}
    if not trunk or sorted(head) != sorted(MOCO_MLP_KEYS):
        raise VclrError(f"{where}: expected '{TRUNK}*' and the head '{HEAD}{{{', '.join(MOCO_MLP_KEYS)}}}' "
                        f"(a VCLR pretraining checkpoint); found {len(trunk)} trunk and {sorted(head)} head keys")
    state = {MOCO_TRUNK_PREFIX + key: value.clone() for key, value in trunk.items()}
    state.update({MOCO_TRUNK_PREFIX + MOCO_MLP_KEYS[key]: value.clone() for key, value in head.items()})
    return state


def export_moco_v2(checkpoint: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write `checkpoint` (a finished or stopped VCLR pretraining checkpoint) as a MoCo v2 file;
    returns what it wrote besides the weights."""
    state = load_checkpoint(checkpoint)
    settings = state["config"]
    info = {"arch": settings["backbone"], "epoch": state["epoch"], "standin": {
        "objective": "instance discrimination (VCLR L_inter only)", "steps": state["step"],
        "settings": settings}}
    with atomic_open(Path(out), "wb") as handle:
        torch.save({**info, "state_dict": moco_v2_state(state["vclr"], str(checkpoint))}, handle)
    return info


def configure_parser(parser: argparse.ArgumentParser) -> None:
    pretraining.configure_parser(parser)
    parser.set_defaults(losses="inter")
    parser.add_argument("--weights", required=True, type=Path,
                        help="the MoCo v2-layout file to write (e.g. .../moco_v2_200ep_pretrain.pth.tar); "
                             "--out keeps the training run (resumable)")


def main(args: argparse.Namespace) -> int:
    if [term.strip() for term in args.losses.split(",")] != ["inter"]:
        raise VclrError(f"--losses: the MoCo v2 stand-in trains instance discrimination only ('inter'), "
                        f"got {args.losses!r}")
    if args.init != "random":
        raise VclrError(f"--init: the MoCo v2 stand-in starts from a random init, got {args.init!r}")
    status = pretraining.main(args)
    if status or not (args.out / "backbone.pt").is_file():  # stopped early (--max-steps): nothing to export
        return status
    info = export_moco_v2(args.out / "checkpoint_last.pt", args.weights)
    print(f"MoCo v2-layout stand-in ({info['arch']}, {info['standin']['steps']} steps): {args.weights}")
    return 0
