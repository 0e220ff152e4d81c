"""The trainer's NaN/inf part: a run whose loss or gradient norm stops being finite is not trained on.

train.nonfinite = "stop" (default): every step marks, on the device, the first step whose loss or gradient norm
was NaN or infinite (no host sync: a GPU keeps running ahead). The mark is read, and agreed by all ranks, before
anything of a step leaves the process: on log steps, before a sample grid or a checkpoint, at the end. A marked
run stops there with DivergedError (exit 3), records final.json as diverged at the first bad step, and saves
nothing of it: its checkpoints all predate the divergence.

train.nonfinite = "skip": a step whose loss or gradients are not finite is not applied (DeepSpeed's ZeRO
optimizers skip such an update themselves; at ZeRO-0 the gradients are dropped before the optimizer step) and
counted; more than train.max_skipped_steps in a row stops the run as diverged. Skip reads the loss back every
step (one host sync per step).
"""

from __future__ import annotations

import math

import torch

_NONE = 2**62  # "no bad step" in the all-reduced minimum


class NonFinite:
    def __init__(self, mode: str, max_skipped: int, device: torch.device, world_size: int):
        self.mode, self.max_skipped, self.device, self.world_size = mode, max_skipped, device, world_size
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_total = 0
        self.skipped_in_row = 0

    @staticmethod
    def _bad(loss: torch.Tensor, grad_norm) -> torch.Tensor:
        bad = ~torch.isfinite(loss.detach())
        if torch.is_tensor(grad_norm):
            bad = bad | ~torch.isfinite(grad_norm.detach().to(bad.device))
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            bad = bad | True
        return bad

    def watch(self, step: int, loss: torch.Tensor, grad_norm) -> None:
        """Stop mode: mark `step` if it is the first non-finite one (device-side, no sync)."""
        bad = self._bad(loss, grad_norm)
        self.first_bad = torch.where((self.first_bad == 0) & bad, torch.full_like(self.first_bad, step), self.first_bad)

    def diverged_at(self) -> int | None:
        """The first non-finite step of any rank, or None. Collective (a host sync): call on log and save steps."""
        import torch.distributed as dist

        v = torch.where(self.first_bad == 0, torch.full_like(self.first_bad, _NONE), self.first_bad).cpu()
        if self.world_size > 1:
            dist.all_reduce(v, op=dist.ReduceOp.MIN)
        return None if int(v) >= _NONE else int(v)

    def skipped(self, loss: torch.Tensor, applied: bool) -> bool:
        """Skip mode, after each step: whether it was skipped (agreed by all ranks); counts skips in a row."""
        import torch.distributed as dist

        flag = torch.tensor([float((not applied) or not math.isfinite(float(loss)))])
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.skipped_total += 1
            self.skipped_in_row += 1
            return True
        self.skipped_in_row = 0
        return False

    @property
    def too_many(self) -> bool:
        return self.skipped_in_row > self.max_skipped
