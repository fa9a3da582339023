"""``python -m kubelet`` (with ``e2e/cluster`` on ``sys.path``): run the process kubelet."""

from __future__ import annotations

import sys

from .main import main

sys.exit(main())
