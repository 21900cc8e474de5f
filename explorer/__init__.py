"""Merge Explorer: local model merging, its statistics and its recipes (no UI, no lm-eval here)."""

from explorer.allocator import tune

tune()  # huge pages for big tensors, freed merge memory reused (explorer.allocator)
