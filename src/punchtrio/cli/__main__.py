"""``python -m punchtrio.cli``: the same as the ``punchtrio`` command."""

import sys

from . import main

sys.exit(main())
