"""A handwritten diffusion transformer as used by the LPL paper (Berrada et al., ICLR 2025, Sec. 4.1): SD3's
joint-attention MMDiT (Esser et al. 2024) for text, and its one-stream form, a DiT block with SD3's QK-norm
(Peebles & Xie 2023), for class labels or nothing.

Text models have two streams of tokens, the context (text embeddings) and the image (2x2 latent patches), each with
its own weights, that meet in ONE attention over [context; image] in every block (Fig. 2b of Esser et al.). A class
label is a single vector, not a sequence: a second stream would carry one token through every block for nothing, so
class-conditional and unconditional models have the image stream only, conditioned through adaLN. Everything else
is DiT: sin-cos position embedding, sinusoidal timestep embedding, adaLN-Zero modulation; or, with adaln_single,
PixArt-alpha's shared modulation (Chen et al. 2024).

    forward(x, t, y=None, context=None) -> a tensor shaped like x
        x        (B, in_channels, H, W) latents, H and W multiples of patch_size (any size)
        t        (B,) float in [0, 1], t = 0 is clean; embedded as sin-cos of 1000 * t
        y        (B,) integer labels of a class model; y == model.null_label is the
                 "no label" of classifier-free guidance
        context  (B, L, context_dim) precomputed text embeddings of a text model; the
                 "no text" of classifier-free guidance is an all-zeros context

The `paper` size. Sec. 4.1: "28 blocks with a hidden size of 1,536, amounting to a total of 796M parameters",
"similar to PixArt-alpha and DiT-XL/2". At that width a two-stream MMDiT has 2355M parameters (36 d^2 per block),
one stream with per-block adaLN 1199M (18 d^2); 796M is 28 x 12 d^2 = 792.7M, the attention and MLP weights of one
stream, plus the embeddings: no per-block modulation. So `paper` is one stream (ImageNet: class labels) with
PixArt-alpha's adaLN-single, whose shared modulation MLP (6 d^2 = 14.2M) is the whole difference: 811.9M, +1.99%
in the ImageNet setting. The DiT sizes keep DiT's per-block adaLN.

Print the parameter count, per part and per block, and the forward FLOPs of a named size (built on the meta
device, so instantly, even for the largest); the defaults are the ImageNet setting (256 px through the SD-VAE:
32 x 32 x 4 latents, 1000 classes):

    python model.py --model paper
    python model.py --model XL/2 --input-size 32 --in-channels 4 --num-classes 1000
    python model.py --model paper --input-size 32 --in-channels 16 --context-dim 4096 --context-tokens 77
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runtime import UserError, atomic_output, load_checkpoint, load_safetensors, one_line_errors
from schedules import Diffusion

TIME_SCALE = 1000  # t in [0, 1] is embedded as the sin-cos of 1000 * t, the DDPM step range
TIMESTEP_FREQUENCIES = 256  # size of the sinusoidal timestep embedding (DiT)
MLP_RATIO = 4  # hidden width of every MLP, in units of hidden_size (DiT, SD3)
NORM_EPS = 1e-6  # LayerNorm and RMSNorm epsilon (DiT, SD3)
MODULATIONS = 6  # shift, scale, gate before attention, and again before the MLP (adaLN-Zero)
IMAGENET_CLASSES = 1000  # the command line's default: the ImageNet setting of the paper


# --------------------------------------------------------------------------------------------
# Helpers: patches, position and time embeddings, modulation, attention
# --------------------------------------------------------------------------------------------

def patchify(x, patch_size):
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C): row-major patches, each flattened (p, p, C)."""
    batch, channels, height, width = x.shape
    p = patch_size
    x = x.view(batch, channels, height // p, p, width // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)  # (B, T, p*p*C)


def unpatchify(tokens, patch_size, grid_height, grid_width):
    """Inverse of `patchify`: (B, h * w, p * p * C) -> (B, C, h * p, w * p)."""
    batch = tokens.shape[0]
    p = patch_size
    x = tokens.view(batch, grid_height, grid_width, p, p, -1)  # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(batch, -1, grid_height * p, grid_width * p)


def sincos_position_embedding(grid_height, grid_width, dim, device, dtype=torch.float32):
    """Fixed 2D sin-cos embedding of a patch grid, equal to DiT's `get_2d_sincos_pos_embed` (and SD3's).

    The first half of the channels encodes the column (x), the second half the row (y): DiT's `np.meshgrid(grid_w,
    grid_h)` puts the w coordinate in grid[0], which fills the first half. Each half is [sin, cos] of
    position * 10000^(-k / (dim / 4)). Positions are integers 0, 1, ... so a larger image extends the grid: a model
    trained at 256 px (16 x 16 patches) keeps its 16 x 16 corner when post-trained at 512 px. No parameter: a
    checkpoint is resolution-free. Computed in float32 (float64 for a float64 model), returned in `dtype`.
    """
    compute_dtype = torch.promote_types(dtype, torch.float32)
    quarter = dim // 4
    frequencies = torch.exp(-math.log(10000.0) / quarter * torch.arange(quarter, device=device, dtype=compute_dtype))

    def embed(count):  # positions 0 .. count - 1 -> (count, dim/2): [sin, cos]
        angles = torch.arange(count, device=device, dtype=compute_dtype)[:, None] * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    columns, rows = embed(grid_width), embed(grid_height)  # (w, dim/2), (h, dim/2)
    grid = torch.cat([columns[None].expand(grid_height, -1, -1), rows[:, None].expand(-1, grid_width, -1)], dim=2)
    return grid.flatten(0, 1).to(dtype)  # (h*w, dim), the order of `patchify`


def timestep_embedding(t, dim=TIMESTEP_FREQUENCIES, max_period=10000, scale=TIME_SCALE):
    """Sinusoidal embedding (B,) -> (B, dim) of scale * t: by default 1000 * t, the DDPM step range (DiT, Ho et
    al.). In t's dtype (at least float32: bf16 cannot resolve 1000 * t), with DiT's order of operations."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    angles = (scale * t.to(dtype))[:, None] * frequencies  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def autocast_off(tensor):
    """A region that runs in the parameters' dtype whatever autocast is on. Used for the (B, D) conditioning path:
    its matmuls have B rows, so their cost is reading the weights, which bf16 autocast would first copy to bf16
    (read 4 + write 2 + read 2 bytes a weight instead of 4); the adaLN gates also stay in float32."""
    return torch.autocast(tensor.device.type, enabled=False)


def modulate(x, shift, scale):
    """adaLN: x (B, T, D) scaled and shifted per sample by (B, 1, D) vectors (DiT Sec. 3.2). Not torch.addcmul: it
    saves one pass in the forward but its backward adds one (it multiplies x by its scalar `value`)."""
    return x * (1 + scale) + shift


def affine_free_norm(dim):
    """LayerNorm without a learnt scale and shift: adaLN supplies them (DiT)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnt scale (Zhang & Sennrich 2019), used per head on queries and keys (the
    QK-norm of Esser et al.): it keeps attention logits bounded in bf16 and at high resolution. It runs in the
    input's dtype: CUDA autocast would run rms_norm in float32, copying q and k to float32 and back to bf16 for
    attention (four copies per stream and block); the kernel accumulates in float32 anyway."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with autocast_off(x):
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), NORM_EPS)


