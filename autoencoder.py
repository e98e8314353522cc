"""
The autoencoder of a latent diffusion model, loaded exactly from its real checkpoint, and the decoder
feature taps that the latent perceptual loss compares (LPL, Berrada et al., ICLR 2025, Sec. 3.2 and Fig. 7).

Two families:
  * KL-f8 VAEs of latent-diffusion: SD 1.x/2.x and SDXL (4 latent channels), SD3 and FLUX.1 (16), from
    diffusers or original LDM/SGM checkpoints (.safetensors, .ckpt, .pt, .pth, full SD checkpoints included);
  * the tiny autoencoders TAESD, TAESDXL, TAESD3, TAEF1, TAEF2 (madebyollin/taesd), from their
    *_encoder.pth / *_decoder.pth pairs or a diffusers AutoencoderTiny file.

Encode an image folder (class sub-folders give the labels) into the flat-file dataset train.py reads:

    python autoencoder.py encode --vae sdxl_vae.safetensors --vae-family sdxl \
        --images imagenet/train --out data/in256 --resolution 256 --flip
    torchrun --nproc_per_node=8 autoencoder.py encode --vae ...    # same flags; one node: each rank encodes a
                                                                  # contiguous share, rank 0 merges
    python autoencoder.py roundtrip --vae ../shared/weights/taef2_encoder.pth \
        --image ../shared/data/kodak/kodim01.png --out /tmp/kodim01.png --resolution 256   # prints the PSNR

In Python (all images in [-1, 1], all latents scaled: z_scaled = (z - shift_factor) * scaling_factor):

    ae = load_autoencoder("sdxl_vae.safetensors", family="sdxl", device="cuda")
    z = ae.encode(images)                          # (B, 3, H, W) -> (B, C, H/8, W/8)
    features = ae.decoder_features(z, n_blocks=5)  # mid block, then each up block: coarse to fine
    images = ae.decode(z)
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------
# Known latent spaces
# ----------------------------------------------------------------------------------------------------------

# name: (kind, latent channels, scaling_factor, shift_factor); scaled latents are (z - shift) * scale.
FAMILIES = {
    "sd": ("kl", 4, 0.18215, 0.0),  # SD 1.x / 2.x (and the asymmetric VAE of Zhu et al. 2023, the paper's main AE)
    "sdxl": ("kl", 4, 0.13025, 0.0),  # the paper's ablation AE
    "sd3": ("kl", 16, 1.5305, 0.0609),
    "flux": ("kl", 16, 0.3611, 0.1159),  # FLUX.1
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
DEFAULT_FAMILY = {("kl", 4): "sd", ("kl", 16): "sd3",
                  ("tiny", 4): "taesd", ("tiny", 16): "taef1", ("tiny", 32): "taef2"}
# What the rest of a full model checkpoint says about which VAE it carries.
CONTEXT_FAMILY = {
    "conditioner.": "sdxl",
    "cond_stage_model.": "sd",
    "model.diffusion_model.joint_blocks.": "sd3",
    "model.diffusion_model.double_blocks.": "flux",
}


def family_for(kind, channels, scaling_factor, shift_factor):
    """The known family whose constants these are, or None."""
    for name, (family_kind, family_channels, scale, shift) in FAMILIES.items():
        if (family_kind, family_channels) == (kind, channels) and math.isclose(scale, scaling_factor) \
                and math.isclose(shift, shift_factor, abs_tol=1e-9):
            return name
    return None


# ----------------------------------------------------------------------------------------------------------
# Checkpoint files: safetensors without the safetensors package, torch.load(weights_only=True), atomic writes
# ----------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# numpy has no bfloat16: those bytes are viewed as int16 and reinterpreted by torch.
NUMPY_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int64: np.int64}


@contextlib.contextmanager
def atomic_output(path):
    """Yields a temporary path in the same folder, renamed onto `path` only if the block completes."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_safetensors(tensors, path, metadata=None):
    """Writes {name: tensor} as .safetensors (atomically): an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}} padded to 8 bytes, then the raw bytes."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"save_safetensors({path}): tensor {name!r} is {tensor.dtype}; "
                             f"supported: {', '.join(map(str, SAFETENSORS_NAMES))}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        bad = [key for key, value in metadata.items() if not (isinstance(key, str) and isinstance(value, str))]
        if bad:
            raise TypeError(f"save_safetensors({path}): metadata keys and values must be str; not {bad}")
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        file.write(len(blob).to_bytes(8, "little"))
        file.write(blob)
        for tensor in tensors.values():
            file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def load_safetensors(path):
    """Reads a .safetensors file -> (tensors, metadata). Tensors are memory-mapped copy-on-write (np.memmap
    mode "c"): only those you use are read from disk, which matters for a 7 GB checkpoint holding a 160 MB VAE."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        if file_size < 10 or not 2 <= header_size <= file_size - 8:
            raise ValueError(f"{path} is not a checkpoint: not a valid .safetensors file (header length {header_size}, "
                             f"file size {file_size})")
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a checkpoint: its .safetensors header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a checkpoint: its .safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_size
    data_size = file_size - data_start
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=data_start, shape=(data_size,)) if data_size else None
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}; expected dtype in "
                             f"{list(SAFETENSORS_DTYPES)}, shape and data_offsets") from error
        item_size = torch.tensor([], dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * item_size:
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has data_offsets "
                             f"{[begin, end]} outside or inconsistent with the {data_size}-byte data section")
        raw = data[begin:end] if end > begin else np.zeros(0, np.uint8)
        if (data_start + begin) % item_size:
            raw = np.array(raw)  # a misaligned tensor is copied into aligned memory
        tensor = torch.from_numpy(raw.view(NUMPY_STORAGE[dtype]).reshape(shape))
        tensors[name] = tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
    return tensors, metadata


