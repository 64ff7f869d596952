"""`python -m mongarsd` entry point."""

import sys

from mongarsd.cli import main

if __name__ == "__main__":
    sys.exit(main())