def attention(q, k, v):
    """Softmax attention; q (B, Tq, heads, head_dim), k and v (B, Tk, heads, head_dim) -> (B, Tq, heads * head_dim).

    SDPA takes (B, heads, T, head_dim): the transposes are views, and the flash kernel reads these strides as they
    are. It writes its output in q's memory layout, (B, Tq, heads, head_dim), so the final flatten is a view too.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)  # (B, Tq, D)


# --------------------------------------------------------------------------------------------
# Modulation: per-block adaLN-Zero (DiT) or adaLN-single (PixArt-alpha)
# --------------------------------------------------------------------------------------------

class AdaLN(nn.Linear):
    """Per-block adaLN (DiT Sec. 3.2): one linear map of SiLU(c) (B, D) to `count` modulation vectors, one matmul
    split by views into count x (B, 1, D). Zero-initialised: adaLN-Zero."""

    def __init__(self, hidden_size, count):
        super().__init__(hidden_size, count * hidden_size)
        self.count = count

    def forward(self, silu_c):
        with autocast_off(silu_c):
            return super().forward(silu_c)[:, None].chunk(self.count, dim=2)


class AdaLNSingle(nn.Module):
    """adaLN-single (PixArt-alpha Sec. 2.3): the block's learnt (count, D) table added to the first `count` of the
    shared modulation vectors (B, 6, D), computed once per forward by MLP(c). Zero-initialised, so every block
    starts as the identity, as with adaLN-Zero. A (B, 1, D) input broadcasts: PixArt's final layer adds c itself."""

    def __init__(self, hidden_size, count):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(count, hidden_size))

    def forward(self, shared):
        return (shared[:, :len(self.table)] + self.table).unsqueeze(2).unbind(1)  # count x (B, 1, D)


def make_modulation(hidden_size, count, adaln_single):
    """The modulation of one block, stream or final layer."""
    return AdaLNSingle(hidden_size, count) if adaln_single else AdaLN(hidden_size, count)


# --------------------------------------------------------------------------------------------
# Embedders: timestep, text
# --------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal embedding of scale * t (1000 t for t in [0, 1]), then a 2-layer MLP (DiT)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t, scale=TIME_SCALE):
        return self.mlp(timestep_embedding(t, scale=scale).to(self.mlp[0].weight.dtype))


class TextEmbedder(nn.Module):
    """Precomputed text embeddings (B, L, context_dim) -> context tokens (B, L, D), and a pooled vector (B, D) for
    adaLN. SD3 pools with CLIP; we pool with the mean of the L tokens, so the all-zeros "no text" context of
    classifier-free guidance pools to zeros too."""

    def __init__(self, context_dim, hidden_size):
        super().__init__()
        self.tokens = nn.Linear(context_dim, hidden_size)
        self.pooled = nn.Sequential(nn.Linear(context_dim, hidden_size), nn.SiLU(),
                                    nn.Linear(hidden_size, hidden_size))

    def pool(self, context):
        return self.pooled(context.mean(dim=1).to(self.pooled[0].weight.dtype))


# --------------------------------------------------------------------------------------------
# Blocks: one stream; the single-stream block; the joint blocks; the final layer
# --------------------------------------------------------------------------------------------

