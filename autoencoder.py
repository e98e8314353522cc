"""
The autoencoder of a latent diffusion model, loaded exactly from its real checkpoint, and the decoder
feature taps that the latent perceptual loss compares (LPL, Berrada et al., ICLR 2025, Sec. 3.2 and Fig. 7).

Supported, from diffusers or the original checkpoints (.safetensors, .ckpt, .pt, .pth, full model checkpoints):
  * KL-f8 VAEs of latent-diffusion: SD 1.x/2.x and SDXL (4 latent channels), SD3 and FLUX.1 (16);
  * the asymmetric VAE of Zhu et al. (2023), the paper's main autoencoder (Sec. 4.1): SD's encoder and latent space,
    a wider decoder with more ResNet blocks per level (diffusers AsymmetricAutoencoderKL x-1-5 and x-2, or the
    .ckpt files of buxiangzhiren/Asymmetric_VQGAN). Its decoder also holds a mask-conditioned inpainting branch that
    plain decoding never runs (diffusers' decode(z) without image and mask skips it): those weights are checked
    against the decoder's widths and listed in the load log as not used, not loaded;
  * FLUX.2's VAE (32 channels; diffusers AutoencoderKLFlux2 or BFL's ae.safetensors): a KL-f8 VAE whose latents
    are normalised by the running statistics of its `bn` BatchNorm over 2x2 latent patches (see PatchBatchNorm);
  * the tiny autoencoders TAESD, TAESDXL, TAESD3, TAEF1, TAEF2 (madebyollin/taesd), from their
    *_encoder.pth / *_decoder.pth pairs or a diffusers AutoencoderTiny file.
Not supported, being other architectures rather than other key names: VQ autoencoders (a codebook between
encoder and decoder), DC-AE (deep compression, f32+), consistency decoders, the causal 3D video VAEs (Wan, Hunyuan,
Qwen-Image). A file that is truncated, corrupt or not a checkpoint gives one ValueError line naming it.

Checkpoint files are read by runtime.py (safetensors without the safetensors package, torch.load weights_only).
`python autoencoder.py VAE` prints what the loader understood; datasets are encoded by `python data.py encode` and
`python data.py roundtrip` sends one image through the autoencoder.

In Python (all images in [-1, 1], all latents scaled: z_scaled = (z - shift_factor) * scaling_factor):

    ae = load_autoencoder("sdxl_vae.safetensors", family="sdxl", device="cuda")  # the paper's ablation AE
    ae = load_autoencoder("asymmetric-autoencoder-kl-x-1-5")  # its main AE: a diffusers folder (or the original .ckpt)
    z = ae.encode(images)                          # (B, 3, H, W) -> (B, C, H/8, W/8)
    features = ae.decoder_features(z, n_blocks=5)  # mid block, then each up block: coarse to fine
    images = ae.decode(z)
"""

import argparse
import functools
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runtime import one_line_errors, read_checkpoint, save_safetensors

# ----------------------------------------------------------------------------------------------------------
# Known latent spaces
# ----------------------------------------------------------------------------------------------------------

# name: (kind, latent channels, scaling_factor, shift_factor); scaled latents are (z - shift) * scale.
FAMILIES = {
    "sd": ("kl", 4, 0.18215, 0.0),  # SD 1.x / 2.x (and the asymmetric VAE of Zhu et al. 2023, the paper's main AE)
    "sdxl": ("kl", 4, 0.13025, 0.0),  # the paper's ablation AE
    "sd3": ("kl", 16, 1.5305, 0.0609),
    "flux": ("kl", 16, 0.3611, 0.1159),  # FLUX.1
    # FLUX.2: its own BatchNorm statistics normalise the latents (PatchBatchNorm), so no further scale or shift
    "flux2": ("kl", 32, 1.0, 0.0),
    # The tiny autoencoders are distilled on the *scaled* latents of the VAE they mimic (TAESD's author: "there is
    # no scaling_factor for TAESD"; diffusers' AutoencoderTiny configs say 1.0), so their own scale is 1 and shift 0.
    "taesd": ("tiny", 4, 1.0, 0.0),
    "taesdxl": ("tiny", 4, 1.0, 0.0),
    "taesd3": ("tiny", 16, 1.0, 0.0),
    "taef1": ("tiny", 16, 1.0, 0.0),
    "taef2": ("tiny", 32, 1.0, 0.0),  # FLUX.2's batch-normalised latents, unpatchified to 32 channels at /8
}
# SD 1.x and SDXL (and SD3 and FLUX.1) share a layout: shapes cannot tell them apart, so one is the default.
# "sd": the latent space of the paper's main results and of the usual class-conditional ImageNet baselines;
# "sd3": the VAE made for the MMDiT that model.py implements.
DEFAULT_FAMILY = {("kl", 4): "sd", ("kl", 16): "sd3", ("kl", 32): "flux2",
                  ("tiny", 4): "taesd", ("tiny", 16): "taef1", ("tiny", 32): "taef2"}
# What the rest of a full model checkpoint says about which VAE it carries.
CONTEXT_FAMILY = {
    "conditioner.": "sdxl",
    "cond_stage_model.": "sd",
    "model.diffusion_model.joint_blocks.": "sd3",
    "model.diffusion_model.double_blocks.": "flux",
}


def family_for(names, scaling_factor, shift_factor):
    """The family among `names` whose constants these are, or None."""
    return next((name for name in names if math.isclose(FAMILIES[name][2], scaling_factor)
                 and math.isclose(FAMILIES[name][3], shift_factor, abs_tol=1e-9)), None)


# ----------------------------------------------------------------------------------------------------------
# KL-f8 autoencoder (latent-diffusion's Encoder / Decoder), with diffusers' module names
# ----------------------------------------------------------------------------------------------------------

