"""``python -m explorer``: the command line (``explorer.cli``)."""

import gc
import os
import sys

# Before torch and numpy load: spinning OpenMP threads stall a shared machine, and so do the OpenBLAS
# threads numpy and scipy start (each spins about 0.1 s of a core on load; no command uses their BLAS).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The imports make about 300,000 objects that live as long as this one-shot process: collected during
# the imports, and at every full collection after them, they cost a CLI merge about 0.2 s and 0.5 s.
# So the collector is off while importing, and then skips them (frozen). Measured on a TIES merge of
# SmolLM2 and three experts to disk: imports 1.78 -> 1.58 s, and 4.5-4.7 s -> 3.9-4.0 s for freezing.
gc.disable()
from explorer.cli import main  # noqa: E402

gc.freeze()
gc.enable()
status = main()
# Every command has closed its files and joined its threads when main returns. Tearing down the
# interpreter (those objects, torch's and numba's libraries) would add 0.2 s to each run, so the
# process ends here, its output flushed.
sys.stdout.flush()
sys.stderr.flush()
os._exit(status)
