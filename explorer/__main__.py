"""``python -m explorer``: the command line (``explorer.cli``)."""

import gc
import os
import sys

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch loads: spinning OpenMP threads stall a shared machine

from explorer.cli import main  # noqa: E402

# The imports leave about 300,000 objects that live as long as this one-shot process: every full
# collection walked them, and so did the one at exit. Frozen, the collector skips them: a TIES merge of
# SmolLM2 and three experts to disk took 3.9-4.0 s instead of 4.5-4.7 s (0.4 s of it at exit).
gc.freeze()
sys.exit(main())
