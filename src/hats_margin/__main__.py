"""``python -m hats_margin``: the ``hats-margin`` command."""

from hats_margin.cli import run

if __name__ == "__main__":
    run()
