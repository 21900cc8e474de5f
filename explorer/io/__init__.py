"""Input and output, never importing the merge methods.

Checkpoint formats, the one input source a merge and Inspect share, vocabulary alignment, finite
checks and the atomic writer.
"""
