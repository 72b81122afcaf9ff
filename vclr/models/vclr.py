"""The VCLR model: query encoder, momentum (key) encoder, two key queues and one step's logits.

spec/method.md is the reference. Which encoder computes what:
  query encoder  : xq (inter, intra heads) and the query tuple (order head per frame; segment head on
                   the mean of the K backbone features);
  momentum encoder (no grad, shuffle-BN): x1, x2, x3 (inter, intra heads) and the key tuple (order
                   head per frame; segment head on the mean of the K backbone features).
The logits returned are raw cosine similarities; the temperature is applied in vclr.train.losses.

A "frame" below is one segment sample: a frame [3,H,W] for a 2D backbone, a clip [3,T,H,W] for a 3D
one (vclr.models.video3d). Nothing here depends on which: samples are only stacked along leading
dimensions, the backbone maps [N, *sample] to [N, D].
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vclr.errors import VclrError

HEADS = ("inter", "intra", "order", "segment")
ORDER_CLASSES = 4
# Names of the batch entries (what the dataset's collate produces).
BATCH_KEYS = ("xq", "x1", "x2", "x3", "query_tuple", "key_tuple", "order_label")

ShuffleFn = Callable[[torch.Tensor], tuple[torch.Tensor, object]]
UnshuffleFn = Callable[[torch.Tensor, object], torch.Tensor]


def projection_head(in_dim: int, out_dim: int = 128) -> nn.Sequential:
    """MoCo v2's MLP: Linear(D, D) -> ReLU -> Linear(D, out_dim) (indices 0 and 2 match MoCo's fc)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class VclrModel(nn.Module):
    """Backbone + the four L2-normalised projection heads + the order classifier."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_segments: int = 3, embed_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({name: projection_head(feature_dim, embed_dim) for name in HEADS})
        self.order_classifier = nn.Linear(2 * num_segments * embed_dim, ORDER_CLASSES)
        self.num_segments = num_segments
        self.embed_dim = embed_dim

    def embed(self, head: str, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection of backbone features [..., D] -> [..., embed_dim]."""
        return F.normalize(self.heads[head](features), dim=-1)

    def encode(self, frames: torch.Tensor, tuples: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embeddings of `frames` [F, B, 3, H, W] and `tuples` [B, K, 3, H, W] in ONE backbone pass
        (clips: [F, B, 3, T, H, W] and [B, K, 3, T, H, W]).

        Returns frame embeddings `inter`, `intra` [F, B, E]; tuple `order` [B, K, E]; `segment`
        [B, E] (the segment head on the mean of the K backbone features).
        """
        count, batch = frames.shape[:2]
        if tuples.shape[1] != self.num_segments:
            raise VclrError(f"tuple has {tuples.shape[1]} frames; the model was built for {self.num_segments} segments")
        images = torch.cat([frames.flatten(0, 1), tuples.flatten(0, 1)])
        features = self.backbone(images)
        frame_features = features[: count * batch].unflatten(0, (count, batch))
        tuple_features = features[count * batch:].unflatten(0, (batch, self.num_segments))
        return {
            "inter": self.embed("inter", frame_features),
            "intra": self.embed("intra", frame_features),
            "order": self.embed("order", tuple_features),
            "segment": self.embed("segment", tuple_features.mean(dim=1)),
        }


class MomentumEncoder(nn.Module):
    """A gradient-free copy of a VclrModel, moved towards it by `update` after every step.

    In training mode everything is in eval mode except BatchNorm layers (train mode: keys are
    normalised with batch statistics, as in MoCo). `eval()` puts every layer in eval mode.
    """

    def __init__(self, model: VclrModel):
        super().__init__()
        self.encoder = copy.deepcopy(model)
        self.encoder.requires_grad_(False)
        self.train(model.training)

    def train(self, mode: bool = True) -> "MomentumEncoder":
        self.training = mode
        self.encoder.eval()
        if mode:
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module, alpha: float = 0.999) -> None:
        """k = alpha * k + (1 - alpha) * q for parameters; buffers (BN statistics) copied from q."""
        model = getattr(model, "module", model)  # accept a DDP-wrapped model
        for key, query in zip(self.encoder.parameters(), model.parameters(), strict=True):
            key.mul_(alpha).add_(query.detach(), alpha=1.0 - alpha)
        for key, query in zip(self.encoder.buffers(), model.buffers(), strict=True):
            key.copy_(query)

    def forward(self, frames: torch.Tensor, tuples: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encoder.encode(frames, tuples)


class FeatureQueue(nn.Module):
    """FIFO queue of key embeddings (negatives); buffers, so it is saved in the state_dict."""

    def __init__(self, size: int, dim: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        if size <= 0:
            raise VclrError(f"queue size must be positive, got {size}")
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("queue", torch.rand(size, dim, generator=generator) * (2 * bound) - bound)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest len(keys) entries; len(keys) must divide the queue size."""
        size, count = self.queue.shape[0], keys.shape[0]
        if count == 0 or size % count:
            raise VclrError(f"queue size {size} is not a multiple of the key batch {count}")
        start = int(self.pointer)
        self.queue[start:start + count] = keys.detach().to(self.queue.dtype)
        self.pointer.fill_((start + count) % size)


def single_process_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN on one process: permute the batch; the permutation is the state to undo it."""
    permutation = torch.randperm(x.shape[0], device=x.device)
    return x[permutation], permutation


def single_process_unshuffle(y: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    return y[torch.argsort(permutation)]


class Vclr(nn.Module):
    """Query model + momentum encoder + frame queue + segment queue (all in one state_dict).

    `train()`/`eval()` reach MomentumEncoder.train, which keeps its non-BN layers in eval mode.
    """

    def __init__(self, model: VclrModel, queue_size: int = 131072, segment_queue_size: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.model = model
        self.momentum = MomentumEncoder(model)
        self.frame_queue = FeatureQueue(queue_size, model.embed_dim, generator)
        self.segment_queue = FeatureQueue(segment_queue_size or queue_size, model.embed_dim, generator)

    def forward(self, batch: Mapping[str, torch.Tensor], shuffle_fn: ShuffleFn = single_process_shuffle,
                unshuffle_fn: UnshuffleFn = single_process_unshuffle) -> dict[str, torch.Tensor]:
        return self.step_outputs(batch, shuffle_fn, unshuffle_fn)

    def step_outputs(self, batch: Mapping[str, torch.Tensor], shuffle_fn: ShuffleFn = single_process_shuffle,
                     unshuffle_fn: UnshuffleFn = single_process_unshuffle) -> dict[str, torch.Tensor]:
        """Logits and targets of the four losses, and the keys to enqueue after the step.

        batch: xq, x1, x2, x3 [B,3,H,W]; query_tuple, key_tuple [B,K,3,H,W]; order_label [B]
        (3D backbones: clips [B,3,T,H,W] and [B,K,3,T,H,W]).
        shuffle_fn(x) -> (x permuted across the batch [or all processes], state);
        unshuffle_fn(y, state) -> y in the original order. Defaults: one-process permutation.
        """
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise VclrError(f"batch lacks {', '.join(missing)} (expected {', '.join(BATCH_KEYS)})")
        xq, query_tuple, key_tuple = batch["xq"], batch["query_tuple"], batch["key_tuple"]
        batch_size = xq.shape[0]
        query = self.model.encode(xq.unsqueeze(0), query_tuple)

        with torch.no_grad():
            key_frames = torch.stack([batch["x1"], batch["x2"], batch["x3"]])  # [3, B, 3, H, W]
            images = torch.cat([key_frames.flatten(0, 1), key_tuple.flatten(0, 1)])
            shuffled, state = shuffle_fn(images)
            features = unshuffle_fn(self.momentum.encoder.backbone(shuffled), state)
            frame_features = features[: 3 * batch_size].unflatten(0, (3, batch_size))
            tuple_features = features[3 * batch_size:].unflatten(0, (batch_size, key_tuple.shape[1]))
            embed = self.momentum.encoder.embed
            key_inter = embed("inter", frame_features)  # [3, B, E]: x1, x2, x3
            key_intra = embed("intra", frame_features)
            key_order = embed("order", tuple_features)  # [B, K, E]
            key_segment = embed("segment", tuple_features.mean(dim=1))  # [B, E]
            frame_negatives = self.frame_queue.queue.clone()
            segment_negatives = self.segment_queue.queue.clone()

        # L_inter: each of x1, x2, x3 is the positive of its own row (3B rows), the frame queue negatives.
        query_inter = query["inter"][0].expand(3, -1, -1)
        inter_positive = (query_inter * key_inter).sum(-1, keepdim=True).flatten(0, 1)
        inter_negative = query_inter.flatten(0, 1) @ frame_negatives.to(query_inter.dtype).T
        # L_intra: [q.x1, q.x2] and [q.x1, q.x3] (2B rows of 2 logits).
        intra = (query["intra"][0].unsqueeze(0) * key_intra).sum(-1)  # [3, B]
        intra_logits = torch.cat([torch.stack([intra[0], intra[1]], 1), torch.stack([intra[0], intra[2]], 1)])
        # L_segment: video-level query vs key-tuple segment embedding, the segment queue negatives.
        segment_positive = (query["segment"] * key_segment).sum(-1, keepdim=True)
        segment_negative = query["segment"] @ segment_negatives.to(query["segment"].dtype).T
        # L_order: classifier on [query tuple order embeddings (K), key tuple order embeddings (K)].
        order_input = torch.cat([query["order"].flatten(1), key_order.flatten(1).to(query["order"].dtype)], 1)
        order_logits = self.model.order_classifier(order_input)

        zeros = torch.zeros(3 * batch_size, dtype=torch.long, device=xq.device)
        return {
            "inter_logits": torch.cat([inter_positive, inter_negative], 1),
            "inter_targets": zeros,
            "intra_logits": intra_logits,
            "intra_targets": zeros[: 2 * batch_size],
            "segment_logits": torch.cat([segment_positive, segment_negative], 1),
            "segment_targets": zeros[:batch_size],
            "order_logits": order_logits,
            "order_targets": batch["order_label"].to(device=xq.device, dtype=torch.long),
            "frame_keys": key_inter.flatten(0, 1).detach(),  # [3B, E]: x1 keys, x2 keys, x3 keys
            "segment_keys": key_segment.detach(),
        }

    @torch.no_grad()
    def enqueue(self, outputs: Mapping[str, torch.Tensor],
                gather_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Push the step's keys (gathered across processes by `gather_fn`) into the two queues.

        The 3B frame keys go in as three consecutive chunks (x1, x2, x3 keys) of the key batch, so
        the queue size needs to be a multiple of the (global) batch, not of 3x the batch.
        """
        gather = gather_fn or (lambda tensor: tensor)
        for chunk in outputs["frame_keys"].chunk(3):
            self.frame_queue.enqueue(gather(chunk))
        self.segment_queue.enqueue(gather(outputs["segment_keys"]))

    @torch.no_grad()
    def momentum_update(self, alpha: float = 0.999) -> None:
        self.momentum.update(self.model, alpha)
