"""`python shards/subset.py ...`: same as `python -m ditscale data subset ...` (see shards/README.md)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ditscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "subset", *sys.argv[1:]]))
