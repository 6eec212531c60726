"""``python -m hashrec``: the same as the ``hashrec`` command."""

import sys

from hashrec.cli import main

sys.exit(main())
