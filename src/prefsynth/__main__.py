"""``python -m prefsynth``: the ``prefsynth`` command (``python -X importtime -m prefsynth``)."""

import sys

from prefsynth.cli import main

if __name__ == "__main__":
    sys.exit(main())