class Stream(nn.Module):
    """One stream of tokens with its own weights: modulation, norms, fused qkv with QK-norm (qk_norm=False: none,
    as DiT), output projection and MLP (Fig. 2b of Esser et al.). The attention lives in the blocks: over the
    stream itself (`DiTBlock`) or over both streams (`JointBlock`)."""

    def __init__(self, hidden_size, num_heads, adaln_single=False, qk_norm=True):
        super().__init__()
        self.num_heads = num_heads
        self.modulation = make_modulation(hidden_size, MODULATIONS, adaln_single)
        self.norm1 = affine_free_norm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = RMSNorm(hidden_size // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hidden_size // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = affine_free_norm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, MLP_RATIO * hidden_size), nn.GELU(approximate="tanh"),
                                 nn.Linear(MLP_RATIO * hidden_size, hidden_size))

    def attention_inputs(self, x, condition):
        """x (B, T, D) -> q, k, v (B, T, heads, head_dim) and the modulation still needed after attention."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(condition)  # (B, 1, D) each
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).unflatten(2, (3, self.num_heads, -1)).unbind(2)  # (B, T, heads, head_dim)
        return self.q_norm(q), self.k_norm(k), v, (gate1, shift2, scale2, gate2)

    def attention_outputs(self, x, attended, modulation):
        """The residual updates: x + gate * proj(attention), then x + gate * MLP (adaLN-Zero)."""
        gate1, shift2, scale2, gate2 = modulation
        x = x + gate1 * self.proj(attended)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiTBlock(Stream):
    """A single-stream block (DiT): the image tokens attend to themselves. Nothing is concatenated."""

    def forward(self, x, condition):
        q, k, v, modulation = self.attention_inputs(x, condition)
        return self.attention_outputs(x, attention(q, k, v), modulation)


class ContextKeysValues(nn.Module):
    """The context stream of the LAST joint block (SD3's `pre_only`): nothing reads the context tokens after the
    last attention, so they only give keys and values to the image queries. No queries, no output projection, no
    MLP, and a 2-way (shift, scale) modulation."""

    def __init__(self, hidden_size, num_heads, adaln_single=False):
        super().__init__()
        self.num_heads = num_heads
        self.modulation = make_modulation(hidden_size, 2, adaln_single)
        self.norm1 = affine_free_norm(hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.k_norm = RMSNorm(hidden_size // num_heads)

    def forward(self, context, condition):
        shift, scale = self.modulation(condition)  # (B, 1, D) each
        h = modulate(self.norm1(context), shift, scale)
        k, v = self.kv(h).unflatten(2, (2, self.num_heads, -1)).unbind(2)  # (B, L, heads, head_dim)
        return self.k_norm(k), v


class JointBlock(nn.Module):
    """An MMDiT block: both streams attend, in one attention, to the concatenation [context; image]; each stream
    then updates its own tokens (Fig. 2b of Esser et al.)."""

    def __init__(self, hidden_size, num_heads, adaln_single=False):
        super().__init__()
        self.context = Stream(hidden_size, num_heads, adaln_single)
        self.image = Stream(hidden_size, num_heads, adaln_single)

    def forward(self, context, x, condition):
        context_q, context_k, context_v, context_modulation = self.context.attention_inputs(context, condition)
        image_q, image_k, image_v, image_modulation = self.image.attention_inputs(x, condition)
        attended = attention(torch.cat([context_q, image_q], dim=1), torch.cat([context_k, image_k], dim=1),
                             torch.cat([context_v, image_v], dim=1))  # (B, L + T, D)
        context_attended, image_attended = attended.split([context.shape[1], x.shape[1]], dim=1)
        context = self.context.attention_outputs(context, context_attended, context_modulation)
        x = self.image.attention_outputs(x, image_attended, image_modulation)
        return context, x


class LastJointBlock(nn.Module):
    """The last MMDiT block: the image queries attend to [context; image] keys and values, and only the image stream
    is updated (SD3 drops the context stream's update here)."""

    def __init__(self, hidden_size, num_heads, adaln_single=False):
        super().__init__()
        self.context = ContextKeysValues(hidden_size, num_heads, adaln_single)
        self.image = Stream(hidden_size, num_heads, adaln_single)

    def forward(self, context, x, condition):
        context_k, context_v = self.context(context, condition)
        image_q, image_k, image_v, image_modulation = self.image.attention_inputs(x, condition)
        attended = attention(image_q, torch.cat([context_k, image_k], dim=1),
                             torch.cat([context_v, image_v], dim=1))  # (B, T, D)
        return self.image.attention_outputs(x, attended, image_modulation)


class FinalLayer(nn.Module):
    """adaLN (shift, scale), then a linear map of each token back to a p x p x C patch (DiT)."""

    def __init__(self, hidden_size, patch_size, out_channels, adaln_single=False):
        super().__init__()
        self.modulation = make_modulation(hidden_size, 2, adaln_single)
        self.norm = affine_free_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x, condition):
        shift, scale = self.modulation(condition)  # (B, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, p*p*C)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class MMDiT(nn.Module):
    """The LPL paper's diffusion transformer, conditioned on a class label, on text, or nothing.

    Conditioning (exactly one of num_classes / context_dim, or neither):
      num_classes   one stream of DiT blocks; the label embedding (one extra row, `null_label` = num_classes, is the
                    "no label" of classifier-free guidance) is added to the timestep embedding for adaLN (DiT).
      context_dim   SD3's two-stream MMDiT: text embeddings (B, L, context_dim) are projected to L context tokens;
                    their mean, through an MLP, is added to the timestep embedding for adaLN. The "no text" of
                    classifier-free guidance is an all-zeros context.
      neither       unconditional: one stream, adaLN from the timestep embedding alone.

    adaln_single: PixArt-alpha's adaLN-single instead of a modulation MLP per block: one shared SiLU + Linear maps c
    to the 6 modulation vectors, and each block (each stream) adds its own learnt (6, D) table; the final layer
    adds a (2, D) table to c itself. Saves 6 d^2 per block and stream.

    gradient_checkpointing (also an attribute, switchable at any time) recomputes each block's activations in the
    backward pass instead of storing them (torch.utils.checkpoint).

    qk_norm=False and out_channels (default in_channels) are for the public models' layout (`DiT` below).
    """

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                 num_classes=None, context_dim=None, adaln_single=False, gradient_checkpointing=False,
                 qk_norm=True, out_channels=None):
        super().__init__()
        if num_classes is not None and context_dim is not None:
            raise ValueError(f"MMDiT: give num_classes ({num_classes}) or context_dim ({context_dim}), not both")
        if hidden_size % num_heads:
            raise ValueError(f"MMDiT: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"MMDiT: hidden_size {hidden_size} must be a multiple of 4 (2D sin-cos embedding)")
        if input_size % patch_size:
            raise ValueError(f"MMDiT: input_size {input_size} is not a multiple of patch_size {patch_size}")
        if depth < 1:
            raise ValueError(f"MMDiT: depth must be at least 1, got {depth}")
        for name, value in (("num_classes", num_classes), ("context_dim", context_dim)):
            if value is not None and value < 1:
                raise ValueError(f"MMDiT: {name} must be positive or None, got {value}")
        self.input_size = input_size  # the training resolution in latent pixels; any size runs
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.adaln_single = bool(adaln_single)
        self.gradient_checkpointing = gradient_checkpointing
        self.qk_norm = qk_norm
        self.out_channels = out_channels or in_channels

        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes is not None:
            self.label_embedder = nn.Embedding(num_classes + 1, hidden_size)  # + the null label
        if context_dim is not None:
            self.text_embedder = TextEmbedder(context_dim, hidden_size)
        if self.adaln_single:
            self.shared_modulation = nn.Linear(hidden_size, MODULATIONS * hidden_size)
        if self.two_streams:
            self.blocks = nn.ModuleList(JointBlock(hidden_size, num_heads, adaln_single) for _ in range(depth - 1))
            self.last_block = LastJointBlock(hidden_size, num_heads, adaln_single)
        else:
            self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, adaln_single, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaln_single)
        self.initialize_weights()

    @property
    def two_streams(self):
        """A context stream exists only where there are context tokens: text models."""
        return self.context_dim is not None

    @property
    def null_label(self):
        """The label index meaning "no label" (classifier-free guidance): the extra embedding row. None for a model
        without classes, whose y is always None."""
        return self.num_classes

    @property
    def config(self):
        """The constructor arguments as plain Python values: `build_from_config(model.config)` rebuilds it."""
        config = dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                      hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                      num_classes=self.num_classes, context_dim=self.context_dim, adaln_single=self.adaln_single,
                      gradient_checkpointing=self.gradient_checkpointing)
        if not self.qk_norm or self.out_channels != self.in_channels:
            config.update(qk_norm=self.qk_norm, out_channels=self.out_channels)
        return config

    def initialize_weights(self):
        """Every special initialisation, in one place (DiT)."""
        # Linear layers (patch embedding included): Xavier-uniform weights, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Label table and timestep MLP: N(0, 0.02).
        if self.num_classes is not None:
            nn.init.normal_(self.label_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero modulations make every block the identity at initialisation, and the zero output layer
        # makes the untrained model predict exactly 0 (DiT Sec. 3.2). adaLN-single: the shared MLP and every
        # table start at zero, for the same identity (PixArt-alpha draws its tables at random instead).
        for module in self.modules():
            if isinstance(module, AdaLN):
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, AdaLNSingle):
                nn.init.zeros_(module.table)
        if self.adaln_single:
            nn.init.zeros_(self.shared_modulation.weight)
            nn.init.zeros_(self.shared_modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ---- inputs ----

    def check_inputs(self, x, t, y, context):
        """Raise a clear error for inputs this model cannot take (shapes and dtypes only: no sync)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MMDiT: x must be (batch, in_channels={self.in_channels}, height, width), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"MMDiT: x height and width must be multiples of patch_size={self.patch_size}, "
                             f"got {x.shape[2]} x {x.shape[3]}")
        batch = x.shape[0]
        if t.shape != (batch,) or not t.is_floating_point():
            raise ValueError(f"MMDiT: t must be a float tensor of shape ({batch},) in [0, 1], "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
        if self.num_classes is not None:
            if y is None or y.shape != (batch,) or y.dtype not in (torch.int32, torch.int64):
                got = "None" if y is None else f"{y.dtype} of shape {tuple(y.shape)}"
                raise ValueError(f"MMDiT: this model is class-conditional: y must be integer labels of shape "
                                 f"({batch},) in [0, {self.num_classes}] ({self.null_label} = no label), got {got}")
        elif y is not None:
            raise ValueError("MMDiT: y given, but this model has no classes (num_classes is None)")
        if self.context_dim is not None:
            if (context is None or context.ndim != 3 or context.shape[0] != batch
                    or context.shape[2] != self.context_dim):
                got = "None" if context is None else f"shape {tuple(context.shape)}"
                raise ValueError(f"MMDiT: this model is text-conditional: context must be ({batch}, tokens, "
                                 f"context_dim={self.context_dim}) (all zeros = no text), got {got}")
        elif context is not None:
            raise ValueError("MMDiT: context given, but this model takes no text (context_dim is None)")

    def embed_time(self, t):
        """t (B,) in [0, 1] -> (B, D): the sin-cos of 1000 t through the timestep MLP."""
        return self.t_embedder(t)

    def position_embedding(self, grid_height, grid_width, like):
        """(T, D) sin-cos embedding of the patch grid, in the dtype of `like` (see sincos_position_embedding)."""
        return sincos_position_embedding(grid_height, grid_width, self.hidden_size, like.device, like.dtype)

    def embed_condition(self, t, y, context):
        """-> c (B, D) for adaLN: the timestep embedding, plus the label's (DiT) or the pooled text's (SD3). In the
        parameters' dtype, outside autocast (see `autocast_off`)."""
        with autocast_off(t):
            c = self.embed_time(t)  # (B, D)
            if self.num_classes is not None:
                c = c + self.label_embedder(y)
            if self.context_dim is not None:
                c = c + self.text_embedder.pool(context)
        return c

    def modulation_inputs(self, c):
        """What the modulations read: SiLU(c) everywhere with per-block adaLN (DiT); with adaLN-single, the shared
        modulation (B, 6, D) in the blocks and c itself in the final layer (PixArt-alpha's T2IFinalLayer)."""
        with autocast_off(c):
            silu_c = F.silu(c)
            if self.adaln_single:
                return self.shared_modulation(silu_c).unflatten(1, (MODULATIONS, -1)), c[:, None]
        return silu_c, silu_c

    # ---- forward ----

    def run_block(self, block, *inputs):
        """block(*inputs), or its checkpointed version while training with gradient_checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def forward(self, x, t, y=None, context=None):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) or context (B, L, context_dim) -> (B, C, H, W)."""
        self.check_inputs(x, t, y, context)
        _, _, height, width = x.shape
        grid_height, grid_width = height // self.patch_size, width // self.patch_size
        x = self.x_embedder(patchify(x, self.patch_size))  # (B, T, D)
        # in the parameters' dtype: under autocast the residual stream stays float32
        x = x + self.position_embedding(grid_height, grid_width, self.x_embedder.weight)
        block_condition, final_condition = self.modulation_inputs(self.embed_condition(t, y, context))
        if self.two_streams:
            context = self.text_embedder.tokens(context)  # (B, L, D)
            for block in self.blocks:
                context, x = self.run_block(block, context, x, block_condition)
            x = self.run_block(self.last_block, context, x, block_condition)
        else:
            for block in self.blocks:
                x = self.run_block(block, x, block_condition)  # (B, T, D)
        x = self.final_layer(x, final_condition)  # (B, T, p*p*C)
        return unpatchify(x, self.patch_size, grid_height, grid_width)  # (B, C, H, W)

    # ---- cost ----

    def flops_per_forward(self, batch_size, image_tokens=None, context_tokens=None):
        """Matmul FLOPs of one forward pass, counted from the shapes: 2 * m * n * k for every linear layer (m = rows:
        tokens, or samples for the adaLN and embedding MLPs), plus 2 * B * Tq * Tk * D for each of Q K^T and A V.
        Norms, activations, lookups and additions are left out, as MFU conventionally does. A training step is
        about 3x this (the backward pass costs twice the forward).

        image_tokens defaults to the input_size grid, (input_size / patch_size)^2; context_tokens (the L of the
        text) must be given for a text model, and only for a text model: the others have no context stream.
        """
        if image_tokens is None:
            image_tokens = (self.input_size // self.patch_size) ** 2
        if self.two_streams and context_tokens is None:
            raise ValueError("flops_per_forward: a text model needs context_tokens (the L of its context)")
        if not self.two_streams and context_tokens is not None:
            raise ValueError("flops_per_forward: context_tokens given, but this model has no context stream")
        b, d, p_c = batch_size, self.hidden_size, self.patch_size ** 2 * self.in_channels

        def linear(rows, fan_in, fan_out):
            return 2 * rows * fan_in * fan_out

        def adaln(count):  # a per-block modulation; adaLN-single adds a table instead
            return 0 if self.adaln_single else linear(b, d, count * d)

        def stream(rows):  # modulation, qkv, output projection, MLP
            return (adaln(MODULATIONS) + linear(rows, d, 3 * d) + linear(rows, d, d)
                    + linear(rows, d, MLP_RATIO * d) + linear(rows, MLP_RATIO * d, d))

        def attention_flops(queries, keys):  # Q K^T and A V over all heads
            return 2 * 2 * b * queries * keys * d

        flops = linear(b * image_tokens, p_c, d)  # patch embedding
        flops += linear(b, TIMESTEP_FREQUENCIES, d) + linear(b, d, d)  # timestep MLP
        if self.adaln_single:
            flops += linear(b, d, MODULATIONS * d)  # the shared modulation
        flops += adaln(2) + linear(b * image_tokens, d, self.patch_size ** 2 * self.out_channels)  # final layer
        if not self.two_streams:
            block = stream(b * image_tokens) + attention_flops(image_tokens, image_tokens)
            return flops + self.depth * block
        flops += linear(b * context_tokens, self.context_dim, d)  # context tokens
        flops += linear(b, self.context_dim, d) + linear(b, d, d)  # pooled MLP
        tokens = image_tokens + context_tokens
        joint_block = stream(b * context_tokens) + stream(b * image_tokens) + attention_flops(tokens, tokens)
        last_block = (adaln(2) + linear(b * context_tokens, d, 2 * d)
                      + stream(b * image_tokens) + attention_flops(image_tokens, tokens))
        return flops + (self.depth - 1) * joint_block + last_block


# --------------------------------------------------------------------------------------------
# The public class-conditional ImageNet models: DiT, SiT and REPA's SiT
# --------------------------------------------------------------------------------------------

BACKBONES = ("dit", "sit", "repa")
FILE_FORMATS = BACKBONES + ("diffusers-dit",)  # what --backbone may say a file holds
DDPM_STEPS = 1000  # DiT's training steps


def network_time(backbone, t):
    """This repository's t (in [0, 1], t = 0 clean) -> the time the original network embeds (not scaled by 1000):
      dit   its DDPM step k in 0..999, t = (k + 1) / 1000. A grid time lands exactly on its integer k: 1000 t,
            rounded in float32, is snapped back to the integer within 1e-3 of it (10 of the 1000 grid times miss
            it by one ulp otherwise); times between grid points stay fractional, as DiT's network takes them.
      sit   SiT's time, 1 - t: SiT's x_t = t x_0 + (1 - t) eps has t = 1 at the data.
      repa  t itself: REPA's x_t = (1 - t) x_0 + t eps is this repository's Flow-OT."""
    if backbone == "dit":
        steps = DDPM_STEPS * t
        snapped = steps.round()
        return torch.where((steps - snapped).abs() < 1e-3, snapped, steps) - 1
    if backbone == "sit":
        return 1 - t
    return t


def our_prediction(backbone, output, in_channels):
    """The original network's output -> this repository's prediction for the backbone's objective (Table 1):
      dit   eps, followed by its variance channels (DiT's learned range, schedules.learned_log_variance): as is
      sit   the first half of its 8 channels (SiT's forward drops the second, unused half) is its velocity
            d x_t / d t_SiT = x_0 - eps; in this repository's time that is eps - x_0, the Flow-OT target: negated
      repa  the velocity eps - x_0: as is"""
    if backbone == "sit":
        return -output[:, :in_channels]
    return output


def backbone_diffusion(backbone):
    """The process each public model was trained on, in this repository's form: DiT is DDPM-eps with the linear
    betas 1e-4..0.02 over 1000 steps (no zero terminal SNR); SiT and REPA are Flow-OT (their linear interpolant) with
    times drawn uniformly and no resolution shift."""
    if backbone == "dit":
        return Diffusion("eps", num_steps=DDPM_STEPS, beta_schedule="linear", zero_terminal_snr=False)
    return Diffusion("flow", time_sampling="uniform", shift=1.0)


class DiT(MMDiT):
    """The block layout of the public class-conditional ImageNet models, exact to their code (facebookresearch/DiT
    models.py, willisma/SiT models.py, sihyun-yu/REPA models/sit.py): the one-stream MMDiT above with
      - no QK-norm, and the checkpoint's output channels (DiT and SiT: 8, eps or velocity then 4 more);
      - their fixed sin-cos position embedding as the (1, T, D) buffer `pos_embed` they store, for their grid;
      - their time embedding: the sin-cos of `network_time`, not of 1000 t.
    Their patch embedding is a stride-p convolution; here it is the same map as a linear layer on patchified
    latents (load_backbone and backbone_state_dict convert the weight exactly). forward(x, t, y) speaks this
    repository's convention (t in [0, 1], t = 0 clean; the prediction of backbone_diffusion(backbone).objective,
    our_prediction), so LPL, validation and the samplers take these models unchanged."""

    def __init__(self, backbone, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                 num_classes=1000, out_channels=None, gradient_checkpointing=False):
        if backbone not in BACKBONES:
            raise ValueError(f"DiT: backbone must be one of {BACKBONES}, got {backbone!r}")
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes=num_classes,
                         gradient_checkpointing=gradient_checkpointing, qk_norm=False, out_channels=out_channels)
        self.backbone = backbone
        grid = input_size // patch_size
        position = sincos_position_embedding(grid, grid, hidden_size, "cpu", torch.float64)
        self.register_buffer("pos_embed", position.float()[None])  # (1, T, D), float32 as they store it
        self.unused = {}  # {key: tensor} of the checkpoint that this model does not run (REPA's projectors)
        self.source_keys = None  # the checkpoint's keys, in its order: export writes them back so

    @property
    def config(self):
        return dict(backbone=self.backbone, input_size=self.input_size, patch_size=self.patch_size,
                    in_channels=self.in_channels, hidden_size=self.hidden_size, depth=self.depth,
                    num_heads=self.num_heads, num_classes=self.num_classes, out_channels=self.out_channels,
                    gradient_checkpointing=self.gradient_checkpointing)

    def embed_time(self, t):
        return self.t_embedder(network_time(self.backbone, t), scale=1)

    def position_embedding(self, grid_height, grid_width, like):
        grid = self.input_size // self.patch_size
        if (grid_height, grid_width) != (grid, grid):
            raise ValueError(f"DiT: this {self.backbone} model stores the position embedding of a {grid} x {grid} "
                             f"patch grid (input_size {self.input_size}), got {grid_height} x {grid_width}")
        return self.pos_embed[0].to(like.dtype)

    def forward(self, x, t, y=None, context=None):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) -> the prediction (B, C, H, W), and for DiT its variance
        channels after it (B, 2C, H, W)."""
        return our_prediction(self.backbone, super().forward(x, t, y, context), self.in_channels)


def build_from_config(config):
    """The model of a checkpoint's `model_config`: a DiT when it names a backbone, else an MMDiT."""
    return DiT(**config) if "backbone" in config else MMDiT(**config)


