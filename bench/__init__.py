"""Evaluation and demonstration: `eclm demo`, `eclm bench` and the benchmark scripts."""
