"""Pretraining loop, losses, schedule, checkpoints, distributed helpers."""
