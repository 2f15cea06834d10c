"""``python -m hookengine`` is the ``hookengine`` command."""

import sys

from .cli import main

sys.exit(main())