def group_norm(channels):
    """GroupNorm(32 groups, eps 1e-6): the only normalisation of a KL autoencoder (LDM's `Normalize`)."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """The mid block's single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, channels):
        super().__init__()
        self.group_norm = group_norm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers calls it `to_out.0`

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (project(tokens).unsqueeze(1) for project in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        tokens = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v: (B, HW, C)
        return x + self.to_out[0](tokens).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block, at the latent resolution."""

    def __init__(self, channels):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels), ResnetBlock(channels, channels)])
        self.attentions = nn.ModuleList([SelfAttention(channels)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only: (H, W) -> (H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (H, W) -> (2H, 2W)


class DownBlock(nn.Module):
    """One encoder resolution level: ResNet blocks, then (except at the last level) a stride-2 conv."""

    def __init__(self, in_channels, out_channels, num_resnets, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_resnets)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """One decoder resolution level: ResNet blocks, then (except at the last level) a 2x nearest upsampling."""

    def __init__(self, in_channels, out_channels, num_resnets, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_resnets)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


@dataclass(frozen=True)
class KLLayout:
    """The sizes of one side (encoder or decoder) of a KL autoencoder, as read from a checkpoint's shapes. The two
    sides are read apart: the asymmetric decoder of Zhu et al. is wider and deeper than its encoder."""
    block_channels: tuple  # width of each resolution level, fine to coarse (ch * ch_mult): SD (128, 256, 512, 512)
    num_res_blocks: int  # ResNet blocks per encoder level; a decoder level has one more (LDM's convention)
    z_channels: int  # channels on the encoder/decoder side of the quant convs
    latent_channels: int  # channels of the latents themselves (LDM's embed_dim)
    quant_conv: bool  # a 1x1 quant_conv / post_quant_conv around the latents (SD, SDXL; not SD3, FLUX.1)


class KLEncoder(nn.Module):
    def __init__(self, layout):
        super().__init__()
        widths = layout.block_channels
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownBlock(widths[max(level - 1, 0)], width, layout.num_res_blocks, downsample=level < len(widths) - 1)
             for level, width in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1])
        self.conv_norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * layout.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, images):
        x = self.conv_in(images)  # (B, ch, H, W)
        for block in self.down_blocks:
            x = block(x)  # ... (B, ch * ch_mult[-1], H/8, W/8)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2 z_channels, H/8, W/8)


class KLDecoder(nn.Module):
    """Split into the stages that decoder_features taps: stage 0 is conv_in + mid block (latent resolution),
    stage k >= 1 is up block k-1, its upsampler included (diffusers order: coarse to fine)."""

    def __init__(self, layout):
        super().__init__()
        widths = layout.block_channels[::-1]  # coarse to fine
        self.conv_in = nn.Conv2d(layout.z_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0])
        self.up_blocks = nn.ModuleList(
            [UpBlock(widths[max(k - 1, 0)], width, layout.num_res_blocks + 1, upsample=k < len(widths) - 1)
             for k, width in enumerate(widths)])
        self.conv_norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    @property
    def num_stages(self):
        return 1 + len(self.up_blocks)

    def run_stage(self, index, x):
        if index == 0:
            return self.mid_block(self.conv_in(x))  # (B, ch * ch_mult[-1], h, w)
        return self.up_blocks[index - 1](x)  # (B, width of the level, 2h, 2w) while there is an upsampler

    def head(self, x):
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, H, W)


FLUX2_BATCH_NORM_EPS = 1e-4  # BFL's flux2 autoencoder (bn_eps) and diffusers' AutoencoderKLFlux2 (batch_norm_eps)


class PatchBatchNorm(nn.Module):
    """FLUX.2's latent normalisation: its `bn`, a BatchNorm2d without affine weights in eval mode, applied to the
    latents patchified 2x2, (B, C, H, W) -> (B, 4C, H/2, W/2) with channel c * 4 + 2 * row + column (BFL's encode;
    diffusers' Flux2Pipeline does the same outside the VAE). Here the same running statistics are applied to the
    unpatchified latents, one mean and variance per channel and position in a 2x2 patch: the numbers are equal."""

    def __init__(self, channels, eps=FLUX2_BATCH_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(4 * channels))
        self.register_buffer("running_var", torch.ones(4 * channels))

    def patches(self, z):
        b, c, h, w = z.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX.2 latents are normalised per 2x2 patch: latent height and width must be even "
                             f"(images a multiple of 16), got {h}x{w}")
        mean = self.running_mean.view(1, c, 1, 2, 1, 2)
        std = (self.running_var + self.eps).sqrt().view(1, c, 1, 2, 1, 2)
        return z.reshape(b, c, h // 2, 2, w // 2, 2), mean, std  # (B, C, H/2, row, W/2, column)

    def normalize(self, z):
        patches, mean, std = self.patches(z)
        return ((patches - mean) / std).reshape(z.shape)

    def denormalize(self, z):
        patches, mean, std = self.patches(z)
        return (patches * std + mean).reshape(z.shape)


# ----------------------------------------------------------------------------------------------------------
# Tiny autoencoders (madebyollin/taesd): plain conv + ReLU, images in [0, 1] inside
# ----------------------------------------------------------------------------------------------------------

class Clamp(nn.Module):
    """Soft clamp of the latents into (-3, 3)."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


def tiny_conv(in_channels, out_channels, **kwargs):
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, **kwargs)


class TinyBlock(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus the input, then ReLU. TAEF2 (FLUX.2) adds a `pool` branch at the latent
    resolution, applied first as a residual: 1x1 conv to 4x the width, GroupNorm(4 groups), ReLU, 1x1 conv back
    (layout from the keys of taef2_*.pth, order from madebyollin's taesd.py `use_midblock_gn`)."""

    def __init__(self, channels, pool=False):
        super().__init__()
        self.conv = nn.Sequential(tiny_conv(channels, channels), nn.ReLU(), tiny_conv(channels, channels), nn.ReLU(),
                                  tiny_conv(channels, channels))
        self.pool = nn.Sequential(nn.Conv2d(channels, 4 * channels, 1, bias=False), nn.GroupNorm(4, 4 * channels),
                                  nn.ReLU(), nn.Conv2d(4 * channels, channels, 1, bias=False)) if pool else None

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return F.relu(self.conv(x) + x)


class TinyEncoder(nn.Sequential):
    """taesd.py's Encoder, same layer indices: RGB in [0, 1] -> raw latents, 64 channels, three stride-2 convs."""

    def __init__(self, latent_channels, pool):
        width = 64
        super().__init__(
            tiny_conv(3, width), TinyBlock(width),  # (B, 64, H, W)
            tiny_conv(width, width, stride=2, bias=False), *[TinyBlock(width) for _ in range(3)],  # H/2
            tiny_conv(width, width, stride=2, bias=False), *[TinyBlock(width) for _ in range(3)],  # H/4
            tiny_conv(width, width, stride=2, bias=False), *[TinyBlock(width, pool) for _ in range(3)],  # H/8
            tiny_conv(width, latent_channels))  # (B, C, H/8, W/8)


class TinyDecoder(nn.Sequential):
    """taesd.py's Decoder, same layer indices (0 is the clamp). Stage 0, tapped first: clamp, conv, ReLU and the
    three blocks at the latent resolution (layers 0-5); each later stage: 2x upsample, conv and the blocks at the
    new resolution (6-10, 11-15, 16-18). The head is the last conv to RGB (19)."""

    def __init__(self, latent_channels, pool):
        width = 64
        super().__init__(
            Clamp(), tiny_conv(latent_channels, width), nn.ReLU(), *[TinyBlock(width, pool) for _ in range(3)],
            nn.Upsample(scale_factor=2), tiny_conv(width, width, bias=False), *[TinyBlock(width) for _ in range(3)],
            nn.Upsample(scale_factor=2), tiny_conv(width, width, bias=False), *[TinyBlock(width) for _ in range(3)],
            nn.Upsample(scale_factor=2), tiny_conv(width, width, bias=False), TinyBlock(width),
            tiny_conv(width, 3))
        starts = [0] + [i for i, layer in enumerate(self) if isinstance(layer, nn.Upsample)]
        self.stage_bounds = list(zip(starts, starts[1:] + [len(self) - 1]))  # [(0, 6), (6, 11), (11, 16), (16, 19)]

    @property
    def num_stages(self):
        return len(self.stage_bounds)

    def run_stage(self, index, x):
        begin, end = self.stage_bounds[index]
        for layer in list(self)[begin:end]:  # (slicing a Sequential subclass would rebuild it)
            x = layer(x)
        return x  # (B, 64, h * 2^index, w * 2^index)

    def head(self, x):
        return self[-1](x)  # (B, 3, H, W) in [0, 1]


# ----------------------------------------------------------------------------------------------------------
# The autoencoder: scaled latents in and out, decoder feature taps
# ----------------------------------------------------------------------------------------------------------

class LatentAutoencoder(nn.Module):
    """What the rest of lpl uses. Subclasses provide encode_unscaled, decoder_input and decoder_output."""
    kind = None

    def __init__(self):
        super().__init__()
        self.family, self.scaling_factor, self.shift_factor = "custom", 1.0, 0.0
        self.key_format, self.files = "built", []
        self.unused = {}  # {file:key: why} of the checkpoint weights that encoding and decoding never run

    @property
    def has_encoder(self):
        return self.encoder is not None

    @property
    def has_decoder(self):
        return self.decoder is not None

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def num_feature_blocks(self):
        """How many feature maps decoder_features can return (5 for a 4-level KL decoder, 4 for a tiny one)."""
        self._require("decoder")
        return self.decoder.num_stages

    def encode(self, images):
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, H/8, W/8): the posterior mean."""
        self._require("encoder")
        z = self.encode_unscaled(images.to(self.dtype))
        return (z - self.shift_factor) * self.scaling_factor

    def encode_posterior(self, images):
        """Images -> (mean, std) of the scaled posterior N(mean, std^2) of a KL autoencoder: a sample of it,
        mean + std * N(0, 1), is what DiT trained on (`latent_dist.sample() * 0.18215`)."""
        self._require("encoder")
        if self.kind != "kl" or self.bn is not None:
            raise ValueError(f"{self.kind} autoencoder '{self.family}': no posterior std (KL VAEs without a latent "
                             "BatchNorm only)")
        mean, log_variance = self.encoder_moments(images.to(self.dtype)).chunk(2, dim=1)
        std = (0.5 * log_variance.clamp(-30.0, 20.0)).exp()  # the clamp of LDM's DiagonalGaussianDistribution
        return (mean - self.shift_factor) * self.scaling_factor, std * self.scaling_factor

    def decode(self, latents):
        """Scaled latents -> images, about [-1, 1] (not clamped: LPL and users may backpropagate through it)."""
        x = self._run_stages(self._decoder_start(latents), 0, self.num_feature_blocks)
        return self.decoder_output(self.decoder.head(x))

    def decoder_features(self, latents, n_blocks, checkpointing=False):
        """Scaled latents -> the decoder's first n_blocks stage outputs, coarse to fine: the mid block, then each
        up block after its upsampler (KL), or each resolution stage (tiny; see TinyDecoder). Runs no further than
        needed. checkpointing=True recomputes each stage in the backward pass instead of storing its activations."""
        self._check_n_blocks(n_blocks)
        features = []
        self._run_stages(self._decoder_start(latents), 0, n_blocks, checkpointing, features)
        return features

    def decode_from_features(self, feature, n_blocks):
        """Continues the decoder from the n_blocks-th feature map (decoder_features(z, n_blocks)[-1]) to images."""
        self._check_n_blocks(n_blocks)
        x = self._run_stages(feature, n_blocks, self.num_feature_blocks)
        return self.decoder_output(self.decoder.head(x))

    def describe(self):
        sides = "+".join(side for side in ("encoder", "decoder") if getattr(self, side) is not None)
        unused = "".join(f"; {n} tensors not used ({why})" for why, n in Counter(self.unused.values()).items())
        return (f"{self.kind} autoencoder '{self.family}' ({self.key_format} keys, {sides}, {self.latent_channels} "
                f"latent channels, /{self.downsample}, {self.layout_summary()}, scaling {self.scaling_factor:g}, "
                f"shift {self.shift_factor:g}){unused}")

    def _decoder_start(self, latents):
        self._require("decoder")
        return self.decoder_input(latents.to(self.dtype) / self.scaling_factor + self.shift_factor)

    def _run_stages(self, x, start, stop, checkpointing=False, features=None):
        for index in range(start, stop):
            stage = functools.partial(self.decoder.run_stage, index)
            x = checkpoint(stage, x, use_reentrant=False) if checkpointing else stage(x)
            if features is not None:
                features.append(x)
        return x

    def _check_n_blocks(self, n_blocks):
        if not 1 <= n_blocks <= self.num_feature_blocks:
            raise ValueError(f"n_blocks={n_blocks}: this decoder has feature blocks 1..{self.num_feature_blocks}")

    def _require(self, side):
        if getattr(self, side) is None:
            raise RuntimeError(f"this autoencoder has no {side}: {[str(f) for f in self.files] or 'built'} held no "
                               f"{side} weights; load the {side} file too")


class KLAutoencoder(LatentAutoencoder):
    kind = "kl"

    def __init__(self, encoder_layout, decoder_layout, batch_norm=False):
        """batch_norm: FLUX.2's PatchBatchNorm between the quant convs and the latents."""
        super().__init__()
        layouts = [layout for layout in (encoder_layout, decoder_layout) if layout is not None]
        if len({(layout.latent_channels, len(layout.block_channels)) for layout in layouts}) != 1:
            raise ValueError(f"encoder and decoder disagree on latent channels or levels: {layouts}")
        self.latent_channels = layouts[0].latent_channels
        self.downsample = 2 ** (len(layouts[0].block_channels) - 1)
        self.encoder_layout, self.decoder_layout = encoder_layout, decoder_layout
        self.encoder = KLEncoder(encoder_layout) if encoder_layout else None
        self.quant_conv = nn.Conv2d(2 * encoder_layout.z_channels, 2 * self.latent_channels, 1) \
            if encoder_layout and encoder_layout.quant_conv else None
        self.decoder = KLDecoder(decoder_layout) if decoder_layout else None
        self.post_quant_conv = nn.Conv2d(self.latent_channels, decoder_layout.z_channels, 1) \
            if decoder_layout and decoder_layout.quant_conv else None
        self.bn = PatchBatchNorm(self.latent_channels) if batch_norm else None

    def encoder_moments(self, images):
        """(B, 2C, h, w): the posterior mean, then its log variance (LDM's `moments`)."""
        moments = self.encoder(images)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode_unscaled(self, images):
        mean, _log_variance = self.encoder_moments(images).chunk(2, dim=1)  # the mean: deterministic datasets
        return mean if self.bn is None else self.bn.normalize(mean)

    def decoder_input(self, z):
        z = z if self.bn is None else self.bn.denormalize(z)
        return z if self.post_quant_conv is None else self.post_quant_conv(z)

    def decoder_output(self, x):
        return x

    def layout_summary(self):
        def sizes(layout):
            return f"widths {'/'.join(map(str, layout.block_channels))}, {layout.num_res_blocks} res blocks"
        layouts = [layout for layout in (self.encoder_layout, self.decoder_layout) if layout is not None]
        summary = sizes(layouts[0]) if len({sizes(layout) for layout in layouts}) == 1 else \
            f"encoder {sizes(self.encoder_layout)}, asymmetric decoder {sizes(self.decoder_layout)}"
        return (f"{summary}, {'with' if layouts[0].quant_conv else 'no'} quant convs"
                f"{', BatchNorm-normalised latents' if self.bn is not None else ''}")


class TinyAutoencoder(LatentAutoencoder):
    kind = "tiny"

    def __init__(self, latent_channels, encoder_pool=None, decoder_pool=None):
        """encoder_pool / decoder_pool: None for no encoder / decoder, else whether its blocks at the latent
        resolution carry TAEF2's GroupNorm pool branch."""
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = TinyEncoder(latent_channels, encoder_pool) if encoder_pool is not None else None
        self.decoder = TinyDecoder(latent_channels, decoder_pool) if decoder_pool is not None else None
        self.downsample = 8  # three stride-2 convs / three 2x upsamplings

    def encode_unscaled(self, images):
        return self.encoder(images * 0.5 + 0.5)  # the tiny family works on images in [0, 1]

    def decoder_input(self, z):
        return z

    def decoder_output(self, x):
        return x * 2 - 1

    def layout_summary(self):
        pooled = any(isinstance(m, TinyBlock) and m.pool is not None for m in self.modules())
        return "64 wide" + (", GroupNorm pool at the latent resolution" if pooled else "")


def set_latent_space(ae, family, scaling_factor, shift_factor):
    ae.family, ae.scaling_factor, ae.shift_factor = family, float(scaling_factor), float(shift_factor)
    return ae


# ----------------------------------------------------------------------------------------------------------
# Random KL autoencoders and our own checkpoint format
# ----------------------------------------------------------------------------------------------------------

KL_ARCHS = {
    "sd": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, quant_conv=True),
    "sdxl": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, quant_conv=True),
    "sd3": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, quant_conv=False),
    "flux": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, quant_conv=False),
    "flux2": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=32, quant_conv=True, batch_norm=True),
}