def load_torch_checkpoint(path):
    """A torch.save file (.ckpt/.pt/.pth) -> {name: tensor}; a full SD .ckpt keeps its weights under "state_dict"."""
    try:  # torch.load raises many kinds of errors on a file it cannot read; all mean the same here
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} is not a checkpoint: torch.load gave a {type(state).__name__}, "
                         "expected a dict of tensors (or one under 'state_dict')")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: expected a state dict (name -> tensor), but {len(not_tensors)} entries are not "
                         f"tensors: {not_tensors[:10]}")
    return dict(state)


def read_checkpoint(path):
    """Any supported file -> (tensors, metadata), recognised by its content rather than its extension."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder checkpoint {path} does not exist")
    with open(path, "rb") as file:
        head = file.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch.save zip archive, or a legacy pickle
        return load_torch_checkpoint(path), {}
    if head[8:9] == b"{":
        return load_safetensors(path)
    raise ValueError(f"{path} is not a checkpoint: expected a .safetensors file or a torch.save file "
                     "(.ckpt, .pt, .pth)")


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
    """The sizes of one side (encoder or decoder) of a KL autoencoder, as read from a checkpoint's shapes."""
    block_channels: tuple  # width of each resolution level, fine to coarse (ch * ch_mult): SD (128, 256, 512, 512)
    num_res_blocks: int  # ResNet blocks per encoder level; the decoder has one more per level
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
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, H/8, W/8)."""
        self._require("encoder")
        z = self.encode_unscaled(images.to(self.dtype))
        return (z - self.shift_factor) * self.scaling_factor

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
        return (f"{self.kind} autoencoder '{self.family}' ({self.key_format} keys, {sides}, {self.latent_channels} "
                f"latent channels, /{self.downsample}, {self.layout_summary()}, scaling {self.scaling_factor:g}, "
                f"shift {self.shift_factor:g})")

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

    def __init__(self, encoder_layout, decoder_layout):
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

    def encode_unscaled(self, images):
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, _log_variance = moments.chunk(2, dim=1)
        return mean  # the posterior mean, not a sample: a dataset of latents is then deterministic

    def decoder_input(self, z):
        return z if self.post_quant_conv is None else self.post_quant_conv(z)

    def decoder_output(self, x):
        return x

    def layout_summary(self):
        layout = self.decoder_layout or self.encoder_layout
        return (f"widths {'/'.join(map(str, layout.block_channels))}, {layout.num_res_blocks} res blocks, "
                f"{'with' if layout.quant_conv else 'no'} quant convs")


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
    ae = set_latent_space(KLAutoencoder(layout, layout), family, scale, shift)
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
        return KLAutoencoder(encoder, decoder)
    encoder_pool = any(re.match(r"encoder\.\d+\.pool\.", key) for key in tensors) if "encoder" in sides else None
    decoder_pool = any(re.match(r"decoder\.\d+\.pool\.", key) for key in tensors) if "decoder" in sides else None
    if decoder_pool is not None:
        latent = shape_of(tensors, "decoder.1.weight", paths, key_format)[1]
    else:
        last = max(int(key.split(".")[1]) for key in tensors if key.startswith("encoder."))
        latent = shape_of(tensors, f"encoder.{last}.weight", paths, key_format)[0]
    return TinyAutoencoder(latent, encoder_pool, decoder_pool)


def load_strict(ae, tensors, origins, paths, key_format):
    """load_state_dict(strict=True), with an error that lists what is missing, unexpected or mis-shaped."""
    expected = ae.state_dict()
    missing = [key for key in expected if key not in tensors]
    unexpected = [origins[key] for key in tensors if key not in expected]
    misshaped = [f"{origins[key]} {list(tensors[key].shape)} vs {list(expected[key].shape)}"
                 for key in tensors if key in expected and tensors[key].shape != expected[key].shape]
    if missing or unexpected or misshaped:
        problems = [f"{len(items)} {what}: {items[:10]}{' ...' if len(items) > 10 else ''}"
                    for what, items in (("missing (our names)", missing), ("unexpected", unexpected),
                                        ("mis-shaped (file vs expected)", misshaped)) if items]
        raise ValueError(f"{', '.join(map(str, paths))} ({key_format} keys, {ae.kind} autoencoder "
                         f"{ae.layout_summary()}) does not load strictly:\n  " + "\n  ".join(problems))
    ae.load_state_dict(tensors, strict=True)


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
        except ValueError as error:
            raise ValueError(f"{path}: metadata scaling_factor / shift_factor are not numbers: {error}") from error
        if "family" in metadata:
            stored["family"] = metadata["family"]
        return stored
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("_class_name") not in ("AutoencoderKL", "AutoencoderTiny") \
            or config.get("scaling_factor") is None:
        log(f"ignoring {config_path}: not a diffusers AutoencoderKL/AutoencoderTiny config with a scaling_factor")
        return {}
    # diffusers: a null or absent shift_factor means no shift
    return {"scaling_factor": float(config["scaling_factor"]), "shift_factor": float(config.get("shift_factor") or 0.0),
            "source": str(config_path)}


def resolve_latent_space(ae, family, scaling_factor, shift_factor, stored, hint):
    """Precedence: explicit scaling_factor= / shift_factor=, then an explicit family=, then what is stored with the
    checkpoint, then the family its full checkpoint points to, then the default for its latent width.
    Returns (family, scale, shift, a line saying where each came from)."""
    kind, channels = ae.kind, ae.latent_channels
    known = [name for name, (k, c, _, _) in FAMILIES.items() if (k, c) == (kind, channels)]
    if family is not None and family not in known:
        raise ValueError(f"family={family!r} does not fit a {kind} autoencoder with {channels} latent channels; "
                         f"expected one of {known or ['(none: pass scaling_factor= and shift_factor=)']}")
    if family is not None:
        name, why = family, "family= argument"
    elif stored.get("family") in known + ["custom"]:
        name, why = stored["family"], stored["source"]
    elif stored:
        name = family_for(kind, channels, stored["scaling_factor"], stored["shift_factor"]) or "custom"
        why = f"constants in {stored['source']}"
    elif hint in known:
        name, why = hint, "the rest of the full checkpoint"
    elif (kind, channels) in DEFAULT_FAMILY:
        name = DEFAULT_FAMILY[kind, channels]
        why = f"default for {channels}-channel {kind} autoencoders; choose with family= / --vae-family among {known}"
    else:
        name, why = "custom", f"no known family has {channels} latent channels: pass scaling_factor= / --scaling-factor"
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
    an error. Weights are frozen, the module is in eval mode, in `dtype` (default float32) on `device`."""
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
    load_strict(ae, merged, origins, paths, key_format)
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


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm"}


