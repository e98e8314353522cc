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
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def timestep_embedding(t, dim=TIMESTEP_FREQUENCIES, max_period=10000):
    """Sinusoidal embedding (B,) -> (B, dim) of 1000 * t, the DDPM step range (DiT, Ho et al.), in t's dtype
    (at least float32: bf16 cannot resolve 1000 * t)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) / half * torch.arange(half, device=t.device, dtype=dtype))
    angles = (TIME_SCALE * t.to(dtype))[:, None] * frequencies  # (B, dim/2)
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
    """t (B,) in [0, 1] -> (B, D): sinusoidal embedding of 1000 * t, then a 2-layer MLP (DiT)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


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
    """One stream of tokens with its own weights: modulation, norms, fused qkv with QK-norm, output projection and
    MLP (Fig. 2b of Esser et al.). The attention lives in the blocks: over the stream itself (`DiTBlock`) or over
    both streams (`JointBlock`)."""

    def __init__(self, hidden_size, num_heads, adaln_single=False):
        super().__init__()
        self.num_heads = num_heads
        self.modulation = make_modulation(hidden_size, MODULATIONS, adaln_single)
        self.norm1 = affine_free_norm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = RMSNorm(hidden_size // num_heads)
        self.k_norm = RMSNorm(hidden_size // num_heads)
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
    """

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                 num_classes=None, context_dim=None, adaln_single=False, gradient_checkpointing=False):
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
            self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, adaln_single) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, adaln_single)
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
        """The constructor arguments as plain Python values: `MMDiT(**model.config)` rebuilds it."""
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    num_classes=self.num_classes, context_dim=self.context_dim, adaln_single=self.adaln_single,
                    gradient_checkpointing=self.gradient_checkpointing)

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

    def embed_condition(self, t, y, context):
        """-> c (B, D) for adaLN: the timestep embedding, plus the label's (DiT) or the pooled text's (SD3). In the
        parameters' dtype, outside autocast (see `autocast_off`)."""
        with autocast_off(t):
            c = self.t_embedder(t)  # (B, D)
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
        x = x + sincos_position_embedding(grid_height, grid_width, self.hidden_size, x.device,
                                          self.x_embedder.weight.dtype)
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
        flops += adaln(2) + linear(b * image_tokens, d, p_c)  # final layer
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


def build_model(name, **overrides):
    """MMDiT of a named size; overrides (input_size, in_channels, num_classes, ...) are passed on and win over the
    named size."""
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}, expected one of {list(MODELS)}")
    return MMDiT(**{**MODELS[name], **overrides})


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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Parameters (per part) and forward FLOPs of an MMDiT size.")
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