def build_kl_autoencoder(arch, scaling_factor=None, shift_factor=None, **overrides):
    """A randomly initialised (PyTorch default init), frozen KL autoencoder with the layout of `arch`, resized
    by overrides of ch, ch_mult, num_res_blocks, z_channels. Its family is `arch` unless z_channels changes the
    latent width ("custom", scale 1, shift 0); scaling_factor / shift_factor override the family's."""
    if arch not in KL_ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {list(KL_ARCHS)}")
    unknown = set(overrides) - {"ch", "ch_mult", "num_res_blocks", "z_channels"}
    if unknown:
        raise TypeError(f"build_kl_autoencoder: unknown overrides {sorted(unknown)}; "
                        "expected ch, ch_mult, num_res_blocks, z_channels")
    config = {**KL_ARCHS[arch], **overrides}
    widths = tuple(config["ch"] * m for m in config["ch_mult"])
    if any(width % 32 for width in widths):
        raise ValueError(f"ch={config['ch']}, ch_mult={config['ch_mult']}: every width must be a multiple of 32 "
                         "(GroupNorm with 32 groups)")
    z = config["z_channels"]
    layout = KLLayout(widths, config["num_res_blocks"], z, z, config["quant_conv"])
    family = arch if z == FAMILIES[arch][1] else "custom"
    _, _, scale, shift = FAMILIES.get(family, (None, None, 1.0, 0.0))
    scale = scaling_factor if scaling_factor is not None else scale
    shift = shift_factor if shift_factor is not None else shift
    ae = set_latent_space(KLAutoencoder(layout, layout, config.get("batch_norm", False)), family, scale, shift)
    return ae.requires_grad_(False).eval()


