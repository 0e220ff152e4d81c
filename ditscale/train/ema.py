"""Exponential moving average of the weights, as in DiT: ema = decay * ema + (1 - decay) * param, every step.

The EMA is a full fp32 copy of the model on every rank (initialised as a copy, like DiT's `update_ema(decay=0)`),
so sampling and saving it need no communication. Under ZeRO-3 the live parameters are partitioned across ranks;
they are gathered one block at a time (deepspeed.zero.GatheredParameters) so every rank's EMA sees the full
weights without ever materialising the whole model twice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn


def _param_groups(module: nn.Module) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Parameters in small groups: the module's own, then each child (each element of a ModuleList)."""
    own = list(module.named_parameters(recurse=False))
    if own:
        yield own
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            for i, sub in enumerate(child):
                group = [(f"{name}.{i}.{n}", p) for n, p in sub.named_parameters()]
                if group:
                    yield group
        else:
            group = [(f"{name}.{n}", p) for n, p in child.named_parameters()]
            if group:
                yield group


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, device: torch.device | str | None = None):
        self.decay = decay
        self.model = copy.deepcopy(model).float().requires_grad_(False).eval()
        if device is not None:
            self.model.to(device)
        self._params = dict(self.model.named_parameters())

    @torch.no_grad()
    def update(self, live: nn.Module, zero3: bool = False, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for group in _param_groups(live):
            if zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
                    self._update_group(group, d)
            else:
                self._update_group(group, d)

    def _update_group(self, group: list[tuple[str, nn.Parameter]], d: float) -> None:
        for name, p in group:
            e = self._params[name]
            e.mul_(d).add_(p.detach().to(e.dtype), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
