"""`python -m selfsup` (and `torchrun -m selfsup`) runs the command line."""
import sys

from .cli import main

sys.exit(main())
