"""Fuzz targets: one module per parser (NAME, seeds, mutate, run; see bench/fuzzing/runner.py)."""