def save_autoencoder(ae, path):
    """Writes ae as .safetensors: KL weights under diffusers' key names, tiny weights under taesd.py's indices
    ("encoder.N" / "decoder.N"), with family, scaling_factor and shift_factor in the metadata."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"save_autoencoder: {path} must end in .safetensors")
    metadata = {"format": "pt", "family": ae.family, "scaling_factor": repr(ae.scaling_factor),
                "shift_factor": repr(ae.shift_factor)}
    save_safetensors(ae.state_dict(), path, metadata)


# ----------------------------------------------------------------------------------------------------------
# Key formats: full checkpoints, LDM / diffusers / taesd names -> our module names
# ----------------------------------------------------------------------------------------------------------

VAE_PREFIXES = ("first_stage_model.", "vae.")
NOT_VAE_PREFIXES = ("model.", "model_ema.", "cond_stage_model.", "conditioner.", "text_encoders.", "loss.")

LDM_RENAMES = [  # (pattern, replacement), applied in order; the decoder's up levels are renumbered separately
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^encoder\.quant_conv\.", "quant_conv."),  # BFL's FLUX.2 keeps the quant convs inside encoder and decoder
    (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
    (r"^decoder\.encoder\.", "decoder.condition_encoder."),  # Zhu et al.'s Conditionencoder (diffusers' name)
]
OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def select_vae_tensors(tensors, path, log):
    """Keeps the VAE of a full model checkpoint (under first_stage_model. or vae.) and drops the rest only when
    it is clearly not the VAE. Returns (tensors, the family the rest of the checkpoint points to, or None)."""
    prefix = next((p for p in VAE_PREFIXES if any(key.startswith(p) for key in tensors)), None)
    if prefix is None:
        losses = [key for key in tensors if key.startswith("loss.")]
        if losses:
            log(f"{path}: ignored {len(losses)} 'loss.' keys (the VAE's own training losses, not the VAE)")
        return {key: value for key, value in tensors.items() if not key.startswith("loss.")}, None
    rest = [key for key in tensors if not key.startswith(prefix)]
    # dotless names are a full SD checkpoint's diffusion schedule buffers (betas, alphas_cumprod, ...)
    unclear = [key for key in rest if "." in key and not key.startswith(NOT_VAE_PREFIXES)]
    if unclear:
        raise ValueError(f"{path}: a full checkpoint with the VAE under '{prefix}' also holds {len(unclear)} keys that "
                         f"are not clearly something else: {unclear[:10]}")
    groups = Counter(key.split(".")[0] + "." if "." in key else "schedule buffers" for key in rest)
    log(f"{path}: full checkpoint, VAE under '{prefix}'; ignored {len(rest)} other keys "
        f"({', '.join(f'{name} {count}' for name, count in groups.most_common())})")
    hint = next((family for start, family in CONTEXT_FAMILY.items()
                 if any(key.startswith(start) for key in rest)), None)
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}, hint


def detect_key_format(keys):
    """'taesd', 'diffusers-tiny', 'diffusers' or 'ldm', or None for a state dict that is no known autoencoder."""
    keys = list(keys)
    if any(re.match(r"(encoder|decoder)\.layers\.\d+\.", key) for key in keys):
        return "diffusers-tiny"
    if any(re.match(r"((encoder|decoder)\.)?\d+\.", key) for key in keys):
        return "taesd"
    if any(re.match(r"(encoder\.down_blocks|decoder\.up_blocks|(en|de)coder\.mid_block)\.", key) for key in keys):
        return "diffusers"
    if any(re.match(r"(encoder\.down|decoder\.up|(en|de)coder\.mid)\.", key) for key in keys):
        return "ldm"
    return None


def rename_ldm_keys(tensors):
    """LDM/SGM names -> diffusers names. LDM numbers the decoder's up levels fine to coarse and runs them in
    reverse; diffusers numbers them in the order they run, so up.{i} becomes up_blocks.{levels - 1 - i}."""
    levels = 1 + max((int(m[1]) for key in tensors if (m := re.match(r"decoder\.up\.(\d+)\.", key))), default=-1)
    renamed = {}
    for key, tensor in tensors.items():
        new = key
        for pattern, replacement in LDM_RENAMES:
            new = re.sub(pattern, replacement, new)
        if key.startswith("decoder.up."):
            new = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.", new)
        renamed[new] = (key, tensor)
    return renamed


def canonical_attention(key, tensor):
    """diffusers' old attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0, and 1x1-conv shaped
    projection weights (C, C, 1, 1) -> linear (C, C)."""
    m = re.fullmatch(r"(.*\.attentions\.0\.)(query|key|value|proj_attn)(\.weight|\.bias)", key)
    if m:
        key = m[1] + OLD_DIFFUSERS_ATTENTION[m[2]] + m[3]
    if re.fullmatch(r".*\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight", key) and tensor.shape[2:] == (1, 1):
        tensor = tensor.flatten(1)
    return key, tensor


def canonical_tensors(tensors, key_format, path):
    """A file's tensors -> {our key: (the file's key, tensor)}."""
    if key_format in ("ldm", "diffusers"):
        renamed = rename_ldm_keys(tensors) if key_format == "ldm" else {key: (key, t) for key, t in tensors.items()}
        result = {}
        for new, (old, tensor) in renamed.items():
            new, tensor = canonical_attention(new, tensor)
            result[new] = (old, tensor)
        return result
    if key_format == "diffusers-tiny":
        # diffusers' AutoencoderTiny clamps outside its decoder's `layers`, so its decoder indices are one lower
        result = {}
        for key, tensor in tensors.items():
            m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", key)
            new = f"{m[1]}.{int(m[2]) + (m[1] == 'decoder')}.{m[3]}" if m else key
            result[new] = (key, tensor)
        return result
    # taesd: a bare *_encoder.pth / *_decoder.pth, or our own file with encoder./decoder. prefixes
    if all(re.match(r"(encoder|decoder)\.", key) for key in tensors):
        return {key: (key, tensor) for key, tensor in tensors.items()}
    first = tensors.get("0.weight")
    if first is None:
        side = "decoder"  # the decoder's layer 0 is the parameter-free clamp
    elif first.ndim == 4 and first.shape[1] == 3:
        side = "encoder"  # the encoder's layer 0 is a conv from RGB
    else:
        raise ValueError(f"{path}: taesd-style keys, but layer 0 ({list(first.shape)}) is neither the encoder's "
                         "RGB conv nor absent (the decoder's clamp)")
    return {f"{side}.{key}": (key, tensor) for key, tensor in tensors.items()}


def shape_of(tensors, key, path, key_format):
    if key not in tensors:
        raise ValueError(f"{path} ({key_format} keys): missing {key!r}, needed to read the autoencoder's sizes")
    return tuple(tensors[key].shape)


def read_kl_layout(tensors, side, path, key_format):
    """The sizes of the encoder or decoder, read from the (diffusers-named) shapes: nothing is hard-coded."""
    blocks = "down_blocks" if side == "encoder" else "up_blocks"
    levels = sorted({int(m[1]) for key in tensors if (m := re.match(rf"{side}\.{blocks}\.(\d+)\.", key))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"{path} ({key_format} keys): {side} levels {levels} are not 0..n-1")
    widths = [shape_of(tensors, f"{side}.{blocks}.{level}.resnets.0.conv1.weight", path, key_format)[0]
              for level in levels]
    resnets = len({m[1] for key in tensors if (m := re.match(rf"{side}\.{blocks}\.0\.resnets\.(\d+)\.", key))})
    if side == "encoder":
        z_channels = shape_of(tensors, "encoder.conv_out.weight", path, key_format)[0] // 2
        quant = "quant_conv.weight" in tensors
        latent = shape_of(tensors, "quant_conv.weight", path, key_format)[0] // 2 if quant else z_channels
        return KLLayout(tuple(widths), resnets, z_channels, latent, quant)
    z_channels = shape_of(tensors, "decoder.conv_in.weight", path, key_format)[1]
    quant = "post_quant_conv.weight" in tensors
    latent = shape_of(tensors, "post_quant_conv.weight", path, key_format)[1] if quant else z_channels
    return KLLayout(tuple(widths[::-1]), resnets - 1, z_channels, latent, quant)


def build_from_tensors(tensors, kind, paths, key_format):
    sides = {key.split(".")[0] for key in tensors}
    if kind == "kl":
        encoder = read_kl_layout(tensors, "encoder", paths, key_format) if "encoder" in sides else None
        decoder = read_kl_layout(tensors, "decoder", paths, key_format) if "decoder" in sides else None
        if encoder is None and decoder is None:
            raise ValueError(f"{paths} ({key_format} keys): neither encoder. nor decoder. weights")
        return KLAutoencoder(encoder, decoder, batch_norm="bn.running_mean" in tensors)
    encoder_pool = any(re.match(r"encoder\.\d+\.pool\.", key) for key in tensors) if "encoder" in sides else None
    decoder_pool = any(re.match(r"decoder\.\d+\.pool\.", key) for key in tensors) if "decoder" in sides else None
    if decoder_pool is not None:
        latent = shape_of(tensors, "decoder.1.weight", paths, key_format)[1]
    else:
        last = max(int(key.split(".")[1]) for key in tensors if key.startswith("encoder."))
        latent = shape_of(tensors, f"encoder.{last}.weight", paths, key_format)[0]
    return TinyAutoencoder(latent, encoder_pool, decoder_pool)


# ----------------------------------------------------------------------------------------------------------
# Weights that encoding and decoding never run: checked like the others, listed, not loaded
# ----------------------------------------------------------------------------------------------------------

INPAINTING = "mask-conditioned inpainting branch"
UNUSED_GROUPS = ("decoder.condition_encoder.", "decoder.up_layers.", "bn.num_batches_tracked")


def condition_branch_shapes(first, last):
    """{key: shape} of the inpainting branch of an asymmetric decoder whose up levels are `first` (finest) to `last`
    wide. Zhu et al.'s decoders (Asymmetric_VQGAN, my_decoder_large*.py) build four transposed convs `up_layers`
    (called nowhere, not even when inpainting) and, from their widths, a `Conditionencoder` of the masked image:
    two 3x3 convs, then three 4x4 stride-2 convs. diffusers' MaskConditionEncoder is the same, without up_layers."""
    ins, outs, width = [], [], first  # width: before clamping to `last`
    for k in range(4):  # the original's loop over strides 8, 4, 2, 1
        ins.append(last if k == 3 else 2 * width)
        outs.append(min(width, last))
        width = 2 * outs[-1]
    widths, shapes = [3] + outs + [last], {}
    for i in range(5):
        size = 3 if i < 2 else 4
        shapes[f"decoder.condition_encoder.layers.{i}.weight"] = (widths[i + 1], widths[i], size, size)
        shapes[f"decoder.condition_encoder.layers.{i}.bias"] = (widths[i + 1],)
    for k in range(4):  # built coarse first: the stride-8 layer is up_layers.3; ConvTranspose2d weights: (in, out, ...)
        shapes[f"decoder.up_layers.{3 - k}.deconv.weight"] = (ins[k], outs[k], 4, 4)
        shapes[f"decoder.up_layers.{3 - k}.deconv.bias"] = (outs[k],)
    return shapes


