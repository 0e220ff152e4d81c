"""Writes a checkpoint in the layout of ditscale before format 2 (DeepSpeed's own per-rank files, ema.pt,
rank_XXXXX.pt with pickled RNG states, meta.json without "format"), as that version's Checkpointer.save did, with
the real DeepSpeed engine. Run under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node N tests/legacy_checkpoint.py CONFIG RUN_DIR STEPS

It trains STEPS steps on random data (the weights and AdamW moments are real; the data order is not the point)
and writes checkpoints/step_<STEPS>/ and checkpoints/latest, plus config.yaml.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditscale import distenv
from ditscale.config import dump_config, load_config
from ditscale.train import engine as eng
from ditscale.train.ema import EMA


def main() -> None:
    config, run_dir, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    cfg = load_config(config, [f"run.dir={run_dir}"])
    denv = distenv.detect()
    eng.setup_process_env(denv)
    device = eng.init_distributed(denv)
    torch.manual_seed(cfg.run.seed)
    model = cfg.model.build().to(device)
    ema = EMA(model, cfg.train.ema_decay)
    engine, _, _ = cfg.train.engine(model, cfg.optim, denv.world_size)
    g = torch.Generator().manual_seed(denv.rank)
    m = cfg.model
    for _ in range(steps * eng.grad_accumulation(cfg.train, denv.world_size)):
        x = torch.randn(cfg.train.micro_batch, m.in_channels, m.input_size, m.input_size, generator=g)
        y = torch.randint(0, m.num_classes, (cfg.train.micro_batch,), generator=g)
        t = torch.randint(0, 1000, (cfg.train.micro_batch,), generator=g)
        loss = engine(x, t, y).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        if engine.is_gradient_accumulation_boundary():
            ema.update(engine.module, zero3=cfg.train.zero_stage == 3)
    tag = f"step_{steps:08d}"
    ck = run_dir / "checkpoints"
    engine.save_checkpoint(str(ck), tag=tag, client_state={"step": steps}, save_latest=False)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    loader = {"version": 1, "positions": [[0, 0]], "batches": steps}
    torch.save({"step": steps, "rank": denv.rank, "rng": rng, "loader": loader}, ck / tag / f"rank_{denv.rank:05d}.pt")
    if denv.rank == 0:
        torch.save(ema.state_dict(), ck / tag / "ema.pt")
        meta = {"world_size": denv.world_size, "zero_stage": cfg.train.zero_stage, "precision": "fp32",
                "config": cfg.model_dump(mode="json"), "step": steps, "tag": tag, "time": time.time()}  # fmt: skip
        (ck / tag / "meta.json").write_text(json.dumps(meta, indent=1))
        (ck / "latest").write_text(tag + "\n")
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