def center_crop_arr(image, resolution):
    """ADM's center crop (guided-diffusion): halve with a box filter while the short side is >= 2x the target,
    resize bicubically so the short side is `resolution`, then crop the center. PIL image -> (R, R, 3) uint8."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image.convert("RGB"))
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top: top + resolution, left: left + resolution]


def to_model_images(arrays):
    """(B, H, W, 3) or (B, 3, H, W) uint8 tensor -> float images in [-1, 1], (B, 3, H, W)."""
    return arrays.float() / 127.5 - 1


def psnr(images, reference):
    """PSNR in dB of images in [-1, 1] against a reference (peak = the full [-1, 1] range), over the whole batch."""
    mse = ((images.float().clamp(-1, 1) - reference.float()) / 2).square().mean()
    return (10 * torch.log10(1 / mse)).item()


def list_images(folder):
    """Images directly in `folder` (no labels), or in class sub-folders (labels: index of the sorted folder name).
    Returns (files, labels or None, class names or None, number of non-image files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    entries = sorted(e for e in folder.iterdir() if not e.name.startswith((".", "_")))
    subfolders = [e for e in entries if e.is_dir()]
    top_files = [e for e in entries if e.is_file()]
    if subfolders and any(f.suffix.lower() in IMAGE_SUFFIXES for f in top_files):
        raise ValueError(f"--images {folder}: holds both images and sub-folders; expected either class sub-folders "
                         "(labels from their sorted names) or images directly in it (no labels)")
    if not subfolders:
        files = [f for f in top_files if f.suffix.lower() in IMAGE_SUFFIXES]
        labels, class_names, others = None, None, len(top_files) - len(files)
    else:
        files, labels, others = [], [], 0
        class_names = [d.name for d in subfolders]
        for label, class_folder in enumerate(subfolders):
            found = sorted(p for p in class_folder.rglob("*") if p.is_file())
            images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
            files += images
            labels += [label] * len(images)
            others += len(found) - len(images)
    if not files:
        raise ValueError(f"--images {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, class_names, others


class ImageFiles(torch.utils.data.Dataset):
    """(index, (3, R, R) uint8 tensor or None, error or None): an unreadable image is reported, not raised."""

    def __init__(self, files, resolution):
        self.files, self.resolution = files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on broken files: each is that image's
            with Image.open(self.files[index]) as image:
                array = center_crop_arr(image.convert("RGB"), self.resolution)
            return index, torch.from_numpy(array.copy()).permute(2, 0, 1), None
        except Exception as error:
            return index, None, f"{type(error).__name__}: {error}"


def keep_as_list(batch):
    return batch


# ----------------------------------------------------------------------------------------------------------
# encode: an image folder -> latents.npy (+ latents_flip.npy, labels.npy) + meta.json
# ----------------------------------------------------------------------------------------------------------

def write_json(path, value):
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(value, indent=1) + "\n")


def write_npy(path, array):
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.save(file, array)


def encode_share(args, ae, files, share, part, device, show_progress):
    """Encodes files[share] into part/latents.npy (and latents_flip.npy), resuming from part/progress.json when
    it was written by the same settings. Rows of unreadable images stay zero and are listed as skipped."""
    shape = (len(share), ae.latent_channels, args.resolution // ae.downsample, args.resolution // ae.downsample)
    key = hashlib.sha1(json.dumps([ae.describe(), [str(files[i]) for i in share], args.resolution, args.flip],
                                  ).encode()).hexdigest()
    names = ["latents.npy"] + (["latents_flip.npy"] if args.flip else [])
    progress_path = part / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    if progress.get("key") == key:
        arrays = [np.load(part / name, mmap_mode="r+") for name in names]
        print(f"encode: resuming {part} at {progress['done']}/{len(share)}", flush=True)
    else:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        arrays = [np.lib.format.open_memmap(part / name, mode="w+", dtype=np.float16, shape=shape) for name in names]
        progress = {"key": key, "done": 0, "skipped": []}
    dataset = torch.utils.data.Subset(ImageFiles([files[i] for i in share], args.resolution),
                                      range(progress["done"], len(share)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=keep_as_list)
    bar = tqdm(total=len(share), initial=progress["done"], unit="img", disable=not show_progress)
    for batch in loader:
        for index, _, error in batch:
            if error is not None:
                print(f"encode: skipped unreadable {files[share[index]]}: {error}", flush=True)
                progress["skipped"].append([index, str(files[share[index]]), error])
        good = [(index, image) for index, image, _ in batch if image is not None]
        if good:
            images = to_model_images(torch.stack([image for _, image in good]).to(device))
            if args.flip:
                images = torch.cat([images, images.flip(-1)])  # (2B, 3, R, R): flipped copies encoded alongside
            with torch.no_grad():
                latents = ae.encode(images).float().cpu().numpy().astype(np.float16)
            rows = [index for index, _ in good]
            for array, chunk in zip(arrays, np.split(latents, len(arrays))):
                array[rows] = chunk
        for array in arrays:
            array.flush()  # progress.json never claims rows that are not on disk
        progress["done"] = batch[-1][0] + 1
        write_json(progress_path, progress)
        bar.update(len(batch))
    bar.close()


def merge_shares(out, parts, names, files, shares, labels):
    """Rank 0: the valid rows of every share, in file order, into out/latents.npy etc. Returns the kept indices."""
    progresses = [json.loads((part / "progress.json").read_text()) for part in parts]
    for part, share, progress in zip(parts, shares, progresses):
        if progress["done"] != len(share):
            raise RuntimeError(f"{part} stopped at {progress['done']}/{len(share)}: rerun to resume")
    masks = []
    for share, progress in zip(shares, progresses):
        mask = np.ones(len(share), dtype=bool)
        mask[[index for index, _, _ in progress["skipped"]]] = False
        masks.append(mask)
    kept = [share[i] for share, mask in zip(shares, masks) for i in np.flatnonzero(mask)]
    if not kept:
        raise RuntimeError(f"no readable image among {len(files)} files")
    for name in names:
        sources = [np.load(part / name, mmap_mode="r") for part in parts]
        if len(parts) == 1 and masks[0].all():
            os.replace(parts[0] / name, out / name)  # one complete share: a rename, no copy
            continue
        with atomic_output(out / name) as temporary:
            merged = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float16,
                                               shape=(len(kept),) + sources[0].shape[1:])
            row = 0
            for source, mask in zip(sources, masks):
                for begin in range(0, len(mask), 4096):  # in chunks: a share can be larger than memory
                    chunk = source[begin: begin + 4096][mask[begin: begin + 4096]]
                    merged[row: row + len(chunk)] = chunk
                    row += len(chunk)
            merged.flush()
            del merged
    if labels is not None:
        write_npy(out / "labels.npy", np.asarray([labels[i] for i in kept], dtype=np.int64))
    skipped = [entry[1] for progress in progresses for entry in progress["skipped"]]
    return kept, skipped


def encode_folder(args, rank=0, world_size=1, barrier=lambda: None):
    """Each rank encodes a contiguous share of the sorted files into out/_partial/rank{r}-of-{w}/; after the
    barrier rank 0 merges them. meta.json is written last and marks a complete dataset: it is removed when a run
    starts, latents.npy only ever appears complete (rename), and a killed run resumes from its partial files."""
    out = Path(args.out)
    files, labels, class_names, others = list_images(args.images)
    device = torch.device(args.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    ae = load_autoencoder(args.vae, device=device,
                          scaling_factor=args.scaling_factor, shift_factor=args.shift_factor,
                          family=args.vae_family, verbose=rank == 0)
    if args.resolution % ae.downsample:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the autoencoder's {ae.downsample}x "
                         "downsampling")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "meta.json").unlink(missing_ok=True)
    shares = [range(r * len(files) // world_size, (r + 1) * len(files) // world_size) for r in range(world_size)]
    parts = [out / "_partial" / f"rank{r}-of-{world_size}" for r in range(world_size)]
    encode_share(args, ae, files, shares[rank], parts[rank], device, show_progress=rank == 0)
    barrier()
    if rank != 0:
        return
    names = ["latents.npy"] + (["latents_flip.npy"] if args.flip else [])
    kept, skipped = merge_shares(out, parts, names, files, shares, labels)
    produced = set(names) | ({"labels.npy"} if labels is not None else set())
    for stale in {"latents_flip.npy", "labels.npy"} - produced:
        (out / stale).unlink(missing_ok=True)  # left by an earlier run with other flags
    meta = {
        "autoencoder": str(Path(ae.files[0]).resolve()),
        "autoencoder_files": [str(Path(f).resolve()) for f in ae.files],
        "autoencoder_describe": ae.describe(),
        "family": ae.family, "scaling": ae.scaling_factor, "shift": ae.shift_factor,
        "resolution": args.resolution, "crop": "ADM center crop",
        "count": len(kept), "latent_shape": [ae.latent_channels, *[args.resolution // ae.downsample] * 2],
        "dtype": "float16", "latents": "latents.npy",
        "flip_latents": "latents_flip.npy" if args.flip else None,  # row i: image i flipped left-right
        "labels": "labels.npy" if labels is not None else None,
        "class_names": class_names, "num_classes": len(class_names) if class_names else None,
        "images": str(Path(args.images).resolve()), "skipped": len(skipped),
    }
    write_json(out / "meta.json", meta)
    shutil.rmtree(out / "_partial", ignore_errors=True)
    print(f"encode: wrote {len(kept)} latents {meta['latent_shape']} to {out} "
          f"({len(class_names) if class_names else 'no'} classes, {len(skipped)} unreadable images skipped"
          f"{': ' + ', '.join(skipped[:10]) if skipped else ''}{' ...' if len(skipped) > 10 else ''}; "
          f"{others} non-image files ignored)", flush=True)


def run_encode(args):
    """Single process, or one process per GPU under torchrun (RANK set): one node, since every rank writes its
    share into the same --out folder that rank 0 then reads."""
    if "RANK" not in os.environ:
        return encode_folder(args)
    import torch.distributed as dist
    # gloo: only a barrier is needed, and it must wait for the slowest rank's whole share
    dist.init_process_group("gloo", timeout=timedelta(hours=12))
    try:
        encode_folder(args, dist.get_rank(), dist.get_world_size(), barrier=dist.barrier)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# roundtrip: one image through the encoder and decoder
# ----------------------------------------------------------------------------------------------------------

def run_roundtrip(args):
    ae = load_autoencoder(args.vae, device=args.device,
                          scaling_factor=args.scaling_factor, shift_factor=args.shift_factor, family=args.vae_family)
    with Image.open(args.image) as image:
        image = image.convert("RGB")
        if args.resolution:
            if args.resolution % ae.downsample:
                raise ValueError(f"--resolution {args.resolution} is not a multiple of {ae.downsample}")
            array = center_crop_arr(image, args.resolution)
        else:  # the largest centered crop whose sides are multiples of the downsampling
            array = np.asarray(image)
            height, width = (side - side % ae.downsample for side in array.shape[:2])
            top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
            array = array[top: top + height, left: left + width]
    images = to_model_images(torch.from_numpy(array.copy()).permute(2, 0, 1)[None]).to(args.device)
    with torch.no_grad():
        decoded = ae.decode(ae.encode(images))
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
    out = Path(args.out)
    with atomic_output(out) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")
    value = psnr(to_model_images(torch.from_numpy(pixels)), to_model_images(torch.from_numpy(array.copy())))
    print(f"roundtrip: PSNR {value:.2f} dB for {args.image} at {array.shape[1]}x{array.shape[0]}; wrote {out}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Autoencoder tools for lpl: encode an image folder to flat files, "
                                                 "or round-trip one image.")
    commands = parser.add_subparsers(dest="command", required=True)
    vae = argparse.ArgumentParser(add_help=False)
    vae.add_argument("--vae", type=Path, nargs="+", required=True,
                     help="checkpoint(s): .safetensors/.ckpt/.pt/.pth or a diffusers folder; a tiny *_encoder.pth "
                          "picks up its *_decoder.pth sibling")
    vae.add_argument("--vae-family", choices=list(FAMILIES), default=None,
                     help="latent space; default: stored with the checkpoint, else sd (4 channels), sd3 (16), "
                          "taesd/taef1/taef2 (tiny)")
    vae.add_argument("--scaling-factor", type=float, default=None, help="overrides the family's / stored scale")
    vae.add_argument("--shift-factor", type=float, default=None, help="overrides the family's / stored shift")
    vae.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    encode = commands.add_parser("encode", parents=[vae], help="image folder -> latents.npy, labels.npy, meta.json")
    encode.add_argument("--images", type=Path, required=True, help="images, or class sub-folders of images")
    encode.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    encode.add_argument("--resolution", type=int, default=256, help="ADM center crop to this square size")
    encode.add_argument("--flip", action="store_true", help="also write latents_flip.npy (left-right flipped images)")
    encode.add_argument("--batch-size", type=int, default=32)
    encode.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    roundtrip = commands.add_parser("roundtrip", parents=[vae], help="encode + decode one image, print the PSNR")
    roundtrip.add_argument("--image", type=Path, required=True)
    roundtrip.add_argument("--out", type=Path, required=True, help="decoded PNG to write")
    roundtrip.add_argument("--resolution", type=int, default=None,
                           help="ADM center crop to this size (default: the image, cropped to multiples of 8)")
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "workers", 0) < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    try:
        return run_encode(args) if args.command == "encode" else run_roundtrip(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"autoencoder.py {args.command}: error: {error}") from error


if __name__ == "__main__":
    main()