def unused_weights(ae, keys):
    """{key: (shape, why)} of the weights that plain encoding and decoding never run, for each group of them that
    these keys hold part of: the whole group is then expected (an asymmetric decoder's condition encoder; the
    up_layers of Zhu et al.'s checkpoints; the step counter diffusers saves with FLUX.2's `bn`)."""
    candidates = {}
    if ae.kind == "kl" and ae.decoder is not None:
        shapes = condition_branch_shapes(ae.decoder_layout.block_channels[0], ae.decoder_layout.block_channels[-1])
        candidates.update({key: (shape, INPAINTING) for key, shape in shapes.items()})
    if ae.kind == "kl" and ae.bn is not None:
        candidates["bn.num_batches_tracked"] = ((), "BatchNorm step counter")
    present = tuple(group for group in UNUSED_GROUPS if any(key.startswith(group) for key in keys))
    return {key: value for key, value in candidates.items() if present and key.startswith(present)}


def load_strict(ae, tensors, origins, paths, key_format):
    """load_state_dict(strict=True), with an error that lists what is missing, unexpected or mis-shaped. The weights
    of unused_weights are checked the same way, then left out. Returns {file:key: why} of those left out."""
    unused = unused_weights(ae, tensors)
    expected = {key: tuple(tensor.shape) for key, tensor in ae.state_dict().items()}
    expected.update({key: shape for key, (shape, _) in unused.items()})
    missing = [key for key in expected if key not in tensors]
    unexpected = [origins[key] for key in tensors if key not in expected]
    misshaped = [f"{origins[key]} {list(tensors[key].shape)} vs {list(expected[key])}"
                 for key in tensors if key in expected and tuple(tensors[key].shape) != expected[key]]
    if missing or unexpected or misshaped:
        problems = [f"{len(items)} {what}: {items[:10]}{' ...' if len(items) > 10 else ''}"
                    for what, items in (("missing (our names)", missing), ("unexpected", unexpected),
                                        ("mis-shaped (file vs expected)", misshaped)) if items]
        raise ValueError(f"{', '.join(map(str, paths))} ({key_format} keys, {ae.kind} autoencoder "
                         f"{ae.layout_summary()}) does not load strictly:\n  " + "\n  ".join(problems))
    ae.load_state_dict({key: tensor for key, tensor in tensors.items() if key not in unused}, strict=True)
    return {origins[key]: why for key, (_, why) in unused.items()}


