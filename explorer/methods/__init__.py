"""Merge methods, one small module per family; importing this package registers them all."""

from explorer.methods import (  # noqa: F401
    averaging,
    checkpoint_averaging,
    fisher_merge,
    geometry,
    linear,
    passthrough,
    sparse_soup,
    task_vector_variants,
)
