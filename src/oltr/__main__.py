"""``python -m oltr …`` — the ``oltr`` command; also what ``torchrun … -m oltr train …`` runs
(README, "Usage": distributed training)."""
import sys

from oltr.cli import main

if __name__ == "__main__":
    sys.exit(main())
