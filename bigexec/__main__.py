"""``python -m bigexec`` is the ``bigexec`` command."""

import sys

from .cli import main

sys.exit(main())
