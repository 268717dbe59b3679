"""``python -m kernelatlas``: the same as the ``kernelatlas`` command (see kernelatlas.cli)."""

import sys

from kernelatlas.cli import main

sys.exit(main())
