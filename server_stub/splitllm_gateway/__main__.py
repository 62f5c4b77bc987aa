"""``python -m splitllm_gateway``: the ``splitllm-gateway`` command."""

import sys

from splitllm_gateway.cli import main

sys.exit(main())
