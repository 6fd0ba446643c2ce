"""``python -m oltr.cli …``: the ``oltr`` command (as ``python -m oltr``)."""
import sys

from oltr.cli import main

if __name__ == "__main__":
    sys.exit(main())
