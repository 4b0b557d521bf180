"""The bottom layer: the typed tree, options, errors, limits, byte/stream I/O, fs-verity.

Everything above may import from here; nothing here imports from any other cfsc subpackage
(an import-linter contract in `tests/test_architecture.py` says so).
"""
