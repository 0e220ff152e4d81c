"""Launchers for grids of training runs: Slurm (submitit job arrays) and Ray (Ray Train TorchTrainer).

Shared logic lives here: planning (expand + validate + skip finished runs), the run's training task, and
status/collect through ditscale.results. Launchers know nothing of the training loop: they export the
distributed environment and call ditscale.train.run_training(cfg).
"""

from ditscale.launch.common import Plan, plan_grid, results_dir

__all__ = ["Plan", "plan_grid", "results_dir"]