# ----------------------------------------------------------------------------------------------------------
# load_autoencoder
# ----------------------------------------------------------------------------------------------------------

def stored_latent_space(path, metadata, log):
    """Scaling and shift stored with a checkpoint: our safetensors metadata, or a diffusers config.json beside it.
    Returns {} or {family?, scaling_factor, shift_factor, source}."""
    if "scaling_factor" in metadata:
        try:
            stored = {"scaling_factor": float(metadata["scaling_factor"]),
                      "shift_factor": float(metadata.get("shift_factor", 0.0)), "source": f"metadata of {path.name}"}
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: metadata scaling_factor / shift_factor are not numbers: {error}") from error
        if "family" in metadata:
            stored["family"] = metadata["family"]
        return stored
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: not a readable JSON file ({error})") from error
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name == "AutoencoderKLFlux2":  # no scaling_factor: the bn statistics normalise FLUX.2's latents
        eps, patch = config.get("batch_norm_eps", FLUX2_BATCH_NORM_EPS), config.get("patch_size", [2, 2])
        if eps != FLUX2_BATCH_NORM_EPS or list(patch) != [2, 2]:
            raise ValueError(f"{config_path}: batch_norm_eps {eps}, patch_size {patch}; expected FLUX.2's "
                             f"{FLUX2_BATCH_NORM_EPS} and [2, 2], the only ones this loader implements")
        return {"family": "flux2", "scaling_factor": 1.0, "shift_factor": 0.0, "source": str(config_path)}
    if name not in ("AutoencoderKL", "AsymmetricAutoencoderKL", "AutoencoderTiny") \
            or config.get("scaling_factor") is None:
        log(f"ignoring {config_path}: not a diffusers AutoencoderKL/AsymmetricAutoencoderKL/AutoencoderTiny config "
            "with a scaling_factor")
        return {}
    try:  # diffusers: a null or absent shift_factor means no shift
        return {"scaling_factor": float(config["scaling_factor"]),
                "shift_factor": float(config.get("shift_factor") or 0.0), "source": str(config_path)}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: scaling_factor / shift_factor are not numbers ({error})") from error


