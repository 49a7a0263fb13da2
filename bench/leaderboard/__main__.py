"""``python -m tokenbench.leaderboard``: the ``tokenbench-leaderboard`` command."""

import sys

from .cli import main

sys.exit(main())
