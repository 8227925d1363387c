"""``python -m backvault.cli``: how the schedule, the demo and the tests start the CLI."""

import sys

from backvault.cli.main import main

sys.exit(main())
