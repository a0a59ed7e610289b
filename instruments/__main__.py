"""``python -m instruments``: the same as ``jvpn-lab``."""

import sys

from instruments.cli import main

sys.exit(main())
