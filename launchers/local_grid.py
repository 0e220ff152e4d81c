#!/usr/bin/env python
"""The local launcher of ditscale grids (the backend: ditscale.launch.local; `--help` lists its options).

The same as `python -m ditscale launch local ...`: argparse of the backend's options, then the library
(ditscale.cli.launch.main).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ditscale.cli.launch import main

if __name__ == "__main__":
    sys.exit(main("local"))
