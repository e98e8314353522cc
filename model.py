"""A handwritten MMDiT: the joint-attention diffusion transformer of SD3 (Esser et al. 2024),
as used by the LPL paper (Berrada et al., ICLR 2025, Sec. 4.1).

Two streams of tokens, the context (a class label or text embeddings) and the image (2x2
latent patches), each with its own weights, meet in ONE attention over [context; image] in
every block (Fig. 2b of Esser et al.). Everything else is DiT (Peebles & Xie 2023):
sin-cos position embedding, sinusoidal timestep embedding, adaLN-Zero modulation.

    forward(x, t, y=None, context=None) -> a tensor shaped like x
        x        (B, in_channels, H, W) latents, H and W multiples of patch_size (any size)
        t        (B,) float in [0, 1], t = 0 is clean; embedded as sin-cos of 1000 * t
        y        (B,) integer labels of a class model; y == model.null_label is the
                 "no label" of classifier-free guidance
        context  (B, L, context_dim) precomputed text embeddings of a text model; the
                 "no text" of classifier-free guidance is an all-zeros context

Print the parameter count and the forward FLOPs of a named size (built on the meta device,
so instantly, even for the largest):

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


# --------------------------------------------------------------------------------------------
# Helpers: patches, position and time embeddings, modulation
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


def sincos_position_embedding(grid_height, grid_width, dim, device):
    """Fixed 2D sin-cos embedding of a patch grid (DiT, MAE), computed for any grid size.

    The first half of the channels encodes the row, the second half the column, each as
    [sin, cos] of position * 10000^(-k / (dim / 4)). Positions are integers 0, 1, ... so a
    larger image extends the grid: a model trained at 256 px (16 x 16 patches) keeps its
    16 x 16 corner when post-trained at 512 px. No parameter: a checkpoint is resolution-free.
    """
    quarter = dim // 4
    frequencies = 10000.0 ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(grid_height, device=device, dtype=torch.float32)[:, None] * frequencies
    cols = torch.arange(grid_width, device=device, dtype=torch.float32)[:, None] * frequencies
    rows = torch.cat([rows.sin(), rows.cos()], dim=1)  # (h, dim/2)
    cols = torch.cat([cols.sin(), cols.cos()], dim=1)  # (w, dim/2)
    grid = torch.cat([rows[:, None].expand(-1, grid_width, -1),
                      cols[None, :].expand(grid_height, -1, -1)], dim=2)  # (h, w, dim)
    return grid.flatten(0, 1)  # (h*w, dim), the order of `patchify`


def timestep_embedding(t, dim=TIMESTEP_FREQUENCIES, max_period=10000):
    """Sinusoidal embedding (B,) -> (B, dim) of 1000 * t, the DDPM step range (DiT, Ho et al.)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (TIME_SCALE * t.float())[:, None] * frequencies  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x, shift, scale):
    """adaLN: x (B, T, D) scaled and shifted per sample by (B, 1, D) vectors (DiT Sec. 3.2)."""
    return x * (1 + scale) + shift


def affine_free_norm(dim):
    """LayerNorm without a learnt scale and shift: adaLN supplies them (DiT)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnt scale (Zhang & Sennrich 2019), used per head on
    queries and keys (the QK-norm of Esser et al.): it keeps attention logits bounded in
    bf16 and at high resolution. The scale is cast to the input's dtype so bf16 autocast takes the fused kernel."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), NORM_EPS)


def joint_attention(q, k, v):
    """One softmax attention; q (B, Tq, heads, head_dim), k and v (B, Tk, heads, head_dim).

    SDPA wants (B, heads, T, head_dim): the transposes are views, and the flash kernel reads
    these strides as they are. Returns (B, Tq, heads * head_dim).
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)  # (B, Tq, D)


# --------------------------------------------------------------------------------------------
# Embedders: timestep, class label, text
# --------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, D): sinusoidal embedding of 1000 * t, then a 2-layer MLP (DiT)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t))


class TextEmbedder(nn.Module):
    """Precomputed text embeddings (B, L, context_dim) -> context tokens (B, L, D) and a pooled
    vector (B, D) for adaLN. SD3 pools with CLIP; we pool with the mean of the L tokens, so the
    all-zeros "no text" context of classifier-free guidance pools to zeros too."""

    def __init__(self, context_dim, hidden_size):
        super().__init__()
        self.tokens = nn.Linear(context_dim, hidden_size)
        self.pooled = nn.Sequential(nn.Linear(context_dim, hidden_size), nn.SiLU(),
                                    nn.Linear(hidden_size, hidden_size))

    def forward(self, context):
        return self.tokens(context), self.pooled(context.mean(dim=1))


