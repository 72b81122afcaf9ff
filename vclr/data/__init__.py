"""Datasets from download (or synthetic generation) to packed frames and split indices."""

DATASETS = ("k400", "ucf101", "hmdb51", "ssv2", "anet")
