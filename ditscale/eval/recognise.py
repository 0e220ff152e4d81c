"""Are a run's class-conditional samples recognisable? A classifier trained on the real images judges them.

The judge is scikit-learn's logistic regression on the raw pixels of the training split (images in [-1, 1],
flattened), scored on the held-out split; the run then draws `per_class` samples of every class (its EMA weights,
its sampler settings) and the judge's verdict is the share classified as the class they were drawn for. A grid
with one row per class is written beside the run's other samples. The README demo prints this score.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ditscale.eval.common import load_images, load_run
from ditscale.observability import save_grid
from ditscale.train.sampling import draw

log = logging.getLogger("ditscale.eval")


def fit_judge(train_url: str, test_url: str, *, seed: int = 0):
    """(logistic regression fitted on train_url's images, its accuracy on test_url's)."""
    from sklearn.linear_model import LogisticRegression

    x, y, _ = load_images(train_url)
    xt, yt, _ = load_images(test_url)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(x.flatten(1).numpy(), y.numpy())
    return clf, float(clf.score(xt.flatten(1).numpy(), yt.numpy()))


def judge_run(
    run_dir: str,
    train_url: str,
    test_url: str,
    *,
    per_class: int = 10,
    seed: int = 0,
    grid: str | None = None,
    tag: str | None = None,
    steps: int | None = None,
    method: str = "ddpm",
    cfg_scale: float | None = None,
) -> dict:
    """Draw `per_class` samples of each class from the run and let the judge classify them.

    Returns {"accuracy": share classified as drawn, "judge_test_accuracy", "per_class": [...], "samples", "grid"}.
    The sampler is the run's (diffusion.sample_steps, cfg_scale) unless `steps`, `method`, `cfg_scale` say other.
    """

    judge, judge_acc = fit_judge(train_url, test_url, seed=seed)
    cfg, model = load_run(run_dir, ema=True, tag=tag)
    classes = int(cfg.model.num_classes)
    labels = torch.arange(classes).repeat_interleave(per_class)  # row c of the grid: class c
    images = draw(model, cfg, labels, seed=seed, steps=steps, method=method, cfg_scale=cfg_scale).clamp(-1, 1)
    predicted = judge.predict(images.flatten(1).numpy())
    right = predicted == labels.numpy()
    per = [float(right[labels.numpy() == c].mean()) for c in range(classes)]
    path = None
    if grid:
        path = save_grid(images, grid, nrow=per_class, scale=max(1, 128 // (4 * cfg.model.input_size)))
    res = {
        "accuracy": float(np.mean(right)),
        "judge_test_accuracy": judge_acc,
        "per_class": per,
        "samples": len(labels),
        "sampler": f"{method}{steps or cfg.diffusion.sample_steps} cfg_scale="
        f"{cfg.diffusion.cfg_scale if cfg_scale is None else cfg_scale}",
        "grid": path,
    }
    log.info("recognisable samples: %.1f%% (judge's held-out accuracy %.1f%%)", 100 * res["accuracy"], 100 * judge_acc)
    return res
