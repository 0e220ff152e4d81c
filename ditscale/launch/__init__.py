"""Launchers for grids of training runs: Slurm (submitit job arrays), Ray (Ray Train TorchTrainer), one machine.

Shared logic lives here: planning (expand + validate + skip finished runs: common.py), the preparation of a
grid's data from its recipe (prepare.py; on Slurm as CPU jobs: slurm_prepare.py), the run's training task, and
status/collect through ditscale.results. Launchers know nothing of the training loop: they export the
distributed environment and call ditscale.train.run_training(cfg), or start `python -m ditscale train` (local.py).
"""

from ditscale.launch.common import Plan, plan_grid, resolve_grid, results_dir

__all__ = ["Plan", "plan_grid", "resolve_grid", "results_dir"]
