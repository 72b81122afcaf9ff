"""VCLR reproduction suite: data, pretraining, evaluations and the paper's tables."""

__version__ = "0.1.0"
