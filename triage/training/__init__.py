"""The ML engineer's tools: train, export, evaluate, benchmark, generate synthetic data."""
