"""``python -m explorer``: the command line (``explorer.cli``)."""

import os
import sys

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch loads: spinning OpenMP threads stall a shared machine

from explorer.cli import main  # noqa: E402

sys.exit(main())
