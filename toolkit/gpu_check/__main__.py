"""``python -m mclx.gpu_check``: see :mod:`mclx.gpu_check`."""

from __future__ import annotations

import sys

from mclx.gpu_check.runner import main

if __name__ == "__main__":
    sys.exit(main())
