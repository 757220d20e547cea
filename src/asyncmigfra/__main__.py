"""``python -m asyncmigfra``."""

import sys

from asyncmigfra.cli import main

sys.exit(main())
