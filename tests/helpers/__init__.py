"""Test helpers (importable as ``helpers``: ``tests/conftest.py`` puts ``tests/`` on
``sys.path``).

- :mod:`helpers.cli`: the command line as a user runs it, and its one-line errors.
- :mod:`helpers.data`: where the her2st data is, and whether it must be.
- :mod:`helpers.marks`: ``needs(...)`` marks resolved at collection.
- :mod:`helpers.arrays`: the array types the kernels take (``ARRAY_TYPES``).
- :mod:`helpers.models`: the tiny model, on the command line and in process.
- :mod:`helpers.oracles`: independent float64 expected values.
"""

from __future__ import annotations

from helpers.arrays import ARRAY_TYPES, as_numpy
from helpers.cli import assert_one_line_error, mclx, run_cli
from helpers.data import her2st_available, her2st_path, shared_path
from helpers.marks import needs
from helpers.models import (
    Tiny,
    tiny_model,
    tiny_options,
    tiny_recipe,
    tiny_train_args,
    train_tiny_cli,
)

__all__ = [
    "ARRAY_TYPES",
    "Tiny",
    "as_numpy",
    "assert_one_line_error",
    "her2st_available",
    "her2st_path",
    "mclx",
    "needs",
    "run_cli",
    "shared_path",
    "tiny_model",
    "tiny_options",
    "tiny_recipe",
    "tiny_train_args",
    "train_tiny_cli",
]
