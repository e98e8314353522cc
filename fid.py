"""Bundled evaluator: FID, precision / recall / density / coverage, and the power spectrum of paper Fig. 4 and 5.

    # 1. reference statistics of real images (a folder of image files, searched recursively, or an ADM-style npz)
    python fid.py stats --images /data/imagenet256/val --inception pt_inception-2015-12-05-6726825d.pth --out ref.npz
    # 2. evaluate samples written by sample.py (uint8 NHWC images in arr_0, sampling settings in `meta`)
    python fid.py eval --ref ref.npz --samples samples.npz --inception pt_inception-2015-12-05-6726825d.pth \\
        --prdc --spectrum-plot spectrum.png --json report.json
    # 3. power spectra of image sets, the first one is the reference (no Inception needed)
    python fid.py spectrum real/ baseline.npz lpl.npz --plot spectra.png --json spectra.json --csv spectra.csv

Nothing is downloaded. The Inception weights are the ones pytorch-fid ported from the TensorFlow FID code; get
pt_inception-2015-12-05-6726825d.pth from FID_WEIGHTS_URL below and pass its path to --inception.

The pipeline is layered as images -> Inception activations -> statistics -> distance:
- FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) on the 2048-d pool features, equal to
  pytorch-fid 0.3.0's calculate_frechet_distance (to 1e-13 relative, measured with scipy 1.17), N < 2048 included.
- Precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020), equal to the `prdc`
  package 0.2 (open balls), on at most --max-features features per set (default 10000, a seeded random subset).
- Power spectrum: the radially averaged log power spectrum of grayscale images (section 4.2 of the paper), every
  image first resized to the reference's size (the first image's) as Inception resizes: see SpectrumMean.
Errors in the input (a broken image, a junk npz, wrong shapes) stop a command with one line naming the file.

Files: a reference statistics npz holds `mu`, `sigma` (float64), `features` (float32 subset for --prdc), `spectrum`
(mean log10 power per cycle per image) and `meta` (a 0-d string array holding a JSON object: image count, source,
Inception weights sha256, resize method, spectrum_size). Samples npz files may carry the same kind of `meta` array,
written by sample.py (sampler, steps, guidance, checkpoint, autoencoder); eval copies it to `samples_meta`.
"""

import argparse
import csv
import hashlib
import io
import json
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from runtime import IMAGE_SUFFIXES, atomic_output, one_line_errors, rgb_image, write_json, write_text

# ----------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name ends with its sha256 prefix
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
IMAGE_KINDS = "/".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))  # the encoder's (data.py) list
NPZ_IMAGES = "uint8 images (N, H, W, 3) in key 'arr_0' (as sample.py writes them)"
RESIZE_METHOD = "torch bilinear to 299x299, align_corners=False, no antialias (as pytorch-fid)"  # see resize()
DEFAULT_MAX_FEATURES = 10_000
FEATURE_SUBSET_SEED = 0  # which images keep their features for precision / recall (a fixed, seeded random subset)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 grayscale
POWER_FLOOR = 1e-12  # power is floored before log10 so that a flat image gives a finite spectrum


# ----------------------------------------------------------------------------------------------------------------
# Files: atomic writes, input checks, image sets (folders and ADM-style npz)
# ----------------------------------------------------------------------------------------------------------------

def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_finite_images(images, source):
    """Refuse images (or features; the first axis indexes them) holding NaN or inf, naming `source` and them."""
    bad = ~torch.isfinite(torch.as_tensor(images).reshape(len(images), -1)).all(dim=1)
    if bad.any():
        raise ValueError(f"{source}: {int(bad.sum())} of {len(bad)} images hold NaN or inf values (first indices "
                         f"{bad.nonzero().flatten()[:10].tolist()}); refusing to evaluate them")


def read_meta(array, source):
    """Parse the `meta` array of the npz file `source`: a 0-d string array holding a JSON object."""
    try:
        meta = json.loads(array.item()) if array.ndim == 0 else None  # str or bytes
    except (TypeError, ValueError):  # not text, or not JSON
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: key 'meta' must be a 0-d string array holding a JSON object, "
                         f"got dtype {array.dtype} shape {array.shape}")
    return meta


class ImageFolder(torch.utils.data.Dataset):
    """Image files under a folder (recursively, sorted; the encoder's suffixes), decoded to uint8 (3, H, W). An
    unreadable file stops the pass with an error naming it (statistics of a silently shrunk set would not be
    comparable); __getitem__ returns the error text so that it reaches the main process as one line."""

    def __init__(self, folder):
        self.path = Path(folder)
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"{folder}: no {IMAGE_KINDS} files found (searched recursively)")
        self.meta, self.arrays = None, []

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:  # PIL raises OSError, SyntaxError, ValueError, ... on a broken file
            with Image.open(self.files[index]) as image:
                pixels = np.asarray(rgb_image(image))  # (H, W, 3) uint8
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (3, H, W)

    def batches(self, batch_size, workers):
        loader = torch.utils.data.DataLoader(self, batch_size=batch_size, num_workers=workers, collate_fn=list)
        for start, batch in zip(range(0, len(self), batch_size), loader):
            for index, item in enumerate(batch, start):
                if isinstance(item, str):
                    raise ValueError(f"{self.files[index]}: not a readable image ({item}); expected an image file "
                                     f"({IMAGE_KINDS}): remove or replace it")
            yield batch


