"""Timestep respacing: run a T-step diffusion on a subset of its timesteps (e.g. 250 of 1000, or DDIM's 50).

A respaced process keeps the base process's alpha_bar at the kept steps and recomputes betas between them, so
q(x_t | x_0) is unchanged at every kept step. The model still sees the *original* timestep numbers: the
SpacedDiffusion maps its own indices 0..K-1 to them before each model call.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ditscale.diffusion.gaussian import GaussianDiffusion
from ditscale.errors import ConfigError


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> set[int]:
    """The timesteps of a T-step process to keep.

    section_counts:
      - "ddimN": N steps with one integer stride starting at 0 (as DDIM), e.g. "ddim50" -> 0, 20, ..., 980;
      - "N" or "N1,N2,...": split [0, T) into equal sections and take N_i evenly spaced steps (both ends included)
        from section i, e.g. "250", or "10,15,20"; a list of ints means the same. The kept steps are exactly the
        reference's (facebookresearch/DiT and openai/improved-diffusion `space_timesteps`) for every spec;
      - "" (or the full count) keeps every step.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec == "":
            return set(range(num_timesteps))
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim") :])
            except ValueError:
                raise ConfigError(
                    f"timestep respacing {section_counts!r}: expected 'ddimN' with an integer N"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ConfigError(
                f"timestep respacing {section_counts!r}: {num_timesteps} steps cannot be cut into exactly {desired} "
                "with an integer stride"
            )
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ConfigError(
                f"timestep respacing {section_counts!r}: expected '', 'N', 'N1,N2,...' or 'ddimN'"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ConfigError(f"timestep respacing {section_counts!r}: every section needs at least 1 step")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(
                f"timestep respacing {section_counts!r}: cannot take {count} steps from a section of {size} "
                f"(of {num_timesteps} steps)"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # The index is accumulated in floating point, as the reference does (openai/improved-diffusion, DiT
        # respace.py): round(j * stride) differs from it for 278 of the 1000 counts at T = 1000 (e.g. "21").
        idx = 0.0
        for _ in range(count):
            steps.append(start + round(idx))
            idx += stride
        start += size
    return set(steps)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over `use_timesteps` of a base process with schedule `betas`.

    `timestep_map[i]` is the base timestep of this process's step i; model (and cond_fn) calls receive base
    timesteps. `use_timesteps` (a set, as the reference's attribute) and `original_num_steps` as the reference.
    """

    def __init__(self, use_timesteps: Iterable[int], betas: np.ndarray, **kwargs):
        base = GaussianDiffusion(betas, **kwargs)
        keep = sorted(set(int(s) for s in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= base.num_timesteps:
            raise ConfigError(f"respaced timesteps must lie in [0, {base.num_timesteps}), got {keep[:3]}...")
        self.base_num_timesteps = self.original_num_steps = base.num_timesteps
        self.use_timesteps = set(keep)
        self.timestep_map = keep
        new_betas, last_alpha_cumprod = [], 1.0
        for i in keep:
            alpha_cumprod = base.alphas_cumprod[i]
            new_betas.append(1.0 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
        super().__init__(np.array(new_betas, dtype=np.float64), **kwargs)
        self._map_cache: dict[torch.device, torch.Tensor] = {}

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        m = self._map_cache.get(t.device)
        if m is None:
            m = torch.tensor(self.timestep_map, dtype=torch.long, device=t.device)
            self._map_cache[t.device] = m
        return m[t].to(t.dtype)
