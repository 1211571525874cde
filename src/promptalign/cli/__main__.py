"""``python -m promptalign.cli``: the `promptalign` command."""

import sys

from . import main

sys.exit(main())