# --------------------------------------------------------------------------------------------
# Blocks: one stream, the last block's context stream, the joint blocks, the final layer
# --------------------------------------------------------------------------------------------

class Stream(nn.Module):
    """One stream (context or image) of a joint block, with its own weights: adaLN-Zero
    modulation, norms, fused qkv with QK-norm, output projection and MLP (Fig. 2b of Esser et
    al.). The attention between the streams lives in `JointBlock`."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.modulation = nn.Linear(hidden_size, 6 * hidden_size)
        self.norm1 = affine_free_norm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = RMSNorm(hidden_size // num_heads)
        self.k_norm = RMSNorm(hidden_size // num_heads)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = affine_free_norm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, MLP_RATIO * hidden_size), nn.GELU(approximate="tanh"),
                                 nn.Linear(MLP_RATIO * hidden_size, hidden_size))

    def attention_inputs(self, x, silu_c):
        """x (B, T, D), silu_c (B, D) -> q, k, v (B, T, heads, head_dim) and the modulation
        still needed after attention. The modulation is computed once, as one matmul."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(silu_c)[:, None].chunk(6, dim=2)  # (B, 1, D)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).unflatten(2, (3, self.num_heads, -1)).unbind(2)  # (B, T, heads, head_dim)
        return self.q_norm(q), self.k_norm(k), v, (gate1, shift2, scale2, gate2)

    def attention_outputs(self, x, attention, modulation):
        """The residual updates: x + gate * proj(attention), then x + gate * MLP (adaLN-Zero)."""
        gate1, shift2, scale2, gate2 = modulation
        x = x + gate1 * self.proj(attention)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class ContextKeysValues(nn.Module):
    """The context stream of the LAST block (SD3's `pre_only`): nothing reads the context tokens
    after the last attention, so they only give keys and values to the image queries. No queries,
    no output projection, no MLP, and a 2-way (shift, scale) modulation."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.norm1 = affine_free_norm(hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.k_norm = RMSNorm(hidden_size // num_heads)

    def forward(self, context, silu_c):
        shift, scale = self.modulation(silu_c)[:, None].chunk(2, dim=2)  # (B, 1, D)
        h = modulate(self.norm1(context), shift, scale)
        k, v = self.kv(h).unflatten(2, (2, self.num_heads, -1)).unbind(2)  # (B, L, heads, head_dim)
        return self.k_norm(k), v


class JointBlock(nn.Module):
    """An MMDiT block: both streams attend, in one attention, to the concatenation
    [context; image]; each stream then updates its own tokens (Fig. 2b of Esser et al.)."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.context = Stream(hidden_size, num_heads)
        self.image = Stream(hidden_size, num_heads)

    def forward(self, context, x, silu_c):
        context_q, context_k, context_v, context_modulation = self.context.attention_inputs(context, silu_c)
        image_q, image_k, image_v, image_modulation = self.image.attention_inputs(x, silu_c)
        attention = joint_attention(torch.cat([context_q, image_q], dim=1), torch.cat([context_k, image_k], dim=1),
                                    torch.cat([context_v, image_v], dim=1))  # (B, L + T, D)
        context_attention, image_attention = attention.split([context.shape[1], x.shape[1]], dim=1)
        context = self.context.attention_outputs(context, context_attention, context_modulation)
        x = self.image.attention_outputs(x, image_attention, image_modulation)
        return context, x