def resolve_latent_space(ae, family, scaling_factor, shift_factor, stored, hint):
    """Precedence: explicit scaling_factor= / shift_factor=, then an explicit family=, then what is stored with the
    checkpoint, then the family its full checkpoint points to, then the default for its latent width.
    Returns (family, scale, shift, a line saying where each came from)."""
    kind, channels = ae.kind, ae.latent_channels
    has_bn = getattr(ae, "bn", None) is not None  # FLUX.2's latent statistics: its family needs them, no other has them
    known = [name for name, (k, c, _, _) in FAMILIES.items()
             if (k, c) == (kind, channels) and (name == "flux2") == has_bn]
    if family is not None and family not in known:
        needs = " (flux2 needs bn.running_mean / bn.running_var)" if family == "flux2" and not has_bn else ""
        raise ValueError(f"family={family!r} does not fit a {kind} autoencoder with {channels} latent channels{needs}; "
                         f"expected one of {known or ['(none: pass scaling_factor= and shift_factor=)']}")
    if family is not None:
        name, why = family, "family= argument"
    elif stored.get("family") in known + ["custom"]:
        name, why = stored["family"], stored["source"]
    elif stored:
        name = family_for(known, stored["scaling_factor"], stored["shift_factor"]) or "custom"
        why = f"constants in {stored['source']}"
    elif hint in known:
        name, why = hint, "the rest of the full checkpoint"
    elif DEFAULT_FAMILY.get((kind, channels)) in known:
        name = DEFAULT_FAMILY[kind, channels]
        why = f"default for {channels}-channel {kind} autoencoders; choose with family= / --vae-family among {known}"
    else:
        name = "custom"
        why = f"no known family fits these {channels} latent channels: pass scaling_factor= / --scaling-factor"
    family_scale, family_shift = FAMILIES[name][2:] if name in FAMILIES else (1.0, 0.0)
    scale, scale_from = next((value, source) for value, source in (
        (scaling_factor, "scaling_factor= argument"),
        (family_scale if family is not None else None, "family= argument"),
        (stored.get("scaling_factor"), stored.get("source")),
        (family_scale, f"family '{name}'")) if value is not None)
    shift, shift_from = next((value, source) for value, source in (
        (shift_factor, "shift_factor= argument"),
        (family_shift if family is not None else None, "family= argument"),
        (stored.get("shift_factor"), stored.get("source")),
        (family_shift, f"family '{name}'")) if value is not None)
    return name, scale, shift, (f"family '{name}' ({why}); scaling_factor {scale:g} (from {scale_from}), "
                                f"shift_factor {shift:g} (from {shift_from})")


