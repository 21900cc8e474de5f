"""Demo models built on this machine, really trained on CPU.

The tiny zoo (``tiny``), the SmolLM2 base (``smollm2``), its experts (``experts``), their offline
tasks (``tasks``) and the training loop they share (``train``); ``python -m explorer.zoo`` builds them.
"""
