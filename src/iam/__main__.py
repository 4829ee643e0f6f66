"""``python -m iam ...``: the ``iam`` command line (what ``torchrun --nproc-per-node N -m iam ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
