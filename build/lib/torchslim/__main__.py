"""``python -m torchslim``: the command-line interface."""

import sys

from torchslim.cli.main import main

sys.exit(main())