# Their state dict -> ours: (pattern, replacement), applied in order. The patch embedding's convolution weight is
# reshaped besides (conv_to_linear); REPA's `projectors.*` (its alignment heads) are kept aside, not run.
ORIGINAL_TO_OURS = [
    (r"^x_embedder\.proj\.", "x_embedder."),
    (r"^y_embedder\.embedding_table\.", "label_embedder."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.0."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.2."),
    (r"^(blocks\.\d+|final_layer)\.adaLN_modulation\.1\.", r"\1.modulation."),
]
OURS_TO_ORIGINAL = [
    (r"^x_embedder\.", "x_embedder.proj."),
    (r"^label_embedder\.", "y_embedder.embedding_table."),
    (r"^blocks\.(\d+)\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^blocks\.(\d+)\.proj\.", r"blocks.\1.attn.proj."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.2\.", r"blocks.\1.mlp.fc2."),
    (r"^(blocks\.\d+|final_layer)\.modulation\.", r"\1.adaLN_modulation.1."),
]
# hidden size -> (heads, name): DiT's Table 1 sizes; heads cannot be read from a state dict's shapes
HEADS_OF_WIDTH = {384: (6, "S"), 768: (12, "B"), 1024: (16, "L"), 1152: (16, "XL")}


def rename(key, rules):
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def conv_to_linear(weight):
    """Their patch embedding Conv2d weight (D, C, p, p) -> the equal linear map on patchify's (p, p, C) order."""
    return weight.permute(0, 2, 3, 1).flatten(1)


def linear_to_conv(weight, patch_size):
    return weight.unflatten(1, (patch_size, patch_size, -1)).permute(0, 3, 1, 2)


def read_backbone_file(path):
    """(tensors, what was taken) of a released file: a bare state dict (.pt, .pth, .safetensors), or a training
    checkpoint of DiT, SiT or REPA ({"model", "ema", "opt", "args"}), whose EMA weights are taken."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as file:
        is_safetensors = file.read(9)[8:9] == b"{"
    if is_safetensors:
        return load_safetensors(path)[0], "its tensors"
    try:  # their training checkpoints hold an argparse.Namespace beside the tensors
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise UserError(f"{path} is not a checkpoint torch.load(weights_only=True) can read: "
                        f"{' '.join(str(error).split())[:300]}") from None
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        return state["ema"], "its 'ema' weights"
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state["model"], "its 'model' weights (it holds no 'ema')"
    if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        return state, "its state dict"
    raise UserError(f"{path} holds neither a state dict nor a training checkpoint with 'ema' or 'model' weights")


def read_diffusers_dit(path):
    """The original DiT layout of a diffusers DiTTransformer2DModel folder (facebook/DiT-XL-2-256's `transformer/`,
    or a pipeline folder holding it): a renaming, one copy of the embedders that diffusers repeats in every block
    (refused unless every copy is the same), q, k and v fused into qkv, and the position embedding diffusers does
    not store computed as DiT does. The weights are DiT's; diffusers' own model does not compute what DiT's code
    does with them (its timestep frequencies divide by 127 instead of 128, its block norms use eps 1e-5): loaded
    here they run as DiT's code runs them."""
    folder = Path(path)
    folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
    config_path, weights_path = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        raise UserError(f"{path}: a diffusers DiT folder holds config.json and diffusion_pytorch_model.safetensors "
                        "(in it or in its transformer/ sub-folder)")
    config = json.loads(config_path.read_text())
    tensors = load_safetensors(weights_path)[0]
    depth = config["num_layers"]
    state = {"x_embedder.proj.weight": tensors["pos_embed.proj.weight"],
             "x_embedder.proj.bias": tensors["pos_embed.proj.bias"]}
    shared = {"t_embedder.mlp.0.": "norm1.emb.timestep_embedder.linear_1.",
              "t_embedder.mlp.2.": "norm1.emb.timestep_embedder.linear_2.",
              "y_embedder.embedding_table.": "norm1.emb.class_embedder.embedding_table."}
    for ours, theirs in shared.items():
        for suffix in ("weight", "bias") if "mlp" in ours else ("weight",):
            copies = [tensors[f"transformer_blocks.{i}.{theirs}{suffix}"] for i in range(depth)]
            if any(not torch.equal(copy, copies[0]) for copy in copies):
                raise UserError(f"{path}: the per-block copies of {theirs}{suffix} differ: not a converted DiT")
            state[ours + suffix] = copies[0]
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        for suffix in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(
                [tensors[f"{block}attn1.to_{x}.{suffix}"] for x in "qkv"])
            state[f"blocks.{i}.attn.proj.{suffix}"] = tensors[f"{block}attn1.to_out.0.{suffix}"]
            state[f"blocks.{i}.mlp.fc1.{suffix}"] = tensors[f"{block}ff.net.0.proj.{suffix}"]
            state[f"blocks.{i}.mlp.fc2.{suffix}"] = tensors[f"{block}ff.net.2.{suffix}"]
            state[f"blocks.{i}.adaLN_modulation.1.{suffix}"] = tensors[f"{block}norm1.linear.{suffix}"]
    for suffix in ("weight", "bias"):
        state[f"final_layer.adaLN_modulation.1.{suffix}"] = tensors[f"proj_out_1.{suffix}"]
        state[f"final_layer.linear.{suffix}"] = tensors[f"proj_out_2.{suffix}"]
    grid = config["sample_size"] // config["patch_size"]
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    state["pos_embed"] = sincos_position_embedding(grid, grid, hidden, "cpu", torch.float64).float()[None]
    return state, "the diffusers DiT layout, converted to DiT's"


def layout_of(tensors, path):
    """The DiT constructor arguments that a state dict in their layout implies (heads from the width)."""
    required = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [key for key in required if key not in tensors]
    if missing:
        raise UserError(f"{path} is not in the DiT/SiT/REPA layout: it has no {missing} (found {list(tensors)[:8]})")
    hidden_size, in_channels, patch_size, _ = tensors["x_embedder.proj.weight"].shape
    if hidden_size not in HEADS_OF_WIDTH:
        raise UserError(f"{path}: hidden size {hidden_size} is none of DiT's sizes {sorted(HEADS_OF_WIDTH)}, whose "
                        "head counts are known (a state dict does not record them)")
    grid = math.isqrt(tensors["pos_embed"].shape[1])
    return dict(input_size=grid * patch_size, patch_size=patch_size, in_channels=in_channels,
                hidden_size=hidden_size, num_heads=HEADS_OF_WIDTH[hidden_size][0],
                depth=len({key.split(".")[1] for key in tensors if key.startswith("blocks.")}),
                num_classes=tensors["y_embedder.embedding_table.weight"].shape[0] - 1,
                out_channels=tensors["final_layer.linear.weight"].shape[0] // patch_size ** 2)


def load_backbone(path, backbone, log=print):
    """A released DiT, SiT or REPA checkpoint -> (model, diffusion), the model speaking this repository's
    convention (see DiT) and the process it was trained on (backbone_diffusion). Strict: every key is used, or
    listed as not used (REPA's projectors: its alignment loss needs a DINOv2 encoder this project does not carry)."""
    if backbone not in FILE_FORMATS:
        raise UserError(f"backbone must be one of {FILE_FORMATS}, got {backbone!r}")
    if backbone == "diffusers-dit":
        tensors, taken = read_diffusers_dit(path)
        backbone = "dit"
    else:
        tensors, taken = read_backbone_file(path)
    unused = {key: value for key, value in tensors.items() if key.startswith("projectors.")}
    config = layout_of(tensors, path)
    expected_out = config["in_channels"] * (1 if backbone == "repa" else 2)
    if config["out_channels"] != expected_out:
        raise UserError(f"{path} has {config['out_channels']} output channels; a {backbone} checkpoint has "
                        f"{expected_out} (DiT and SiT learn_sigma: 2 x {config['in_channels']}; REPA: "
                        f"{config['in_channels']}). Is --backbone right?")
    weights = {rename(key, ORIGINAL_TO_OURS): value for key, value in tensors.items() if key not in unused}
    weights["x_embedder.weight"] = conv_to_linear(weights["x_embedder.weight"])
    model = DiT(backbone, **config)
    try:
        model.load_state_dict({key: value.float() for key, value in weights.items()})
    except RuntimeError as error:  # strict: the message lists every missing and unexpected key
        raise UserError(f"{path} does not fit the {backbone} layout: {' '.join(str(error).split())}") from None
    model.unused, model.source_keys = unused, list(tensors)
    name = HEADS_OF_WIDTH[config["hidden_size"]][1]
    log(f"{path}: {taken}, read as {backbone} {name}/{config['patch_size']} ({config['depth']} blocks, width "
        f"{config['hidden_size']}, {config['in_channels']}x{config['input_size']}x{config['input_size']} latents, "
        f"{config['num_classes']} classes, {config['out_channels']} output channels)"
        + (f"; not used: {len(unused)} tensors of REPA's projectors" if unused else ""))
    return model.eval(), backbone_diffusion(backbone)


def backbone_state_dict(model, backbone):
    """model's weights in the original layout, what `python model.py export` writes and their sample_ddp.py loads;
    for a model loaded from a file, that file's tensors in its order (REPA's projectors included)."""
    if getattr(model, "backbone", None) != backbone:
        raise ValueError(f"backbone_state_dict: this model is {getattr(model, 'backbone', 'an MMDiT')}, not {backbone}")
    state = {}
    for key, value in model.state_dict().items():
        if key == "x_embedder.weight":
            value = linear_to_conv(value, model.patch_size)
        state[rename(key, OURS_TO_ORIGINAL)] = value
    state.update(model.unused)
    order = getattr(model, "source_keys", None) or list(state)
    return {key: state[key] for key in order}


# --------------------------------------------------------------------------------------------
# Named sizes
# --------------------------------------------------------------------------------------------

# DiT's depth / width / heads (Peebles & Xie 2023, Table 1), and the paper's (Sec. 4.1: 28 blocks, hidden size 1536;
# 24 heads of width 64, as in SD3; adaLN-single for its 796M parameters, see the module docstring).
MODELS = {
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "paper": dict(depth=28, hidden_size=1536, num_heads=24, patch_size=2, adaln_single=True),
    "demo": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),  # train.py's CPU demo: minutes, not a result
}
# The public models' layout (DiT above), at DiT's sizes: DiT-XL/2 is DiT's, SiT-XL/2 SiT's, REPA-XL/2 REPA's SiT.
for family, backbone in (("DiT", "dit"), ("SiT", "sit"), ("REPA", "repa")):
    for width, (heads, size) in HEADS_OF_WIDTH.items():
        depth = {"S": 12, "B": 12, "L": 24, "XL": 28}[size]
        MODELS[f"{family}-{size}/2"] = dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=2,
                                            backbone=backbone)


