"""`python -m captioner ...` runs the command line, like the `captioner` script."""

import sys

from .cli import main

sys.exit(main())
