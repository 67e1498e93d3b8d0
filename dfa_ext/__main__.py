"""``python -m dfa_ext`` is the ``dfa`` command."""

import sys

from .cli import main

sys.exit(main())
