"""``python -m deltatune ...`` (and ``torchrun -m deltatune train ...``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
