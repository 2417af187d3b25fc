"""``python -m meshgate`` is the ``meshgate`` command."""

import sys

from meshgate.cli import main

sys.exit(main())
