"""`python -m seerlib.eval ...`: see `seerlib.eval.cli`."""

from seerlib.eval.cli import main

main()
