"""Frozen-feature evaluations: features, retrieval, linear probe."""
