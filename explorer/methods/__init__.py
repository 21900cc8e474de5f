"""Merge methods, one small module per family; importing this package registers them all."""

from explorer.methods import linear, task_arithmetic  # noqa: F401
