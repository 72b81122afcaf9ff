"""`vclr bench ...`: speed measured side by side (results in docs/benchmarks.md)."""