def build_model(name, **overrides):
    """The model of a named size; overrides (input_size, in_channels, num_classes, ...) are passed on and win over
    the named size. The DiT / SiT / REPA sizes are class-conditional, with their output channels (DiT and SiT
    learn_sigma: twice the latent channels)."""
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}, expected one of {list(MODELS)}")
    config = {**MODELS[name], **overrides}
    if "backbone" in config:
        if config.pop("context_dim", None) is not None or not config.get("num_classes"):
            raise ValueError(f"build_model: {name} is class-conditional: it needs num_classes and takes no context")
        in_channels = config.get("in_channels", 4)
        config.setdefault("out_channels", in_channels * (1 if config["backbone"] == "repa" else 2))
    return build_from_config(config)


def parameter_breakdown(model):
    """[(part, parameters, detail)]: each top-level part; for the blocks, one block split into modulation,
    attention (qkv, QK-norm, projection) and MLP."""
    rows = []
    for name, part in model.named_children():
        count = sum(p.numel() for p in part.parameters())
        detail = ""
        if name == "blocks":
            kinds = {"modulation": 0, "attention": 0, "mlp": 0}
            for key, parameter in part[0].named_parameters():
                kinds[next((kind for kind in ("modulation", "mlp") if kind in key), "attention")] += parameter.numel()
            detail = (f"{len(part)} x {count // len(part):,}: "
                      + ", ".join(f"{kind} {n:,}" for kind, n in kinds.items()))
        rows.append((name, count, detail))
    return rows


