"""``python -m mdprune`` (also what ``torchrun -m mdprune`` runs)."""

import sys

from .cli import main

sys.exit(main())
