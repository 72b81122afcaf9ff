"""Backbones, the VCLR model (heads, momentum encoder, queues)."""
