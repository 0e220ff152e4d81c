"""Launching grids of training runs: one interface (ditscale.launch.backend.Backend: plan -> start -> status ->
stop), four backends: Slurm (submitit job arrays: slurm.py, slurm_jobs.py, slurm_prepare.py, task.py), Ray (Ray
Train: ray.py), one machine (local.py) and Kubernetes (rendered Indexed Jobs: k8s.py).

Written once and used by all: planning (expand + validate + split finished runs: common.py), the claim on a run
(claim.py), the preparation of a grid's data from its recipe (prepare.py), launch and failure records
(records.py), status rows with stall rules and failure reasons (rows.py). Launchers know nothing of the training
loop: they start `python -m ditscale train` (or, on Slurm, call run_training in submitit's task) and send signals.
"""

from ditscale.launch.common import Plan, plan_grid, resolve_grid, results_dir

__all__ = ["Plan", "plan_grid", "resolve_grid", "results_dir"]
