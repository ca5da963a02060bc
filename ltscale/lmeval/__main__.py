"""``python -m ltscale.lmeval ...`` = ``ltscale lm-eval ...``."""

import sys

from ltscale.lmeval.entry import main
from ltscale.logging_setup import setup_logging

setup_logging()  # ltscale's own lines (latent steps per task); lm-eval sets up its logger itself
sys.exit(main())
