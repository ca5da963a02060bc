"""``python -m ltscale.lmeval ...`` = ``ltscale lm-eval ...``."""

import sys

from ltscale.lmeval.entry import main

sys.exit(main())
