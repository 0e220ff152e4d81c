"""The one run-config schema: typed, validated once, before anything heavy starts.

A config is YAML with the sections below. `load_config(path, overrides)` applies dotted `key=value` overrides
(values parsed as YAML: `train.steps=100`, `model.windows=local@head`, `optim.betas=[0.9,0.99]`), validates,
and raises ConfigError naming the key on an unknown key or a wrong type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ditscale.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = "run"
    seed: int = 0
    # Local directory or object-storage URL (s3://bucket/prefix) for config, checkpoints, logs and samples.
    dir: str = "runs/run"
    # The writer's lock on run.dir: a trainer that stops heartbeating for this long is dead and its run can be
    # taken over (ditscale.io.lock). On the same host a holder whose process is gone is dead at once.
    lease_seconds: float = Field(120.0, gt=0)


class ModelSection(_Section):
    """The DiT: `build()` makes the module (on the current default device)."""

    variant: str = "DiT-XS/1"
    windows: str = "global"  # a window spec: global, local@head, local*@mix, 5x6@tail, 3,5,7,...
    input_size: int = Field(32, gt=0)  # image (pixel space) or latent side
    in_channels: int = Field(3, gt=0)
    num_classes: int = Field(1000, ge=1)
    learn_sigma: bool = True
    class_dropout_prob: float = Field(0.1, ge=0.0, le=1.0)
    attention_backend: Literal["auto", "sdpa_mask", "flex", "halo"] = "auto"
    strict_windows: bool = False  # a window covering the whole token grid (global in effect): an error, not a warning

    @field_validator("windows", mode="before")
    @classmethod
    def _windows_text(cls, v: Any) -> Any:
        # `model.windows=5` or `[3, 5]` unquoted: YAML gives an int or a list; the window-spec parser judges it
        from ditscale.model.windows import spec_text  # lazy: torch at import (configs are read without torch)

        return spec_text(v)

    @field_validator("windows")
    @classmethod
    def _windows_grammar(cls, v: str) -> str:
        from ditscale.model.windows import check_spec  # lazy: torch at import

        return check_spec(v)  # WindowSpecError (a ValueError) quoting the spec; the depth is checked at build

    def build(self):
        from ditscale.model import create_model  # lazy: torch at import

        return create_model(
            self.variant,
            input_size=self.input_size,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            learn_sigma=self.learn_sigma,
            class_dropout_prob=self.class_dropout_prob,
            windows=self.windows,
            attention_backend=self.attention_backend,
            strict_windows=self.strict_windows,
        )


class DiffusionSection(_Section):
    """The Gaussian diffusion: `build(learn_sigma)` makes it (model.learn_sigma decides the output's variance)."""

    # The defaults are the reference's (facebookresearch/DiT create_diffusion); docs/diffusion.md maps the names.
    loss: Literal["hybrid", "mse"] = "hybrid"  # hybrid = MSE + VLB with learned-range sigma (DiT); mse = MSE only
    num_timesteps: int = Field(1000, gt=1)  # the reference's diffusion_steps
    schedule: Literal["linear"] = "linear"
    # Scale the VLB term by num_timesteps / 1000: the reference's rescale_learned_sigmas (also accepted here).
    rescale_vb: bool = Field(False, validation_alias=AliasChoices("rescale_vb", "rescale_learned_sigmas"))
    use_kl: bool = False  # train on the VLB alone (times num_timesteps), mean and variance
    predict_xstart: bool = False  # the model outputs x_0 instead of epsilon
    sigma_small: bool = False  # fixed variance (model.learn_sigma false or loss mse): posterior variance, not beta_t
    sample_steps: int = Field(250, gt=0)  # respaced ancestral sampling for sample grids
    cfg_scale: float = Field(1.0, ge=1.0)

    @model_validator(mode="after")
    def _kl_is_a_loss(self) -> DiffusionSection:
        if self.use_kl and self.loss == "mse":
            raise ValueError("use_kl true trains on the VLB, which contradicts loss 'mse' (keep loss: hybrid)")
        return self

    def kwargs(self, learn_sigma: bool) -> dict:
        """create_diffusion's keywords for this section (and the model's learn_sigma)."""
        return {
            "noise_schedule": self.schedule,
            "use_kl": self.use_kl,
            "sigma_small": self.sigma_small,
            "predict_xstart": self.predict_xstart,
            "learn_sigma": learn_sigma,
            "rescale_vb": self.rescale_vb,
            "diffusion_steps": self.num_timesteps,
            "loss": self.loss,
        }

    def build(self, learn_sigma: bool, respacing: str = ""):
        from ditscale.diffusion import create_diffusion  # lazy: torch at import

        return create_diffusion(respacing, **self.kwargs(learn_sigma))


class DataSection(_Section):
    """The training shards: `loader(...)` is the resumable TrainStream of one rank."""

    train: str = ""  # manifest.json URL of the training shards (local path or s3://)
    test: str = ""  # manifest.json URL of the held-out test shards (optional; eval uses it)
    kind: Literal["pixels", "latents"] = "pixels"
    num_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    flip: bool = True
    verify_sha256: bool = False
    # Canonical streams the data is read as (at most; fewer for small datasets): the sample order depends on it,
    # not on the world size. A world size (x workers) dividing it reads no more than its share of the shards.
    streams: int = Field(64, ge=1)
    # Damaged (truncated, unreadable) shards tolerated per process before the run stops; default 1% of the shards.
    max_damaged_shards: int | None = Field(None, ge=0)

    def loader(self, *, micro_batch: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        from ditscale.data import make_loader  # lazy: torch at import

        return make_loader(
            self.train,
            batch_size=micro_batch,
            global_batch=global_batch,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            flip=self.flip,
            verify_sha256=self.verify_sha256,
            streams=self.streams,
            max_damaged_shards=self.max_damaged_shards,
        )


class OptimSection(_Section):
    """AdamW and its learning-rate schedule: `optimizer(params)`, `lr_factor(step)`. On resume these values are
    applied to the loaded moments: a changed lr, betas, weight decay or warm-up is what the next step uses."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping

    def optimizer(self, params, fused: bool = False):
        import torch

        kw = {"fused": True} if fused else {}
        return torch.optim.AdamW(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay, **kw)

    def lr_factor(self, step: int) -> float:
        """LR multiplier for optimizer step `step`: linear warm-up, then constant (DiT: constant 1e-4)."""
        return 1.0 if self.warmup_steps <= 0 else min(1.0, (step + 1) / self.warmup_steps)


class TrainSection(_Section):
    steps: int = Field(400_000, gt=0)
    global_batch: int = Field(64, gt=0)
    micro_batch: int = Field(64, gt=0)  # per rank; accumulation = global / (micro * world)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    zero_stage: int = Field(2, ge=0, le=3)
    ema_decay: float = Field(0.9999, ge=0.0, le=1.0)
    activation_checkpointing: bool = False
    compile: bool = False
    tf32: bool = True
    # A NaN/inf loss or gradient norm: stop the run there (recorded as diverged), or skip that step's update
    # (at most max_skipped_steps in a row; skip reads the loss back every step).
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = Field(10, ge=1)

    def engine(self, model, optim: OptimSection, world_size: int):
        """(engine, optimizer, scheduler): the DeepSpeed engine for this section and the optimizer section."""
        from ditscale.train.engine import build_engine  # lazy: torch at import

        return build_engine(self, optim, model, world_size)


class CheckpointSection(_Section):
    every: int = Field(5000, gt=0)
    keep: int = Field(3, ge=1)


class LogSection(_Section):
    every: int = Field(10, gt=0)
    sample_every: int = Field(1000, ge=0)  # 0: no sample grids
    metrics_port: int = Field(9400, ge=0, le=65535)  # base port; rank r listens on base + local rank; 0 = off
    # A directory (or URL) where each rank publishes its exporter as a Prometheus file_sd target while it runs
    # (the Slurm launcher sets it to <log dir>/targets); "" = off.
    file_sd: str = ""
    # Where each record goes besides the console (a progress bar on a terminal, else a plain line per record).
    loggers: list[Literal["prometheus", "jsonl", "tensorboard", "wandb"]] = ["prometheus", "jsonl"]
    wandb_project: str = "ditscale"  # the W&B project when "wandb" is among log.loggers
    # Address the metrics server binds: 0.0.0.0 (every IPv4 interface: what Prometheus on another host needs),
    # 127.0.0.1 (this machine only), a node's interface address, or :: (IPv6 and IPv4).
    metrics_addr: str = Field("0.0.0.0", min_length=1)
    progress: bool = True

    def build(self, run, denv, rundir, device, labels: dict[str, str], start_step: int, **kw):
        """The trainer's logging part (loggers, the Prometheus exporter, its file_sd target) from this section and
        `run` (ditscale.train.loggers.RunValues: the run's name, steps, global batch and config as data)."""
        from ditscale.train.loggers import TrainLog  # lazy: torch, not needed to read a config

        return TrainLog(self, run, denv, rundir, device, labels, start_step, **kw)


class Config(_Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    diffusion: DiffusionSection = DiffusionSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()

    @field_validator("train")
    @classmethod
    def _batches(cls, v: TrainSection) -> TrainSection:
        if v.global_batch % v.micro_batch:
            raise ValueError(f"global_batch {v.global_batch} is not a multiple of micro_batch {v.micro_batch}")
        return v


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key!r}: cannot parse value {raw!r}: {e}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_errors(err: ValidationError, origin: str) -> str:
    import difflib

    def valid_keys(loc: tuple) -> list[str]:
        """The field names of the section at loc[:-1] (the top level's sections for a one-part loc)."""
        model: Any = Config
        for part in loc[:-1]:
            field = model.model_fields.get(str(part)) if isinstance(model, type) else None
            model = field.annotation if field is not None else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                return []
        return list(model.model_fields)

    def suggestion(loc: tuple) -> str:
        """' (did you mean ...?)': the nearest key of the same section, or the same name in another section."""
        name, parent = str(loc[-1]), ".".join(str(p) for p in loc[:-1])
        prefix = f"{parent}." if parent else ""
        close = difflib.get_close_matches(name, valid_keys(loc), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {prefix + close[0]!r}?)"
        elsewhere = [f"{s}.{name}" for s, f in Config.model_fields.items() if name in f.annotation.model_fields]
        if elsewhere:
            return f" (did you mean {elsewhere[0]!r}?)"
        keys = valid_keys(loc)
        return f" (valid keys{' of ' + parent if parent else ''}: {', '.join(keys)})" if keys else ""

    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}{suggestion(tuple(e['loc']))}")
        elif e["type"] == "value_error":
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {origin}: " + "; ".join(lines)


def config_from_dict(tree: dict, origin: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def read_config_tree(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top")
    return tree


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    tree = read_config_tree(path) if path else {}
    tree = _merge(tree, parse_overrides(overrides))
    return config_from_dict(tree, origin=str(path or "<defaults>"))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Keys that do not change what is trained: they may differ when a run resumes. Every other key (model.*,
# diffusion.*, data.*, optim.*, train.global_batch, run.seed, ...) changes the weights a run produces, so a resume
# that changes one is refused unless the user allows it (and it is recorded in the run's config history).
# train.zero_stage and the world size are free: a checkpoint holds full per-parameter state, so only float
# reduction order changes.
FREE_KEYS = (
    "run.dir",
    "run.lease_seconds",
    "train.steps",
    "train.activation_checkpointing",
    "train.compile",
    "train.zero_stage",
    "train.micro_batch",
    "train.nonfinite",
    "train.max_skipped_steps",
    "model.attention_backend",
    "data.test",
    "data.num_workers",
    "data.verify_sha256",
    "data.max_damaged_shards",
    "diffusion.sample_steps",
    "diffusion.cfg_scale",
    "checkpoint.",
    "log.",
)

# Keys that shape the model's parameters: no checkpoint can be resumed with another value, allowed or not.
FIXED_KEYS = ("model.variant", "model.input_size", "model.in_channels", "model.num_classes", "model.learn_sigma")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[dict[str, list], dict[str, list]]:
    """(trained, free): the keys whose values differ between two config trees, as key -> [old, new], split into
    those that change what is trained and those that do not (FREE_KEYS). Old trees are completed with today's
    defaults, so a key added to the schema later is not a change."""
    try:
        old_flat = flatten(Config.model_validate(old).model_dump(mode="json"))
    except ValidationError:
        old_flat = flatten(old)
    new_flat = flatten(new)
    trained: dict[str, list] = {}
    free: dict[str, list] = {}
    for key in sorted(set(old_flat) | set(new_flat)):
        a, b = old_flat.get(key), new_flat.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a == b:
            continue
        is_free = any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_KEYS)
        (free if is_free else trained)[key] = [a, b]
    return trained, free


def fixed_changes(trained: dict[str, list]) -> dict[str, list]:
    """The changes among `trained` that no resume can apply (parameter shapes): FIXED_KEYS, and label dropout
    switched on or off (it adds or removes the null class's embedding row)."""
    out = {k: v for k, v in trained.items() if k in FIXED_KEYS}
    drop = trained.get("model.class_dropout_prob")
    if drop is not None and (float(drop[0] or 0) > 0) != (float(drop[1] or 0) > 0):
        out["model.class_dropout_prob"] = drop
    return out


def format_changes(changes: dict[str, list]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
