"""``python -m boxfiles`` and the ``boxfiles`` console script."""

from __future__ import annotations

import sys


def main() -> None:
    """Run the ``boxfiles`` command and exit with its status."""
    from ._cli import main as run

    sys.exit(run())


if __name__ == "__main__":
    main()
