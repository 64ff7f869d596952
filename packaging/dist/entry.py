"""Entry point of the frozen executable: the same `mongarsd` command as the venv's."""

import sys

from mongarsd.cli import main

if __name__ == "__main__":
    sys.exit(main())
