"""Helpers shared by the tests: data, tree builders, archive crafting, hypothesis strategies."""
