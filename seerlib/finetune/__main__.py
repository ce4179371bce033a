"""`python -m seerlib.finetune` (see `seerlib.finetune.cli`)."""

import sys

from seerlib.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
