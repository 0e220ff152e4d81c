"""`python shards/latents.py ...`: same as `python -m ditscale data latents ...` (see shards/README.md)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ditscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "latents", *sys.argv[1:]]))
