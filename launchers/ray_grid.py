#!/usr/bin/env python
"""The ray launcher of ditscale grids (the backend: ditscale.launch.ray; `--help` lists its options).

The same as `python -m ditscale launch ray ...`: argparse of the backend's options, then the library
(ditscale.cli.launch.main).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ditscale.cli.launch import main

if __name__ == "__main__":
    sys.exit(main("ray"))
