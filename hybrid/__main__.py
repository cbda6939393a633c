"""``python -m hybrid`` (and so ``torchrun -m hybrid ...``) runs the CLI."""
import sys

from hybrid.cli import main

if __name__ == "__main__":
    sys.exit(main())
