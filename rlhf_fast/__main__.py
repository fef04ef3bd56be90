"""``python -m rlhf_fast ...``: the ``rlhf-fast`` command."""

import sys

from rlhf_fast.cli import main

sys.exit(main())
