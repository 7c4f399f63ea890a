"""`python -m lmmtune COMMAND [overrides]`: the command line (lmmtune/cli.py)."""

from lmmtune.cli import main

if __name__ == "__main__":
    main()
