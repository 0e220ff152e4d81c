"""`python -m ditscale.cli.after_srun --rc RC --log-dir DIR --max-failures N`: the last line of a Slurm job script
written by launchers/slurm_grid.py. When srun failed and no rank could report it, the job is requeued within the
run's failure budget (ditscale.launch.task.after_srun)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditscale.cli.after_srun", description=__doc__.split("\n\n")[0])
    p.add_argument("--rc", type=int, required=True, help="srun's exit code")
    p.add_argument("--log-dir", required=True, help="the grid's submitit log dir")
    p.add_argument("--max-failures", type=int, required=True, help="requeues allowed after failures")
    a = p.parse_args(argv)
    from ditscale.launch.task import after_srun  # lazy: submitit at start-up

    return after_srun(a.rc, a.log_dir, a.max_failures)


if __name__ == "__main__":
    sys.exit(main())