def read_npy_header(stream):
    """(shape, fortran_order, dtype) of the .npy file open in `stream`, leaving it at the start of the data."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)


def load_npz(path, expected, skip=()):
    """(key names, {key: array} but the keys in `skip`) of an .npz archive, never unpickling; anything else is
    refused in one line that names the file and `expected`."""
    with open(path, "rb") as file:
        signature = file.read(4)
    if signature not in (b"PK\x03\x04", b"PK\x05\x06"):  # every zip archive starts with one of these
        raise ValueError(f"{path}: not an .npz archive (no zip signature); expected {expected}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return data.files, {key: data[key] for key in data.files if key not in skip}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: damaged .npz ({type(error).__name__}: {error}); expected {expected}") from None


class NpzImages:
    """ADM-style npz: uint8 NHWC images in `arr_0`, streamed from the archive in batches (bounded memory)."""

    def __init__(self, path):
        self.path = Path(path)
        self.arrays, small = load_npz(self.path, NPZ_IMAGES, skip=("arr_0",))
        self.meta = read_meta(small["meta"], path) if "meta" in small else None
        if "arr_0" not in self.arrays:
            raise ValueError(f"{path}: no key 'arr_0' (found {self.arrays}); expected {NPZ_IMAGES}")
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as stream:
            self.shape, fortran_order, self.dtype = read_npy_header(stream)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3 or fortran_order:
            order = " (Fortran order)" if fortran_order else ""
            raise ValueError(f"{path}: key 'arr_0' is {self.dtype} with shape {self.shape}{order}; expected "
                             f"{NPZ_IMAGES}, C order (round and clip float samples first)")

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size, workers=0):
        """Yield lists of uint8 (3, H, W) tensors; `workers` is unused because a zip member is read sequentially."""
        image_bytes = math.prod(self.shape[1:])
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as stream:
            read_npy_header(stream)  # the stream is now at the first pixel
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                raw = stream.read(count * image_bytes)
                if len(raw) != count * image_bytes:
                    raise ValueError(f"{self.path}: key 'arr_0' is truncated at image {start}")
                pixels = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(count, *self.shape[1:]).copy())
                yield list(pixels.permute(0, 3, 1, 2))  # count x (3, H, W)


def open_images(path):
    """A folder of images or an npz file, with len(), batches(batch_size, workers), .meta and .arrays."""
    path = Path(path)
    if path.is_dir():
        return ImageFolder(path)
    if path.suffix == ".npz" and path.is_file():
        return NpzImages(path)
    raise FileNotFoundError(f"{path}: not found; expected a folder of images ({IMAGE_KINDS}) or an .npz with "
                            f"{NPZ_IMAGES}")


# ----------------------------------------------------------------------------------------------------------------
# InceptionV3 for FID: the TensorFlow graph ported by pytorch-fid, with torchvision's Inception3 key names
# ----------------------------------------------------------------------------------------------------------------

def resize(images, size):
    """(N, C, H, W) float -> (N, C, *size): the resize of pytorch-fid's InceptionV3 (RESIZE_METHOD), also used to
    bring image sets to one size before their power spectra."""
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, the TF value) + ReLU; torchvision calls it BasicConv2d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 average pool that, like TensorFlow, leaves the zero padding out of the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches (pytorch-fid's FIDInceptionA)."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (unchanged from torchvision)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (pytorch-fid's FIDInceptionC)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (unchanged from torchvision)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches. The TF graph pools differently in its two copies:
    pool="avg" is pytorch-fid's FIDInceptionE_1 (Mixed_7b, average pool without the padding),
    pool="max" is FIDInceptionE_2 (Mixed_7c, a max pool, most likely a bug in the TF graph that FID inherited)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = {"avg": tf_avg_pool, "max": lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1)}[pool]
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = self.branch_pool(self.pool(x))
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], 1)  # 320+768+768+192 = 2048


class InceptionV3(nn.Module):
    """FID Inception: images in [0, 1] of any size -> (N, 2048) pool features.

    Module names are torchvision's Inception3 (num_classes=1008, no aux logits), so the pytorch-fid weights file
    loads with strict key checking. Build it with InceptionV3.from_file(path)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)  # the TF graph's 1008 logits: in the weights file, unused by FID

    def forward(self, images):
        x = resize(images, (INCEPTION_SIZE, INCEPTION_SIZE))
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range of the TF graph
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048), the global average pool

    @classmethod
    def from_file(cls, path):
        """Load pt_inception-2015-12-05-6726825d.pth with strict key and shape checks; returns (model, sha256).

        BatchNorm's `num_batches_tracked` counters are the one exception: they only matter in training, older
        torch versions did not save them, so a missing one is filled with 0 (a present one is loaded)."""
        path = Path(path)
        expected = f"the FID Inception weights {FID_WEIGHTS_NAME} (sha256 starts with {FID_WEIGHTS_SHA256_PREFIX})"
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found. Nothing is downloaded: get {expected} "
                                    f"from {FID_WEIGHTS_URL} and pass its path with --inception")
        sha256 = sha256_of(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} is not a readable PyTorch state dict ({type(error).__name__}: {error}); "
                             f"expected {expected}. Truncated? Get it again from {FID_WEIGHTS_URL}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; expected {expected}")
        model = cls()
        wanted = model.state_dict()
        missing = [k for k in wanted if k not in state and not k.endswith(".num_batches_tracked")]
        unexpected = [k for k in state if k not in wanted]
        wrong_shape = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in wanted.items()
                       if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if missing or unexpected or wrong_shape:
            problems = [f"{len(items)} {name}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                        for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                            ("keys with the wrong shape", wrong_shape)) if items]
            raise ValueError(f"{path} does not match the FID InceptionV3 ({'; '.join(problems)}); "
                             f"expected {expected} from {FID_WEIGHTS_URL}")
        state = {k: state.get(k, v) for k, v in wanted.items()}  # fills the missing num_batches_tracked only
        model.load_state_dict(state, strict=True)
        if not sha256.startswith(FID_WEIGHTS_SHA256_PREFIX):
            warnings.warn(f"{path} has the FID Inception layout but sha256 {sha256[:8]}..., not "
                          f"{FID_WEIGHTS_SHA256_PREFIX}...: its FIDs are not comparable with published ones")
        return model.eval().requires_grad_(False), sha256


@torch.no_grad()
def inception_features(model, images, device):
    """A list of uint8 (3, H, W) images -> (N, 2048) float32 features, computed in float32 even under autocast."""
    if len({tuple(image.shape) for image in images}) == 1:
        batch = torch.stack(images).to(device).float() / 255  # (N, 3, H, W)
    else:  # mixed sizes: resize one by one with the same bilinear resize the model applies
        batch = torch.cat([resize(image[None].to(device).float() / 255, (INCEPTION_SIZE, INCEPTION_SIZE))
                           for image in images])
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        return model(batch)


# ----------------------------------------------------------------------------------------------------------------
# Feature statistics, accumulated in float64
# ----------------------------------------------------------------------------------------------------------------

class FeatureStatistics:
    """Running mean and covariance of features in float64 (float32 accumulators are a known source of wrong FIDs).

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979): exact, and free of the
    cancellation of sum(x x^T) - n mu mu^T. The covariance is unbiased (n - 1), as np.cov in pytorch-fid."""

    def __init__(self):
        self.count, self.mean, self.scatter = 0, 0.0, 0.0  # mean (D,), scatter (D, D): sum of centred x x^T

    def update(self, features):
        batch = features.to(torch.float64)  # (B, D)
        batch_mean = batch.mean(0)
        centred = batch - batch_mean
        batch_scatter = centred.T @ centred  # (D, D)
        delta = batch_mean - self.mean
        total = self.count + len(batch)
        self.mean = self.mean + delta * (len(batch) / total)
        self.scatter = self.scatter + batch_scatter + torch.outer(delta, delta) * (self.count * len(batch) / total)
        self.count = total

    def mean_and_covariance(self, source="features"):
        if self.count < 2:
            raise ValueError(f"{source}: a covariance needs at least 2 images, got {self.count}")
        return self.mean.cpu().numpy(), (self.scatter / (self.count - 1)).cpu().numpy()


def subset_mask(count, size):
    """Which of `count` images keep their features: a seeded random subset of `size` (all if fewer); random, as
    the first ones of folders sorted by class would be a few classes only."""
    keep = np.zeros(count, dtype=bool)
    keep[np.random.default_rng(FEATURE_SUBSET_SEED).choice(count, size=min(size, count), replace=False)] = True
    return keep


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------

def _cholesky(sigma):
    """Lower-triangular L with sigma = L L^T, or None when sigma is numerically rank deficient (the factorisation
    fails, or a pivot is below the tolerance np.linalg.matrix_rank would use)."""
    try:
        lower = np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        return None
    pivots = np.diag(lower) ** 2
    return None if pivots.min() <= pivots.max() * len(pivots) * np.finfo(np.float64).eps else lower


def trace_sqrt_product_as_pytorch_fid(sigma1, sigma2, eps):
    """tr((S1 S2)^1/2) by the steps of pytorch-fid 0.3.0's calculate_frechet_distance, with the installed scipy:
    sqrtm(S1 S2), or if that is not finite sqrtm((S1 + eps I)(S2 + eps I)) ("adding eps to diagonal of cov
    estimates"); the real part, refused (as there) if an imaginary part on the diagonal exceeds 1e-3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # "Matrix is singular": the case at hand
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(len(sigma1))
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
            warnings.warn(f"Frechet distance: singular product; added {eps} to the diagonal of both covariances "
                          f"inside the square root, as pytorch-fid does")
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f"Frechet distance: (S1 S2)^1/2 has imaginary components up to "
                         f"{np.abs(covmean.imag).max():.3g} (pytorch-fid refuses these too)")
    return np.trace(covmean.real)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6): pytorch-fid 0.3.0's
    calculate_frechet_distance with the same scipy (to 1e-13 relative, measured; N < dim included).

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2). Full-rank covariances (Cholesky pivots above the
    np.linalg.matrix_rank tolerance): tr((S1 S2)^1/2) = sum_i sqrt(lambda_i) over the eigenvalues of the symmetric
    L^T S2 L, S1 = L L^T (L^-1 (S1 S2) L = L^T S2 L: same spectrum), negatives from round-off clipped to 0; one
    symmetric eigenvalue problem, faster than sqrtm (`bench.py fid`), and S1 S2 has positive eigenvalues, so
    pytorch-fid's sqrtm is finite and adds no eps either. Singular ones (fewer images than dimensions): pytorch-fid's
    own steps (trace_sqrt_product_as_pytorch_fid: eps * I only where its sqrtm is not finite), with a warning."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = len(mu1)
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if value.shape != shape:
            raise ValueError(f"Frechet distance: {name} has shape {value.shape}, expected {shape} (mu1 is {dim}-d)")
        if not np.isfinite(value).all():
            raise ValueError(f"Frechet distance: {name} holds NaN or inf")
    lower = _cholesky(sigma1)
    if lower is not None and _cholesky(sigma2) is not None:
        product = lower.T @ sigma2 @ lower
        eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)  # symmetrise away round-off
        trace_sqrt_product = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    else:
        warnings.warn(f"Frechet distance: singular covariance (fewer images than {dim} dimensions?), computed with "
                      f"scipy.linalg.sqrtm as pytorch-fid; an FID of so few images is biased upwards")
        trace_sqrt_product = trace_sqrt_product_as_pytorch_fid(sigma1, sigma2, eps)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


# ----------------------------------------------------------------------------------------------------------------
# Precision, recall, density, coverage in chunks
# ----------------------------------------------------------------------------------------------------------------

def squared_distances(a, b):
    """Squared Euclidean distances (len(a), len(b)) as |a|^2 + |b|^2 - 2 a.b, one matrix product (float64 inputs).
    Values within the round-off of that expansion (dim * eps * (|a|^2 + |b|^2)) are set to exactly 0, so that a
    point is at distance 0 from itself and from its duplicates (as sklearn's zeroed diagonal in prdc), never below."""
    norms_a, norms_b = a.square().sum(1)[:, None], b.square().sum(1)[None, :]
    squared = norms_a + norms_b - 2 * a @ b.T  # (len(a), len(b))
    round_off = a.shape[1] * torch.finfo(a.dtype).eps * (norms_a + norms_b)
    return torch.where(squared <= round_off, 0.0, squared)


def knn_radii(points, k, chunk_size):
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for rows in points.split(chunk_size):
        nearest = rows.new_empty(len(rows), 0)  # (r, <= k + 1) smallest distances so far, the point itself included
        for columns in points.split(chunk_size):
            candidates = torch.cat([nearest, squared_distances(rows, columns)], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest.amax(dim=1))
    return torch.cat(radii)


def prdc(real_features, fake_features, k=5, chunk_size=4096):
    """Precision, recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020).

    With r_i the distance from real i to its k-th nearest real neighbour and s_j the same for fake j:
      precision = mean_j [exists i: d(i, j) < r_i]      recall   = mean_i [exists j: d(i, j) < s_j]
      density   = mean_j #{i: d(i, j) < r_i} / k         coverage = mean_i [exists j: d(i, j) < r_i]
    That is compute_prdc of the `prdc` package 0.2 (Naeem et al.'s code), open balls (strict <) included, and its
    numbers (to 2e-16, measured): identical sets give 1 for all four (a ball holds its centre, its k-th neighbour
    sits on the sphere, outside); a point with k duplicates has an empty ball (r_i = 0).

    Distances are computed in float64 on the features' device, in chunk_size x chunk_size blocks (k-NN radii by
    a running top-k over column blocks): memory stays bounded, never an N x M matrix. A radius and the distances
    compared with it come from the same block products, so ties (identical sets) are exact."""
    real = torch.as_tensor(real_features).to(torch.float64)
    fake = torch.as_tensor(fake_features).to(real.device, torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision / recall: expected (N, D) real and (M, D) fake features, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision / recall: k={k} nearest neighbours (--prdc-k) need more than {k} points per "
                         f"set, got {len(real)} real and {len(fake)} fake")
    for name, features in (("real_features", real), ("fake_features", fake)):
        if not torch.isfinite(features).all():
            raise ValueError(f"precision / recall: {name} hold NaN or inf values")
    real_radii, fake_radii = knn_radii(real, k, chunk_size), knn_radii(fake, k, chunk_size)
    precision_hit, recall_hit, coverage_hit = (torch.zeros(n, dtype=torch.bool, device=real.device)
                                               for n in (len(fake), len(real), len(real)))
    density_count = torch.zeros(len(fake), dtype=torch.int64, device=real.device)
    for i in range(0, len(real), chunk_size):
        rows = slice(i, i + chunk_size)
        for j in range(0, len(fake), chunk_size):
            columns = slice(j, j + chunk_size)
            distance = squared_distances(real[rows], fake[columns])  # (r, c), compared with squared radii
            in_real_ball = distance < real_radii[rows, None]  # fake j inside the open k-NN ball of real i
            in_fake_ball = distance < fake_radii[None, columns]  # real i inside the open k-NN ball of fake j
            precision_hit[columns] |= in_real_ball.any(dim=0)
            density_count[columns] += in_real_ball.sum(dim=0)
            coverage_hit[rows] |= in_real_ball.any(dim=1)
            recall_hit[rows] |= in_fake_ball.any(dim=1)
    return {"precision": precision_hit.double().mean().item(), "recall": recall_hit.double().mean().item(),
            "density": density_count.double().mean().item() / k, "coverage": coverage_hit.double().mean().item()}


# ----------------------------------------------------------------------------------------------------------------
# Power spectrum (paper Fig. 4 and 5)
# ----------------------------------------------------------------------------------------------------------------

def _radial_bins(height, width, device):
    """Integer radius of every pixel of an fftshift-ed spectrum, in cycles per image along the shorter side."""
    side = min(height, width)
    fy = (torch.arange(height, device=device) - height // 2) * (side / height)  # zero frequency at index H // 2
    fx = (torch.arange(width, device=device) - width // 2) * (side / width)
    return torch.hypot(fy[:, None], fx[None, :]).round().long().flatten()  # (H * W,)


def radial_power_spectrum(images):
    """Radially averaged log power spectrum of each image: (N, 3 or 1, H, W) or (N, H, W) -> (N, min(H, W) // 2 + 1).

    Steps: grayscale (BT.601 luma) in float64; F = fft2; power |F|^2 / (H W) (so white noise of variance v is
    flat at v); fftshift; every pixel's radius rounded to an integer bin; mean power per bin; log10.
    Column f is f cycles per image along the shorter side (0 = mean brightness, the last one the Nyquist
    frequency); the corners beyond Nyquist are dropped, they are not full rings. No window is applied.
    The lowest bins average few pixels, so their log sits a little low (the log of a mean of few values); the
    bias is the same for every set of same-size images and cancels in differences between sets. Compare one size
    only: the same content at more pixels has more power per bin (x H W; SpectrumMean resizes)."""
    images = torch.as_tensor(images)
    check_finite_images(images, "power spectrum input")
    if images.ndim == 4 and images.shape[1] == 3:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64, device=images.device)
        gray = torch.einsum("nchw,c->nhw", images.to(torch.float64), weights)  # (N, H, W)
    elif (images.ndim == 4 and images.shape[1] == 1) or images.ndim == 3:
        gray = images.reshape(-1, *images.shape[-2:]).to(torch.float64)  # (N, H, W)
    else:
        raise ValueError(f"power spectrum: expected images (N, 3, H, W), (N, 1, H, W) or (N, H, W), "
                         f"got {tuple(images.shape)}")
    height, width = gray.shape[-2:]
    power = torch.fft.fftshift(torch.fft.fft2(gray), dim=(-2, -1)).abs().square() / (height * width)  # (N, H, W)
    bins = _radial_bins(height, width, gray.device)
    inside = bins <= min(height, width) // 2
    n_bins = min(height, width) // 2 + 1
    sums = power.new_zeros(len(gray), n_bins).index_add_(1, bins[inside], power.flatten(1)[:, inside])
    counts = torch.bincount(bins[inside], minlength=n_bins)
    return torch.log10((sums / counts).clamp_min(POWER_FLOOR))  # (N, n_bins)


class SpectrumMean:
    """Mean over a set of the per-image log10 spectra (so the set difference is the mean per-image difference).
    Every image is first brought to one size (H, W), `size` or else the first image's, by resize() (the Inception
    resize, RESIZE_METHOD): the power per bin of the same content grows with the pixel count (the same photos at
    64 and 500 px sit (500 / 64)^2, 1.8 decades, apart), so only spectra of one size compare bin by bin."""

    def __init__(self, size=None):
        self.size, self.total, self.count, self.resized = size and tuple(size), 0.0, 0, 0

    def update(self, images, device):
        self.size = self.size or tuple(images[0].shape[-2:])
        batch = [image[None].to(device).float() / 255 for image in images]  # B x (1, 3, h, w)
        self.resized += sum(x.shape[-2:] != self.size for x in batch)
        batch = torch.cat([x if x.shape[-2:] == self.size else resize(x, self.size) for x in batch])  # (B, 3, H, W)
        self.total = self.total + radial_power_spectrum(batch).sum(0)  # (n_bins,)
        self.count += len(batch)

    def mean(self):
        return (self.total / self.count).cpu().numpy()


def octave_bands(n_bins):
    """Octaves [1, 1], [2, 3], [4, 7], ... in cycles per image (inclusive); the last one runs to Nyquist."""
    nyquist, bands, low = n_bins - 1, [], 1
    while low <= nyquist:
        high = nyquist if 2 * low >= nyquist else 2 * low - 1  # a lone Nyquist bin joins the octave below
        bands.append((low, high))
        low = high + 1
    return bands


def upper_octave_log_ratio(images, reference):
    """log10(P(images) / P(reference)) per image pair over the upper octave: (N, 3, H, W) x 2 -> (N, K) float64.

    P: radial_power_spectrum's per-image power (BT.601 luma, |F|^2 / (H W), integer radius bins, floored at
    POWER_FLOOR), so this is the difference of the two log10 spectra on the K bins of the last band of octave_bands,
    [f_max / 2, f_max] cycles per image (f_max = min(H, W) // 2) for power-of-two sizes. Negative: the images miss
    high-frequency power (blur); positive: extra (noise); identical images give exactly 0. Give both in one range
    ([-1, 1] or [0, 1]): an offset moves only the DC bin, a scale every bin."""
    if images.shape != reference.shape or images.ndim != 4:
        raise ValueError(f"high-frequency error: expected two (N, 3, H, W) batches of one shape, got "
                         f"{tuple(images.shape)} and {tuple(reference.shape)}")
    log_ratio = radial_power_spectrum(images) - radial_power_spectrum(reference)  # (N, n_bins)
    low, high = octave_bands(log_ratio.shape[1])[-1]
    return log_ratio[:, low:high + 1]  # (N, K)


def compare_spectra(spectra):
    """spectra: {name: mean log10 power (n_bins,)} of images of one size, the first the reference -> a JSON-ready
    dict of the curves, their differences to the reference (paper Fig. 4) and errors per octave band (Fig. 5)."""
    names = list(spectra)
    lengths = {name: len(curve) for name, curve in spectra.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"power spectra of different lengths {lengths}: the image sets have different sizes, and "
                         f"their spectra would differ by a flat offset; remake the reference with `fid.py stats`")
    n_bins, curves = lengths[names[0]], {name: np.asarray(spectra[name], np.float64) for name in names}
    reference = curves[names[0]]
    result = {"reference": names[0], "frequency_cycles_per_image": list(range(n_bins)),
              "log10_power": {name: curve.tolist() for name, curve in curves.items()},
              "difference_to_reference": {}, "band_error": {}}
    for name in names[1:]:
        difference = curves[name] - reference
        result["difference_to_reference"][name] = difference.tolist()
        result["band_error"][name] = [
            {"cycles_per_image": [low, high],
             "mean_abs_log10_difference": float(np.abs(difference[low:high + 1]).mean()),
             "mean_log10_difference": float(difference[low:high + 1].mean())} for low, high in octave_bands(n_bins)]
    return result


def write_spectrum_csv(path, comparison):
    """One row per frequency: the log10 power of every set, then every set's difference to the reference."""
    names, differences, text = list(comparison["log10_power"]), comparison["difference_to_reference"], io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["cycles_per_image"] + [f"log10_power:{n}" for n in names]
                    + [f"difference_to_reference:{n}" for n in differences])
    for f in comparison["frequency_cycles_per_image"]:
        writer.writerow([f] + [f"{comparison['log10_power'][n][f]:.6g}" for n in names]
                        + [f"{differences[n][f]:.6g}" for n in differences])
    write_text(path, text.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Plot with Pillow only: two panels (log10 power; difference to the reference), ticks, labels, legend, title
# ----------------------------------------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def nice_ticks(low, high, count=6):
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
    low, high = (low - 0.5, high + 0.5) if high <= low else (low, high)
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    decimals = max(0, -math.floor(math.log10(step)))
    first, last = math.floor(low / step), math.ceil(high / step)
    return [round(i * step, decimals) for i in range(first, last + 1)]


def draw_panel(draw, box, curves, title, x_label, y_label, font):
    """Line plot of curves [(name, xs, ys, color)] inside box = (left, top, right, bottom) of the figure."""
    left, top, right, bottom = box
    x_ticks, y_ticks = (nice_ticks(min(np.min(c[i]) for c in curves), max(np.max(c[i]) for c in curves))
                        for i in (1, 2))
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x, y):
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    for x in x_ticks:
        px, _ = to_pixel(x, y_low)
        draw.line([(px, top), (px, bottom)], fill="#e6e6e6")
        draw.line([(px, bottom), (px, bottom + 5)], fill="black")
        draw.text((px, bottom + 8), f"{x:g}", fill="black", font=font, anchor="mt")
    for y in y_ticks:
        _, py = to_pixel(x_low, y)
        draw.line([(left, py), (right, py)], fill="#e6e6e6")
        draw.line([(left - 5, py), (left, py)], fill="black")
        draw.text((left - 8, py), f"{y:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    for name, curve_x, curve_y, color in curves:
        draw.line([to_pixel(x, y) for x, y in zip(curve_x, curve_y)], fill=color, width=2)
    draw.text(((left + right) / 2, top - 10), title, fill="black", font=font, anchor="md")
    draw.text(((left + right) / 2, bottom + 30), x_label, fill="black", font=font, anchor="mt")
    draw.text((left, top - 28), y_label, fill="black", font=font, anchor="lm")


def draw_legend(draw, right, top, entries, font):
    """Legend box [(name, color)] with its top-right corner at (right, top)."""
    left = right - 40 - max(draw.textlength(name, font=font) for name, _ in entries)
    draw.rectangle([left, top, right, top + 8 + 20 * len(entries)], fill="white", outline="black")
    for y, (name, color) in zip(range(top + 14, top + 14 + 20 * len(entries), 20), entries):
        draw.line([(left + 8, y), (left + 28, y)], fill=color, width=3)
        draw.text((left + 34, y), name, fill="black", font=font, anchor="lm")


def plot_spectra(path, comparison, title):
    """PNG of the curves (DC left out: it is the mean brightness, it stays in the JSON / CSV) and differences."""
    names = list(comparison["log10_power"])
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    frequency = np.asarray(comparison["frequency_cycles_per_image"][1:])
    image = Image.new("RGB", (1400, 620), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=15)
    draw.text((700, 22), title, fill="black", font=ImageFont.load_default(size=20), anchor="mt")
    power_curves = [(n, frequency, np.asarray(comparison["log10_power"][n][1:]), colors[n]) for n in names]
    draw_panel(draw, (90, 110, 670, 540), power_curves, "Radially averaged power spectrum",
               "frequency (cycles per image)", "log10 power", font)
    reference, differences = comparison["reference"], comparison["difference_to_reference"]
    difference_curves = [(n, frequency, np.asarray(differences[n][1:]) if n in differences else 0 * frequency,
                          colors[n]) for n in names]
    draw_panel(draw, (790, 110, 1370, 540), difference_curves, f"Difference to {reference}",
               "frequency (cycles per image)", "log10 power - reference", font)
    draw_legend(draw, 660, 120, [(n, colors[n]) for n in names], font)
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG")


# ----------------------------------------------------------------------------------------------------------------
# One pass over an image set
# ----------------------------------------------------------------------------------------------------------------

def measure_images(images, device, batch_size, workers, inception=None, keep_features=0, spectrum=False,
                   spectrum_size=None):
    """Inception statistics (with a feature subset of size keep_features) and / or the mean spectrum of a set,
    its images brought to spectrum_size (default: the first image's size) first."""
    statistics = FeatureStatistics()
    spectrum_mean = SpectrumMean(spectrum_size) if spectrum else None
    keep = subset_mask(len(images), keep_features)
    kept, start = [], 0
    with tqdm(total=len(images), unit="img", desc=str(images.path)) as progress:
        for batch in images.batches(batch_size, workers):
            if inception is not None:
                features = inception_features(inception, batch, device)  # (B, 2048)
                check_finite_images(features, f"{images.path}: Inception features of the batch from image {start}")
                statistics.update(features)
                kept.append(features[torch.from_numpy(keep[start:start + len(batch)]).to(device)].cpu())
            if spectrum_mean is not None:
                spectrum_mean.update(batch, device)
            start += len(batch)
            progress.update(len(batch))
    result = {"count": len(images)}
    if inception is not None:
        result["mu"], result["sigma"] = statistics.mean_and_covariance(images.path)
        result["features"] = torch.cat(kept).numpy()
    if spectrum_mean is not None:
        result.update(spectrum=spectrum_mean.mean(), spectrum_size=list(spectrum_mean.size),
                      spectrum_resized=spectrum_mean.resized)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------

def command_stats(args):
    inception, sha256 = InceptionV3.from_file(args.inception)
    images = open_images(args.images)
    result = measure_images(images, args.device, args.batch_size, args.workers, inception.to(args.device),
                            keep_features=args.max_features, spectrum=True)
    meta = {"num_images": result["count"], "source": str(images.path), "source_meta": images.meta,
            "inception_sha256": sha256, "resize": RESIZE_METHOD, "num_features": len(result["features"]),
            "feature_subset_seed": FEATURE_SUBSET_SEED, "spectrum": "mean log10 power, cycles per image",
            "spectrum_size": result["spectrum_size"]}  # eval brings samples to it before their spectrum
    with atomic_output(args.out) as temporary, open(temporary, "wb") as file:
        np.savez(file, mu=result["mu"], sigma=result["sigma"], features=result["features"].astype(np.float32),
                 spectrum=result["spectrum"], meta=np.array(json.dumps(meta)))
    print(f"wrote {args.out}: statistics of {result['count']} images, {len(result['features'])} features kept")


def load_reference(path):
    """The arrays of a stats npz: mu and sigma always, features / spectrum / meta when present, shapes checked."""
    path, expected = Path(path), "reference statistics written by `fid.py stats` (mu, sigma, features, ...)"
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found; make them with `python fid.py stats`")
    keys, reference = load_npz(path, expected)
    for key, shape in (("mu", (FEATURE_DIM,)), ("sigma", (FEATURE_DIM, FEATURE_DIM))):
        if key not in reference or reference[key].shape != shape or not np.isfinite(reference[key]).all():
            raise ValueError(f"{path}: key {key!r} missing, not {shape} or not finite; expected {expected}")
    if "features" in reference and reference["features"].shape[1:] != (FEATURE_DIM,):
        raise ValueError(f"{path}: key 'features' is {reference['features'].shape}, not (N, {FEATURE_DIM})")
    reference["meta"] = read_meta(reference["meta"], path) if "meta" in keys else {}
    return reference


def command_eval(args):
    reference = load_reference(args.ref)
    for wanted, flag, key in ((args.prdc, "--prdc", "features"), (args.spectrum_plot, "--spectrum-plot", "spectrum")):
        if wanted and key not in reference:
            raise ValueError(f"{args.ref}: no key {key!r}; {flag} needs a reference made by `python fid.py stats`")
    inception, sha256 = InceptionV3.from_file(args.inception)
    reference_sha256 = reference["meta"].get("inception_sha256")
    if reference_sha256 is None:
        warnings.warn(f"{args.ref} does not record its Inception weights; assuming they were {args.inception}")
    elif reference_sha256 != sha256:
        raise ValueError(f"{args.ref} was made with Inception weights sha256 {reference_sha256[:12]}..., "
                         f"--inception {args.inception} is {sha256[:12]}...: the features are not comparable")
    samples = open_images(args.samples)
    keep = len(reference["features"]) if args.prdc else 0
    result = measure_images(samples, args.device, args.batch_size, args.workers, inception.to(args.device),
                            keep_features=keep, spectrum=bool(args.spectrum_plot),
                            spectrum_size=reference["meta"].get("spectrum_size"))
    report = {"fid": frechet_distance(result["mu"], result["sigma"], reference["mu"], reference["sigma"]),
              "num_samples": result["count"], "samples": str(samples.path), "samples_meta": samples.meta,
              "samples_arrays": samples.arrays, "reference": str(args.ref), "reference_sha256": sha256_of(args.ref),
              "reference_num_images": reference["meta"].get("num_images"),
              "inception_weights": str(args.inception), "inception_sha256": sha256,
              "inception_is_standard": sha256.startswith(FID_WEIGHTS_SHA256_PREFIX),
              "resize": RESIZE_METHOD, "device": str(args.device), "torch": torch.__version__}
    if args.prdc:
        report.update(prdc(reference["features"], result["features"], k=args.prdc_k), prdc_k=args.prdc_k,
                      prdc_num_real=len(reference["features"]), prdc_num_fake=len(result["features"]))
    if args.spectrum_plot:
        comparison = compare_spectra({"reference": reference["spectrum"], "samples": result["spectrum"]})
        plot_spectra(args.spectrum_plot, comparison, f"{samples.path.name} vs {Path(args.ref).name}")
        report["spectrum_band_error"] = comparison["band_error"]["samples"]
    print("\n".join(f"{key}: {report[key]:.4f}" for key in ("fid", "precision", "recall", "density", "coverage")
                    if key in report))
    if args.json:
        write_json(args.json, report)
    return report


def command_spectrum(args):
    if len(args.sets) < 2:
        raise ValueError(f"give at least two image sets (the first is the reference), got {args.sets}")
    spectra, size = {}, None
    for path in args.sets:
        images = open_images(path)
        name = images.path.name if images.path.name not in spectra else str(images.path)
        result = measure_images(images, args.device, args.batch_size, args.workers, spectrum=True, spectrum_size=size)
        spectra[name], size = result["spectrum"], result["spectrum_size"]
        if result["spectrum_resized"]:
            print(f"{name}: {result['spectrum_resized']} of {result['count']} images resized to {size[0]}x{size[1]} "
                  f"(the reference's first image) before their spectrum")
    comparison = dict(compare_spectra(spectra), image_size=size)
    plot_spectra(args.plot, comparison, "Power spectra, reference " + comparison["reference"])
    if args.json:
        write_json(args.json, comparison)
    if args.csv:
        write_spectrum_csv(args.csv, comparison)
    for name, bands in comparison["band_error"].items():
        print(f"{name} vs {comparison['reference']}: mean |log10 difference| per octave band: "
              + ", ".join(f"{b['cycles_per_image'][0]}-{b['cycles_per_image'][1]}: "
                          f"{b['mean_abs_log10_difference']:.3f}" for b in bands))
    return comparison


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_loading_flags(command):
        command.add_argument("--batch-size", type=int, default=50)
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                             help="processes decoding image files (folders)")

    stats = commands.add_parser("stats", help="Inception statistics, features and spectrum of real images")
    stats.add_argument("--images", required=True, help=f"folder of {IMAGE_KINDS} (recursive) or npz with arr_0")
    stats.add_argument("--inception", required=True, help=f"path to {FID_WEIGHTS_NAME}")
    stats.add_argument("--out", required=True, help="statistics .npz to write")
    stats.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES,
                       help="features kept for --prdc (a seeded random subset)")
    add_loading_flags(stats)

    evaluate = commands.add_parser("eval", help="FID (and --prdc, --spectrum-plot) of samples against a reference")
    evaluate.add_argument("--ref", required=True, help="statistics .npz written by `fid.py stats`")
    evaluate.add_argument("--samples", required=True, help="npz with uint8 arr_0 (or a folder of images)")
    evaluate.add_argument("--inception", required=True, help=f"path to {FID_WEIGHTS_NAME}")
    evaluate.add_argument("--prdc", action="store_true", help="precision / recall / density / coverage, on as "
                          "many samples (a seeded random subset) as the reference stores features")
    evaluate.add_argument("--prdc-k", type=int, default=5, help="nearest neighbours for --prdc")
    evaluate.add_argument("--spectrum-plot", help="PNG of the samples' power spectrum against the reference's "
                          "(samples resized to the reference's image size first, as Inception resizes)")
    evaluate.add_argument("--json", help="report .json to write")
    add_loading_flags(evaluate)

    note = ("power spectra of image sets, the first is the reference; every image is first resized (bilinear, as "
            "for Inception) to the reference's first image's size: the same content at more pixels has more power")
    spectrum = commands.add_parser("spectrum", help=note, description=note)
    spectrum.add_argument("sets", nargs="+", help=f"folders of {IMAGE_KINDS} or npz files with arr_0")
    spectrum.add_argument("--plot", required=True, help="PNG to write")
    spectrum.add_argument("--json", help="curves, differences and band errors as .json")
    spectrum.add_argument("--csv", help="curves and differences as .csv")
    add_loading_flags(spectrum)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda"):  # FID in float32 like pytorch-fid, not TF32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    command = {"stats": command_stats, "eval": command_eval, "spectrum": command_spectrum}[args.command]
    with one_line_errors(f"fid.py {args.command}: ", also=(OSError, ValueError)):  # user errors: one line
        command(args)
    return 0


if __name__ == "__main__":
    main()
