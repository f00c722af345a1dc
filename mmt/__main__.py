"""`python -m mmt` (and `torchrun -m mmt`) runs the command line."""

import sys

from mmt.cli import main

sys.exit(main())
