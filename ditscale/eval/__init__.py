"""Evaluation of trained runs: PSNR gap, two-model test, attention locality, FID, Jacobian analysis, the report.

Metric math lives in plain functions (psnr, pair, locality, fid, jacobian); `command` wires them to run
directories (`python -m ditscale eval METRIC`), `report` lays out a grid's results (`python -m ditscale report`).
"""

from ditscale.eval.fid import FIDInceptionV3, frechet_distance
from ditscale.eval.locality import locality_stats
from ditscale.eval.pair import cosine, nearest
from ditscale.eval.psnr import eval_timesteps, psnr_gap

__all__ = [
    "FIDInceptionV3",
    "cosine",
    "eval_timesteps",
    "frechet_distance",
    "locality_stats",
    "nearest",
    "psnr_gap",
]
