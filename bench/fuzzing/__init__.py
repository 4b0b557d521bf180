"""Fuzzing: format-aware targets and the runner (bench/fuzz.py)."""
