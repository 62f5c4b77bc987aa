"""`python -m splitllm.cli`: the `splitllm` command."""

import sys

from splitllm.cli import main

sys.exit(main())
