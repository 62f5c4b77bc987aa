"""``python -m splitllm.planner FILE``: solve planner problems given as JSON (see ``solve.main``)."""

import sys

from splitllm.planner.solve import main

sys.exit(main())
