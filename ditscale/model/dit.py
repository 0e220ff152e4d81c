# The DiT follows facebookresearch/DiT models.py (CC-BY-NC; itself from GLIDE, ADM, MAE, timm) line for line:
# same modules, parameter names, initialisation and forward passes, so that official checkpoints load with
# strict=True. Differences: no timm dependency (PatchEmbed, Attention and Mlp are written out below with timm's
# parameter names), per-block attention windows, input validation and capture_attention.
"""The Diffusion Transformer (Peebles & Xie 2023) with optional local-attention windows per block."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ditscale.errors import ConfigError, ModelInputError, WindowSpecError
from ditscale.model.attention import BACKENDS, attention_probs, qkv_attention
from ditscale.model.windows import check_window_coverage, format_windows, parse_windows


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Layers that the reference takes from timm                     #
#################################################################################


class PatchEmbed(nn.Module):
    """Image to patch embedding: a p x p convolution with stride p, flattened to (B, N, hidden)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention over the token grid, global or in a k x k window (timm's parameter names)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        window: int | None = None,
        grid: tuple[int, int] = (1, 1),
        backend: str = "auto",
    ):
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.window = window
        self.grid = grid
        self.backend = backend
        self._capture: list | None = None  # set by DiT.capture_attention

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if self._capture is None:
            x = qkv_attention(qkv, self.grid, self.window, self.backend)  # (B, N, C)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            probs = attention_probs(q, k, self.grid, self.window)
            self._capture.append(probs.detach())
            x = (probs @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal timestep embeddings (from GLIDE): t (N,) possibly fractional -> (N, dim)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
            device=t.device
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (a bf16/fp16 model, e.g. under DeepSpeed)


class LabelEmbedder(nn.Module):
    """Embeds class labels; label dropout for classifier-free guidance uses the extra row `num_classes`."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        labels = torch.where(drop_ids, self.num_classes, labels)
        return labels

    def forward(self, labels, train, force_drop_ids=None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        embeddings = self.embedding_table(labels)
        return embeddings


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, window=None, grid=(1, 1), attention_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(
            hidden_size, num_heads=num_heads, qkv_bias=True, window=window, grid=grid, backend=attention_backend
        )
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        approx_gelu = lambda: nn.GELU(approximate="tanh")
        self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim, act_layer=approx_gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        x = self.linear(x)
        return x


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, optionally with a k x k attention window per block.

    `windows`: None (all global), a spec string ("local@head", "3x2,5x2,7x2", ...; see ditscale.model.windows) or
    one entry per block (None for global, odd k for a border-clipped k x k window on the token grid).
    `attention_backend`: "auto" (flex on CUDA, halo on CPU), "sdpa_mask", "flex" or "halo"; global blocks always use
    scaled_dot_product_attention.
    `strict_windows`: a window that covers the whole token grid (k >= 2 * grid side - 1: the block is global in
    effect) raises WindowSpecError instead of warning (GlobalWindowWarning).
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        windows=None,
        attention_backend="auto",
        strict_windows=False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ModelInputError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if attention_backend not in BACKENDS:
            raise ConfigError(f"attention_backend {attention_backend!r}: expected one of {', '.join(BACKENDS)}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.num_classes = num_classes
        self.attention_backend = attention_backend
        self.validate_inputs = True  # check_inputs in every forward (shapes always; labels see check_inputs)
        self._labels_checked = False
        self.windows: list[int | None] = parse_windows(windows, depth)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        grid = self.x_embedder.grid_size
        check_window_coverage(self.windows, grid, strict=strict_windows)
        # Will use fixed sin-cos embedding:
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList(
            [
                DiTBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    window=w,
                    grid=grid,
                    attention_backend=attention_backend,
                )
                for w in self.windows
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def windows_spec(self) -> str:
        return format_windows(self.windows)

    def initialize_weights(self):
        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Initialize (and freeze) pos_embed by sin-cos embedding:
        if not self.pos_embed.is_meta:
            pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches**0.5))
            self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Initialize label embedding table:
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Initialize timestep embedding MLP:
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers in DiT blocks:
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers:
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """x: (N, T, patch_size**2 * C) -> imgs: (N, C, H, W)"""
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]

        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        imgs = x.reshape(shape=(x.shape[0], c, h * p, h * p))
        return imgs

    def flops_per_image(self, backward: bool = True) -> float:
        """Matmul FLOPs (2 per multiply-add) of one image's forward pass, x3 with the backward (which does twice the
        forward's matmuls); the numerator of model FLOPs utilisation (MFU).

        Counted: the linear layers on every token (qkv, proj, MLP: 24 D^2 per token and block), attention scores and
        values over the keys each query sees (2 x 2 N keys D per block: all N tokens in a global block, the k x k
        window clipped at the border in a windowed one, so windows lower the count), the patch embedding and final
        linear layer, the per-image timestep MLP and adaLN projections. Not counted: norms, softmax, GELU,
        modulation, the halo kernel's masked keys. DiT-XL/2 on 32x32x4 latents: 237.2 GFLOP forward (the DiT
        paper's 118.6 "GFLOPs" are multiply-adds), 711.7 GFLOP per trained image.
        """
        d = self.pos_embed.shape[-1]
        gh, gw = self.x_embedder.grid_size
        n = gh * gw
        p2 = self.x_embedder.patch_size[0] ** 2

        def keys(window: int | None) -> float:  # mean keys per query of a border-clipped window
            if window is None:
                return float(n)
            r = (window - 1) // 2
            mean = [sum(min(i, r) + min(side - 1 - i, r) + 1 for i in range(side)) / side for side in (gh, gw)]
            return mean[0] * mean[1]

        flops = 2 * n * p2 * self.in_channels * d  # patch embedding
        flops += 2 * (self.t_embedder.frequency_embedding_size * d + d * d)  # timestep MLP
        for w in self.windows:
            flops += 2 * 12 * d * d * n + 2 * 2 * n * keys(w) * d + 2 * d * 6 * d  # linear, attention, adaLN
        flops += 2 * d * 2 * d + 2 * n * d * p2 * self.out_channels  # final adaLN and linear
        return 3.0 * flops if backward else float(flops)

    def check_inputs(self, x, t, y):
        """Raise ModelInputError naming what was expected and what was given (never a silent broadcast).

        Shapes and dtypes are checked on the host in every call (no sync; under torch.compile they are guards). The
        label range is checked exactly on CPU and in the first call on an accelerator (one sync); after that, and
        under torch.compile, by a device-side assert that stops the step with the same message (no host sync).
        """
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ModelInputError(
                f"DiT input x: expected shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(in_channels={self.in_channels}, input_size={self.input_size}), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if t.dim() != 1 or t.shape[0] != batch:
            raise ModelInputError(f"DiT timesteps t: expected shape ({batch},), got {tuple(t.shape)}")
        if y.dim() != 1 or y.shape[0] != batch:
            raise ModelInputError(f"DiT labels y: expected shape ({batch},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ModelInputError(f"DiT labels y: expected an integer tensor, got dtype {y.dtype}")
        if not batch or y.device.type == "meta":
            return
        # num_classes itself is the classifier-free-guidance null class (present when class_dropout_prob > 0)
        top = self.y_embedder.embedding_table.num_embeddings - 1
        msg = f"DiT labels y: expected class indices in [0, {self.num_classes - 1}]" + (
            f" (or {self.num_classes}, the null class)" if top == self.num_classes else ""
        )
        if torch.compiler.is_compiling() or (y.device.type != "cpu" and self._labels_checked):
            # No host sync (a GPU would wait for the step's queue in every forward) and no graph break: a device-side
            # assert with the same message. On CPU, or once on an accelerator, the exact check below names the label.
            torch._assert_async(((y >= 0) & (y <= top)).all(), msg)
            return
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi > top:
            raise ModelInputError(f"{msg}, got {lo if lo < 0 else hi}")
        self._labels_checked = True

    def forward(self, x, t, y, force_drop_ids=None):
        """
        Forward pass of DiT.
        x: (N, C, H, W) tensor of spatial inputs (images or latent representations of images)
        t: (N,) tensor of diffusion timesteps
        y: (N,) tensor of class labels
        force_drop_ids: (N,) 1 where the label is dropped to the null class (classifier-free guidance training);
            None draws the drops from the global RNG in training, as the reference does. The trainer passes them,
            drawn per sample from the seed and the sample's position, so they do not depend on the world size.
        """
        if self.validate_inputs:
            self.check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / patch_size ** 2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, patch_size ** 2 * out_channels)
        x = self.unpatchify(x)  # (N, out_channels, H, W)
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """
        Forward pass of DiT, but also batches the unconditional forward pass for classifier-free guidance.
        """
        # https://github.com/openai/glide-text2im/blob/main/notebooks/text2im.ipynb
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        # For exact reproducibility reasons, we apply classifier-free guidance on only
        # three channels by default. The standard approach to cfg applies it to all channels.
        # This can be done by uncommenting the following line and commenting-out the line following that.
        # eps, rest = model_out[:, :self.in_channels], model_out[:, self.in_channels:]
        # ditscale: min(3, in_channels), identical to the reference for in_channels >= 3; for grey images
        # (in_channels 1, 2) the reference's 3 would also guide the learned-variance channels.
        g = min(3, self.in_channels)
        eps, rest = model_out[:, :g], model_out[:, g:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    @contextlib.contextmanager
    def capture_attention(self, blocks: Iterable[int] | None = None):
        """`with model.capture_attention(blocks=[0, 3]) as probs: model(x, t, y)`; then probs[0] is block 0's
        attention probabilities (B, heads, N, N) of the last forward (a list per block when several forwards ran:
        probs.calls[i]). Blocks default to all. Nothing is computed or stored outside the context."""
        idx = list(range(self.depth)) if blocks is None else [int(b) for b in blocks]
        for b in idx:
            if not 0 <= b < self.depth:
                raise ModelInputError(f"capture_attention: block {b} out of range for depth {self.depth}")
        store = CapturedAttention()
        for b in idx:
            buf: list = []
            store.calls[b] = buf
            self.blocks[b].attn._capture = buf
        try:
            yield store
        finally:
            for b in idx:
                self.blocks[b].attn._capture = None


class CapturedAttention(dict):
    """probs[i] -> last captured (B, heads, N, N) probabilities of block i; probs.calls[i] -> all of them."""

    def __init__(self):
        super().__init__()
        self.calls: dict[int, list[torch.Tensor]] = {}

    def __getitem__(self, block: int) -> torch.Tensor:
        calls = self.calls[block]
        if not calls:
            raise KeyError(f"no attention captured for block {block}: run a forward pass inside the context")
        return calls[-1]

    def __contains__(self, block) -> bool:
        return bool(self.calls.get(block))

    def keys(self):
        return [b for b, c in self.calls.items() if c]

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        return [(b, self[b]) for b in self.keys()]

    def values(self):
        return [self[b] for b in self.keys()]


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False, extra_tokens=0):
    """
    grid_size: int of the grid height and width
    return:
    pos_embed: [grid_size*grid_size, embed_dim] or [1+grid_size*grid_size, embed_dim] (w/ or w/o cls_token)
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0)

    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token and extra_tokens > 0:
        pos_embed = np.concatenate([np.zeros([extra_tokens, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0

    # use half of dimensions to encode grid_h
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)

    emb = np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)
    return emb


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """
    embed_dim: output dimension for each position
    pos: a list of positions to be encoded: size (M,)
    out: (M, D)
    """
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)

    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product

    emb_sin = np.sin(out)  # (M, D/2)
    emb_cos = np.cos(out)  # (M, D/2)

    emb = np.concatenate([emb_sin, emb_cos], axis=1)  # (M, 2*D)
    return emb


#################################################################################
#                                   DiT Configs                                  #
#################################################################################


def DiT_XL_2(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def DiT_XL_4(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)


def DiT_XL_8(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)


def DiT_L_2(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def DiT_L_4(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)


def DiT_L_8(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)


def DiT_B_2(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)


def DiT_B_4(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)


def DiT_B_8(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)


def DiT_S_2(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)


def DiT_S_4(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)


def DiT_S_8(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


# ditscale additions: patch-1 variants (pixel space), the study's DiT-XS/1, tiny models for demos and tests


def DiT_XL_1(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=1, num_heads=16, **kwargs)


def DiT_L_1(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=1, num_heads=16, **kwargs)


def DiT_B_1(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=1, num_heads=12, **kwargs)


def DiT_S_1(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=1, num_heads=6, **kwargs)


def DiT_XS_1(**kwargs):
    return DiT(depth=12, hidden_size=252, patch_size=1, num_heads=4, **kwargs)


def DiT_T_1(**kwargs):
    return DiT(depth=4, hidden_size=96, patch_size=1, num_heads=3, **kwargs)


def DiT_T_2(**kwargs):
    return DiT(depth=4, hidden_size=96, patch_size=2, num_heads=3, **kwargs)


def DiT_XXS_2(**kwargs):  # the CPU study's model (docs/results.md): the paper's 12 blocks, so its window presets fit
    return DiT(depth=12, hidden_size=64, patch_size=2, num_heads=2, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2,  "DiT-XL/4": DiT_XL_4,  "DiT-XL/8": DiT_XL_8,
    "DiT-L/2":  DiT_L_2,   "DiT-L/4":  DiT_L_4,   "DiT-L/8":  DiT_L_8,
    "DiT-B/2":  DiT_B_2,   "DiT-B/4":  DiT_B_4,   "DiT-B/8":  DiT_B_8,
    "DiT-S/2":  DiT_S_2,   "DiT-S/4":  DiT_S_4,   "DiT-S/8":  DiT_S_8,
    "DiT-XL/1": DiT_XL_1,  "DiT-L/1":  DiT_L_1,   "DiT-B/1":  DiT_B_1,   "DiT-S/1": DiT_S_1,
    "DiT-XS/1": DiT_XS_1,  "DiT-T/1":  DiT_T_1,   "DiT-T/2":  DiT_T_2,   "DiT-XXS/2": DiT_XXS_2,
}  # fmt: skip


@functools.cache
def variant_depth(variant: str) -> int:
    """The number of blocks of a variant in DiT_models, read from the variant itself (built once on the meta device,
    which costs no memory) so that the table above stays the only place that says it."""
    patch = int(variant.rsplit("/", 1)[1])  # "DiT-XL/2": patch size 2; a one-patch input builds any variant
    with torch.device("meta"):
        return int(DiT_models[variant](input_size=patch, in_channels=1, num_classes=1).depth)


def check_variant_windows(variant: str, windows: str | Sequence[int | None] | None) -> list[int | None]:
    """The one check of model.variant and model.windows together: create_model, the trainer's `validate` and the
    grid planner all call it, so each says the same. ConfigError naming an unknown variant; WindowSpecError naming
    model.windows when the spec does not fit the variant's depth. Returns the per-block windows."""
    if variant not in DiT_models:
        raise ConfigError(f"model.variant {variant!r}: unknown DiT variant; expected one of {', '.join(DiT_models)}")
    try:
        return parse_windows(windows, variant_depth(variant))
    except WindowSpecError as e:
        raise WindowSpecError(f"model.windows {windows!r} on {variant}: {e}") from None


def create_model(
    variant: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    windows: str | Sequence[int | None] | None = "global",
    attention_backend: str = "auto",
    strict_windows: bool = False,
) -> DiT:
    """Build a DiT variant by name; `windows` may be a spec string, parsed against the variant's depth."""
    check_variant_windows(variant, windows)
    return DiT_models[variant](
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        windows=windows,
        attention_backend=attention_backend,
        strict_windows=strict_windows,
    )
