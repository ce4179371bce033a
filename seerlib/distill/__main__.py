"""`python -m seerlib.distill` (see `seerlib.distill.cli`)."""

import os
import sys

from seerlib.distill.cli import main

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, skip interpreter finalization: gloo's worker threads can abort the
        # process there ("terminate called without an active exception", pytorch#179291) after
        # all work is done and saved. Flush first so no output is lost.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