def export(argv):
    """`python model.py export --ckpt RUN/checkpoints/last.pt --out FILE.pt`: the EMA weights (--raw: the trained
    ones) of a train.py run of a DiT / SiT / REPA model, in the original layout (backbone_state_dict) as a bare state
    dict, as they release theirs: their sample_ddp.py and ADM's evaluator run on it unchanged."""
    parser = argparse.ArgumentParser(prog="model.py export", description=export.__doc__)
    parser.add_argument("--ckpt", required=True, help="a train.py checkpoint of a DiT / SiT / REPA model")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    parser.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")
    args = parser.parse_args(argv)
    with one_line_errors("model.py export: "):
        checkpoint = load_checkpoint(args.ckpt)
        config = checkpoint["model_config"]
        if "backbone" not in config:
            raise UserError(f"--ckpt {args.ckpt} holds an MMDiT, not a DiT / SiT / REPA model: nothing to export to")
        model = build_from_config(config)
        model.load_state_dict(checkpoint["model" if args.raw else "ema"])
        model.unused = dict(checkpoint.get("backbone_unused") or {})
        model.source_keys = checkpoint.get("backbone_keys")
        state = backbone_state_dict(model, config["backbone"])
        with atomic_output(args.out) as temporary:
            torch.save(state, temporary)
    print(f"wrote {args.out}: {len(state)} tensors of the {config['backbone']} layout "
          f"({'trained' if args.raw else 'EMA'} weights of step {checkpoint['step']})")
    return state