def checkpoint_files(path):
    """A file, a diffusers folder (diffusion_pytorch_model.safetensors + config.json), or a pipeline folder."""
    path = Path(path)
    if path.is_dir():
        for folder in (path, path / "vae"):
            if (folder / "diffusion_pytorch_model.safetensors").is_file():
                return folder / "diffusion_pytorch_model.safetensors"
        raise FileNotFoundError(f"{path} is a folder without diffusion_pytorch_model.safetensors "
                                "(nor a vae/ sub-folder holding one)")
    return path


def tiny_sibling(path):
    """taef2_encoder.pth <-> taef2_decoder.pth."""
    for this, other in (("_encoder", "_decoder"), ("_decoder", "_encoder")):
        if path.stem.endswith(this):
            return path.with_name(path.stem[: -len(this)] + other + path.suffix)
    return None


def load_autoencoder(path, device=None, dtype=None, scaling_factor=None, shift_factor=None, family=None,
                     verbose=True):
    """Loads an autoencoder from .safetensors / .ckpt / .pt / .pth (or a diffusers folder); format and sizes come
    from the keys and shapes. `path` may also be a list of files (an encoder and a decoder file); given one tiny
    *_encoder.pth or *_decoder.pth, its sibling is loaded too if present. Strict: any missing or unexpected key is
    an error; the weights that plain encoding and decoding never run (an asymmetric decoder's inpainting branch)
    are checked, listed in the log and ae.unused, and not loaded. Weights are frozen, the module is in eval mode, in
    `dtype` (default float32) on `device`. A missing file raises FileNotFoundError; an unreadable, truncated or
    corrupt one, or one holding no autoencoder this loader knows, a ValueError naming it."""
    log = (lambda message: print(f"autoencoder: {message}", flush=True)) if verbose else (lambda message: None)
    paths = [checkpoint_files(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    merged, origins, formats, stored, hints = {}, {}, set(), [], set()
    queue = list(paths)
    while queue:
        file = queue.pop(0)
        tensors, metadata = read_checkpoint(file)
        tensors, hint = select_vae_tensors(tensors, file, log)
        key_format = detect_key_format(tensors)
        if key_format is None:
            raise ValueError(f"{file} holds no autoencoder weights this loader knows: expected keys like "
                             f"decoder.conv_in.weight (diffusers, LDM) or 1.conv.0.weight (taesd); "
                             f"found {list(tensors)[:10]}")
        canonical = canonical_tensors(tensors, key_format, file)
        duplicated = sorted(set(canonical) & set(merged))
        if duplicated:
            raise ValueError(f"{file} repeats weights already loaded from {paths}: {duplicated[:10]}")
        merged.update({key: tensor for key, (_, tensor) in canonical.items()})
        origins.update({key: f"{file.name}:{old}" for key, (old, _) in canonical.items()})
        formats.add(key_format)
        stored.append(stored_latent_space(file, metadata, log))
        hints.add(hint)
        sibling = tiny_sibling(file) if key_format == "taesd" and len(paths) == 1 else None
        if sibling is not None and sibling.is_file() and sibling not in paths:
            log(f"also loading {sibling}, the sibling of {file.name}")
            paths.append(sibling)
            queue.append(sibling)
    kinds = {"tiny" if key_format in ("taesd", "diffusers-tiny") else "kl" for key_format in formats}
    if len(kinds) > 1:
        raise ValueError(f"{paths} mix tiny and KL autoencoder weights ({sorted(formats)})")
    key_format = "+".join(sorted(formats))
    ae = build_from_tensors(merged, kinds.pop(), paths, key_format)
    ae.unused = load_strict(ae, merged, origins, paths, key_format)
    for why in dict.fromkeys(ae.unused.values()):
        log(f"not used ({why}): {', '.join(key for key, reason in ae.unused.items() if reason == why)}")
    stored = [s for s in stored if s]
    if len({(s["scaling_factor"], s["shift_factor"]) for s in stored}) > 1:
        raise ValueError(f"{paths} store different latent scales: {stored}")
    hints.discard(None)
    name, scale, shift, explanation = resolve_latent_space(
        ae, family, scaling_factor, shift_factor, stored[0] if stored else {}, hints.pop() if len(hints) == 1 else None)
    set_latent_space(ae, name, scale, shift)
    ae.key_format, ae.files = key_format, paths
    if dtype == torch.float16 and ae.kind == "kl":
        warnings.warn("float16 KL autoencoder: SDXL's VAE overflows in float16 (inf/NaN images); use torch.bfloat16 "
                      "or torch.float32", stacklevel=2)
    ae = ae.to(device=device, dtype=dtype or torch.float32).requires_grad_(False).eval()
    log(f"loaded {', '.join(map(str, paths))}: {ae.describe()}")
    log(explanation)
    return ae


def main(argv=None):
    """`python autoencoder.py VAE [VAE ...]`: load an autoencoder and print what the loader understood (key format,
    sizes, latent space, weights not used) and the shapes of the decoder's feature taps, LPL's phi_l."""
    parser = argparse.ArgumentParser(description=main.__doc__ + " Datasets are encoded by `python data.py encode`, "
                                     "one image goes through the autoencoder with `python data.py roundtrip`.")
    parser.add_argument("vae", nargs="+", type=Path, help="checkpoint(s) or a diffusers folder")
    parser.add_argument("--vae-family", choices=list(FAMILIES), default=None, help="latent space (default: detected)")
    parser.add_argument("--resolution", type=int, default=256, help="image side for the shapes of the taps")
    args = parser.parse_args(argv)
    with one_line_errors("autoencoder.py: ", also=(ValueError, OSError)):
        ae = load_autoencoder(args.vae, family=args.vae_family)
    if ae.has_decoder:
        side = args.resolution // ae.downsample
        with torch.no_grad():
            taps = ae.decoder_features(torch.zeros(1, ae.latent_channels, side, side), ae.num_feature_blocks)
        print(f"decoder taps at {args.resolution} px (channels, height, width): "
              + ", ".join(str(tuple(tap.shape[1:])) for tap in taps))
    return ae


if __name__ == "__main__":
    main()
