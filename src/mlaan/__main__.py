"""``python -m mlaan`` — the same as the ``mlaan`` console script (torchrun needs a module to run)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