def main(argv=None):
    """`python model.py --model NAME`: parameters and FLOPs of a size; `python model.py export ...`: see export."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return export(argv[1:])
    parser = argparse.ArgumentParser(description="Parameters (per part) and forward FLOPs of a model size "
                                                 "(`python model.py export -h`: a post-trained DiT in its own format).")
    parser.add_argument("--model", choices=list(MODELS), default="paper")
    parser.add_argument("--input-size", type=int, default=32, help="latent height = width (32: 256 px, SD-VAE)")
    parser.add_argument("--in-channels", type=int, default=4, help="latent channels (4: SD-VAE)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help=f"classes (default {IMAGENET_CLASSES} without --context-dim; 0: unconditional)")
    parser.add_argument("--context-dim", type=int, default=None, help="text-conditional with this embedding width")
    parser.add_argument("--context-tokens", type=int, default=None, help="text tokens L, for the FLOPs")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size, for the FLOPs")
    args = parser.parse_args(argv)
    num_classes = args.num_classes
    if num_classes is None and args.context_dim is None:
        num_classes = IMAGENET_CLASSES
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(args.model, input_size=args.input_size, in_channels=args.in_channels,
                            num_classes=num_classes or None, context_dim=args.context_dim)
    parameters = sum(p.numel() for p in model.parameters())
    flops = model.flops_per_forward(args.batch_size, context_tokens=args.context_tokens)
    print(f"{args.model}: {parameters:,} parameters ({parameters / 1e6:.1f}M); "
          f"{flops / 1e9:.2f} GFLOPs per forward at batch {args.batch_size}")
    for name, count, detail in parameter_breakdown(model):
        print(f"  {name:<18} {count:>13,}  {100 * count / parameters:5.1f}%  {detail}")
    return parameters, flops


if __name__ == "__main__":
    main()
