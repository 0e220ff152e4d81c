"""The training state as full tensors per parameter, whatever the ZeRO stage and the number of processes.

A checkpoint holds, for every trainable parameter `name`, its fp32 master value and its AdamW moments
(`param/name`, `exp_avg/name`, `exp_avg_sq/name`), plus one optimizer step count. DeepSpeed keeps these
partitioned differently at each stage (ZeRO-0: plain tensors; ZeRO-1/2: flat fp32 partitions of the optimizer;
ZeRO-3: the parameters too); its tensor-fragment API (`deepspeed.utils.safe_get_full_*` / `safe_set_full_*`)
assembles a full tensor from the fragments of every rank and writes one back into them. Saving and loading
through it makes a checkpoint independent of how it was partitioned: any world size, any stage, both ways.

Both directions are collective (every rank calls them, in the same parameter order). Saving assembles one
parameter at a time, so no rank ever holds more than its share of the checkpoint plus one parameter.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = ("param", *MOMENTS)


def _fragmented(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps this parameter's fp32 master and moments in partitions (ZeRO-1/2/3, bf16)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


class TrainState:
    """Reads and writes the engine's master weights, moments and step count as full per-parameter tensors."""

    def __init__(self, engine):
        self.engine = engine
        self.params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        opt = engine.optimizer
        self.base = getattr(opt, "optimizer", opt)  # the torch AdamW under DeepSpeed's ZeRO wrapper
        self.zero3 = any(hasattr(p, "ds_id") for _, p in self.params)

    # --- reading --------------------------------------------------------------------------------------------
    def full(self, name: str, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """{"param", "exp_avg", "exp_avg_sq"} of one parameter, full and fp32, on the CPU. Collective."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if _fragmented(p):
            out = {"param": safe_get_full_fp32_param(p)}
            for k in MOMENTS:
                out[k] = safe_get_full_optimizer_state(p, k)
        else:
            st = self.base.state.get(p, {})
            out = {"param": p.detach()}
            for k in MOMENTS:
                out[k] = st.get(k, torch.zeros_like(p, dtype=torch.float32))
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def tensors(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Every parameter's full state, in order. Collective; the optimizer state exists and DeepSpeed's fragments
        point at it first (after loading, DeepSpeed relinks them only at its next step)."""
        self._ensure_adam_state()
        for name, p in self.params:
            yield name, self.full(name, p)

    def optimizer_steps(self) -> int:
        """How many optimizer steps AdamW has taken (its bias correction depends on it)."""
        for st in self.base.state.values():
            if "step" in st:
                return int(float(st["step"]))
        return 0

    def shapes(self) -> dict[str, list[int]]:
        """Full shapes of the trainable parameters (ZeRO-3 partitions report their full shape as ds_shape)."""
        return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.params}

    # --- writing --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def load(self, get, steps: int) -> None:
        """Set every parameter's master value, its module copy and its moments from `get(kind, name)` (a full
        fp32 tensor), and AdamW's step count to `steps`. Collective."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._ensure_adam_state()
        for name, p in self.params:
            value = get("param", name)
            self._set_module_param(p, value)
            if _fragmented(p):
                safe_set_full_fp32_param(p, value.to(p.device))
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, get(k, name).to(p.device), k)
            else:
                st = self.base.state[p]
                for k in MOMENTS:
                    st[k].copy_(get(k, name).to(st[k].device))
        for st in self.base.state.values():  # one step count per tensor AdamW steps (ZeRO: per flat partition)
            if torch.is_tensor(st.get("step")):
                st["step"].fill_(steps)

    def _ensure_adam_state(self) -> None:
        """AdamW creates its state at the first step; a resume before it creates it the way AdamW would (a scalar
        step on the host, on the device when fused or capturable), and lets DeepSpeed link its fragments to it."""
        opt = self.engine.optimizer
        on_device = self.base.defaults.get("fused") or self.base.defaults.get("capturable")
        for q in self._stepped_tensors():
            st = self.base.state[q]
            if "exp_avg" in st:
                continue
            st["step"] = torch.tensor(0.0, dtype=torch.float32, device=q.device if on_device else "cpu")
            st["exp_avg"] = torch.zeros_like(q, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(q, memory_format=torch.preserve_format)
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: views of the new state
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _stepped_tensors(self) -> list[torch.Tensor]:
        """The tensors AdamW keeps state for: DeepSpeed's flat fp32 partitions (ZeRO-3 swaps them into the
        optimizer only while it steps; ZeRO-1/2; bf16), else the parameters themselves."""
        opt = self.engine.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            if getattr(opt, attr, None):
                return list(getattr(opt, attr))
        return [q for g in self.base.param_groups for q in g["params"]]

    def _set_module_param(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        if hasattr(p, "ds_id"):  # ZeRO-3: gather, set on rank 0, repartition to every rank
            import deepspeed
            import torch.distributed as dist

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(value.to(p.device, p.dtype))
        else:
            p.data.copy_(value.to(p.device, p.dtype))