class LastJointBlock(nn.Module):
    """The last MMDiT block: the image queries attend to [context; image] keys and values, and
    only the image stream is updated (SD3 drops the context stream's update here)."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.context = ContextKeysValues(hidden_size, num_heads)
        self.image = Stream(hidden_size, num_heads)

    def forward(self, context, x, silu_c):
        context_k, context_v = self.context(context, silu_c)
        image_q, image_k, image_v, image_modulation = self.image.attention_inputs(x, silu_c)
        attention = joint_attention(image_q, torch.cat([context_k, image_k], dim=1),
                                    torch.cat([context_v, image_v], dim=1))  # (B, T, D)
        return self.image.attention_outputs(x, attention, image_modulation)


class FinalLayer(nn.Module):
    """adaLN (shift, scale), then a linear map of each token back to a p x p x C patch (DiT)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.norm = affine_free_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x, silu_c):
        shift, scale = self.modulation(silu_c)[:, None].chunk(2, dim=2)  # (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, p*p*C)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class MMDiT(nn.Module):
    """SD3's multi-modal diffusion transformer, conditioned on a class label, on text, or nothing.

    Conditioning (exactly one of num_classes / context_dim, or neither):
      num_classes   the label embedding (one extra row, `null_label` = num_classes, is the
                    "no label" of classifier-free guidance) is added to the timestep embedding
                    for adaLN AND is the single context token the image attends to.
      context_dim   text embeddings (B, L, context_dim) are projected to L context tokens; their
                    mean, through an MLP, is added to the timestep embedding for adaLN. The
                    "no text" of classifier-free guidance is an all-zeros context.
      neither       unconditional: one learnt context token, the same for every sample (a
                    one-class model), so every block keeps both streams.

    gradient_checkpointing (also an attribute, switchable at any time) recomputes each block's
    activations in the backward pass instead of storing them (torch.utils.checkpoint).
    """

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                 num_classes=None, context_dim=None, gradient_checkpointing=False):
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
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes is not None:
            self.label_embedder = nn.Embedding(num_classes + 1, hidden_size)  # + the null label
        elif context_dim is not None:
            self.text_embedder = TextEmbedder(context_dim, hidden_size)
        else:
            self.context_token = nn.Parameter(torch.empty(1, 1, hidden_size))
        self.blocks = nn.ModuleList(JointBlock(hidden_size, num_heads) for _ in range(depth - 1))
        self.last_block = LastJointBlock(hidden_size, num_heads)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    @property
    def null_label(self):
        """The label index meaning "no label" (classifier-free guidance): the extra embedding row.
        None for a model without classes, whose y is always None."""
        return self.num_classes

    @property
    def config(self):
        """The constructor arguments as plain Python values: `MMDiT(**model.config)` rebuilds it."""
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    num_classes=self.num_classes, context_dim=self.context_dim,
                    gradient_checkpointing=self.gradient_checkpointing)

    def initialize_weights(self):
        """Every special initialisation, in one place (DiT)."""
        # Linear layers (patch embedding included): Xavier-uniform weights, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Embedding table, the learnt unconditional token and the timestep MLP: N(0, 0.02).
        if self.num_classes is not None:
            nn.init.normal_(self.label_embedder.weight, std=0.02)
        elif self.context_dim is None:
            nn.init.normal_(self.context_token, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero modulations make every block the identity at initialisation, and the
        # zero output layer makes the untrained model predict exactly 0 (DiT Sec. 3.2).
        for block in [*self.blocks, self.last_block]:
            for stream in (block.context, block.image):
                nn.init.zeros_(stream.modulation.weight)
                nn.init.zeros_(stream.modulation.bias)
        for layer in (self.final_layer.modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

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

    def embed_condition(self, t, y, context, batch):
        """-> context tokens (B, L, D) for the context stream, and c (B, D) for adaLN."""
        c = self.t_embedder(t)  # (B, D)
        if self.num_classes is not None:
            label = self.label_embedder(y)  # (B, D)
            return label[:, None], c + label
        if self.context_dim is not None:
            tokens, pooled = self.text_embedder(context)  # (B, L, D), (B, D)
            return tokens, c + pooled
        return self.context_token.expand(batch, -1, -1), c

    # ---- forward ----

    def run_block(self, block, *inputs):
        """block(*inputs), or its checkpointed version while training with gradient_checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def forward(self, x, t, y=None, context=None):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) or context (B, L, context_dim) -> (B, C, H, W)."""
        self.check_inputs(x, t, y, context)
        batch, _, height, width = x.shape
        grid_height, grid_width = height // self.patch_size, width // self.patch_size
        x = self.x_embedder(patchify(x, self.patch_size))  # (B, T, D)
        x = x + sincos_position_embedding(grid_height, grid_width, self.hidden_size, x.device)
        context, c = self.embed_condition(t, y, context, batch)  # (B, L, D), (B, D)
        silu_c = F.silu(c)  # every modulation reads SiLU(c) (DiT's adaLN MLP): computed once here
        for block in self.blocks:
            context, x = self.run_block(block, context, x, silu_c)
        x = self.run_block(self.last_block, context, x, silu_c)  # (B, T, D)
        x = self.final_layer(x, silu_c)  # (B, T, p*p*C)
        return unpatchify(x, self.patch_size, grid_height, grid_width)  # (B, C, H, W)

    # ---- cost ----

    def flops_per_forward(self, batch_size, image_tokens=None, context_tokens=None):
        """Matmul FLOPs of one forward pass, counted from the shapes: 2 * m * n * k for every linear
        layer (m = rows: tokens, or samples for the adaLN and embedding MLPs), plus 2 * B * Tq * Tk * D
        for each of Q K^T and A V. Norms, activations, lookups and additions are left out, as MFU
        conventionally does. A training step is about 3x this (the backward pass costs twice the forward).

        image_tokens defaults to the input_size grid, (input_size / patch_size)^2; context_tokens
        to the 1 token of a class or unconditional model, and must be given for a text model.
        """
        if image_tokens is None:
            image_tokens = (self.input_size // self.patch_size) ** 2
        if context_tokens is None:
            if self.context_dim is not None:
                raise ValueError("flops_per_forward: a text model needs context_tokens (the L of its context)")
            context_tokens = 1
        b, d, p_c = batch_size, self.hidden_size, self.patch_size ** 2 * self.in_channels
        tokens = image_tokens + context_tokens

        def linear(rows, fan_in, fan_out):
            return 2 * rows * fan_in * fan_out

        def stream(rows):  # modulation, qkv, output projection, MLP
            return (linear(b, d, 6 * d) + linear(rows, d, 3 * d) + linear(rows, d, d)
                    + linear(rows, d, MLP_RATIO * d) + linear(rows, MLP_RATIO * d, d))

        def attention(queries, keys):  # Q K^T and A V over all heads
            return 2 * 2 * b * queries * keys * d

        flops = linear(b * image_tokens, p_c, d)  # patch embedding
        flops += linear(b, TIMESTEP_FREQUENCIES, d) + linear(b, d, d)  # timestep MLP
        if self.context_dim is not None:  # context tokens, pooled MLP
            flops += linear(b * context_tokens, self.context_dim, d)
            flops += linear(b, self.context_dim, d) + linear(b, d, d)
        joint_block = stream(b * context_tokens) + stream(b * image_tokens) + attention(tokens, tokens)
        last_block = (linear(b, d, 2 * d) + linear(b * context_tokens, d, 2 * d)
                      + stream(b * image_tokens) + attention(image_tokens, tokens))
        final_layer = linear(b, d, 2 * d) + linear(b * image_tokens, d, p_c)
        return flops + (self.depth - 1) * joint_block + last_block + final_layer


# --------------------------------------------------------------------------------------------
# Named sizes
# --------------------------------------------------------------------------------------------

# DiT's depth / width / heads (Peebles & Xie 2023, Table 1), and the paper's (Sec. 4.1: 28 blocks,
# hidden size 1536; 24 heads of width 64, as in SD3).
MODELS = {
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "paper": dict(depth=28, hidden_size=1536, num_heads=24, patch_size=2),
    "demo": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),  # train.py's CPU demo: minutes, not a result
}


def build_model(name, **overrides):
    """MMDiT of a named size; overrides (input_size, in_channels, num_classes, ...) are passed on
    and win over the named size."""
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}, expected one of {list(MODELS)}")
    return MMDiT(**{**MODELS[name], **overrides})


def main(argv=None):
    parser = argparse.ArgumentParser(description="Parameter count and forward FLOPs of an MMDiT size.")
    parser.add_argument("--model", choices=list(MODELS), default="XL/2")
    parser.add_argument("--input-size", type=int, default=32, help="latent height = width")
    parser.add_argument("--in-channels", type=int, default=4, help="latent channels")
    parser.add_argument("--num-classes", type=int, default=None, help="class-conditional with this many classes")
    parser.add_argument("--context-dim", type=int, default=None, help="text-conditional with this embedding width")
    parser.add_argument("--context-tokens", type=int, default=None, help="text tokens L, for the FLOPs")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size, for the FLOPs")
    args = parser.parse_args(argv)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(args.model, input_size=args.input_size, in_channels=args.in_channels,
                            num_classes=args.num_classes, context_dim=args.context_dim)
    parameters = sum(p.numel() for p in model.parameters())
    flops = model.flops_per_forward(args.batch_size, context_tokens=args.context_tokens)
    print(f"{args.model}: {parameters:,} parameters ({parameters / 1e6:.1f}M); "
          f"{flops / 1e9:.2f} GFLOPs per forward at batch {args.batch_size}")
    return parameters, flops


if __name__ == "__main__":
    main()
