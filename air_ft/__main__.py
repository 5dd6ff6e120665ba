"""``python -m air_ft`` (what ``accelerate launch -m air_ft train ...`` runs)."""

import sys

from air_ft.cli import main

sys.exit(main())
