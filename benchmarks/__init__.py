"""Benchmarks: torchslim against torch-pruning and real-data accuracy."""
