"""``python -m ltscale.cli``: the ``ltscale`` console script without its entry point."""

import sys

from ltscale.cli import main

sys.exit(main())
