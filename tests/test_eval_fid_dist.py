"""FID sampling spread over ranks (torch.distributed, gloo, 2 processes): the gathered features are exactly those
of a single process, whatever the world size."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ditscale.eval import fid
from tests.ports import free_port


def _draw(model, labels, noise, g):
    return noise.tanh() + labels.view(-1, 1, 1, 1) * 0.01


def _features():
    return fid.sample_features(
        None, _draw, fid.PixelFeatures(), 11, num_classes=3, shape=(1, 4, 4), batch_size=4, seed=5
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feats = fid.sample_features(
            None, _draw, fid.PixelFeatures(), 11, num_classes=3, shape=(1, 4, 4), batch_size=4, seed=5
        )
        np.save(f"{out}/rank{rank}.npy", feats)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sample_features_two_ranks_match_single_process(tmp_path):
    port = free_port()
    torch.multiprocessing.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    single = fid.sample_features(
        None, _draw, fid.PixelFeatures(), 11, num_classes=3, shape=(1, 4, 4), batch_size=4, seed=5
    )
    for r in range(2):
        got = np.load(tmp_path / f"rank{r}.npy")
        assert got.shape == (11, 16)
        np.testing.assert_array_equal(got, single)
