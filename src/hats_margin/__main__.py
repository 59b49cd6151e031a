"""``python -m hats_margin``: the ``hats-margin`` command."""

import sys

from hats_margin.cli import main

if __name__ == "__main__":
    sys.exit(main())
