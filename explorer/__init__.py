"""Merge Explorer: local model merging, its statistics and its recipes (no UI, no lm-eval here)."""
