"""The FID InceptionV3: TensorFlow's 2015-12-05 Inception graph as ported by pytorch-fid, with three outputs per pass.

    model, sha256 = InceptionV3.from_file("pt_inception-2015-12-05-6726825d.pth")
    outputs = inception_outputs(model, images, "cuda")  # images: a list of uint8 (3, H, W) tensors
    outputs.pool, outputs.spatial, outputs.logits  # (N, 2048), (N, 2023), (N, 1008), float32

The three outputs are the three tensors that ADM's evaluator (guided-diffusion `evaluations/evaluator.py`) reads from
the TensorFlow graph, computed here in one pass of the PyTorch port:
- pool: `pool_3`, the 2048-d global average pool (FID, precision / recall; pytorch-fid's features).
- spatial: `mixed_6/conv`, first 7 channels, flattened (sFID). TF's mixed, mixed_1, ..., mixed_10 are torchvision's
  Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c in order, and a block's `conv` is its 1x1 branch, so mixed_6/conv
  is Mixed_6d.branch1x1 (the map of torch-fidelity's converter of the same graph, whose weights file carries the same
  sha256 prefix 6726825d). Its ReLU output (N, 192, 17, 17) is the first 192 channels of Mixed_6d's output (its
  branches are concatenated 1x1 first, as TF's mixed_6/join), so no extra layer runs. ADM flattens NHWC
  [..., :7]: 17 * 17 * 7 = 2023 values, in that order here too.
- logits: `softmax/logits/MatMul`, pool_3 times the 2048 x 1008 softmax weights without the bias (ADM's Inception
  Score input); the bias is in the weights file (fc.bias) and unused.
Nothing is downloaded: get FID_WEIGHTS_NAME from FID_WEIGHTS_URL and pass its path.
"""

import hashlib
import warnings
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Constants of the weights file and of the three outputs
# ----------------------------------------------------------------------------------------------------------------

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name ends with its sha256 prefix
INCEPTION_SIZE = 299
FEATURE_DIM = 2048  # pool_3
NUM_LOGITS = 1008  # the TF graph's classes: ImageNet's 1000 and 8 unused
SPATIAL_LAYER = "Mixed_6d.branch1x1"  # TF mixed_6/conv, see the module docstring
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
RESIZE_METHOD = "torch bilinear to 299x299, align_corners=False, no antialias (as pytorch-fid)"  # see resize()

InceptionOutputs = namedtuple("InceptionOutputs", ["pool", "spatial", "logits"])


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Blocks: torchvision's Inception3 names, with the TF graph's pooling
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
    """17x17 block with factorised 7x7 convolutions (pytorch-fid's FIDInceptionC). Its output starts with the
    branch1x1 channels (TF's `conv` of the block): InceptionV3.outputs reads sFID's layer from there."""

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


# ----------------------------------------------------------------------------------------------------------------
# The network: one pass, three outputs
# ----------------------------------------------------------------------------------------------------------------

class InceptionV3(nn.Module):
    """FID Inception: images in [0, 1] of any size -> pool features (forward) or all three outputs (outputs).

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
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)  # TF's softmax/weights and softmax/biases

    def outputs(self, images):
        """(N, 3, H, W) in [0, 1] -> InceptionOutputs(pool (N, 2048), spatial (N, 2023), logits (N, 1008))."""
        x = resize(images, (INCEPTION_SIZE, INCEPTION_SIZE))
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range of the TF graph
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))  # (N, 768, 17, 17), Mixed_6d = TF mixed_6
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17 * 17 * 7), NHWC as ADM
        x = self.Mixed_7a(self.Mixed_6e(x))  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048), the global average pool (pool_3)
        return InceptionOutputs(pool, spatial, pool @ self.fc.weight.T)  # logits (N, 1008), no bias (as ADM)

    def forward(self, images):
        return self.outputs(images).pool

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
def inception_outputs(model, images, device):
    """A list of uint8 (3, H, W) images -> InceptionOutputs of float32 tensors on `device`, computed in float32
    even under autocast. Images of mixed sizes are resized one by one with the resize the model applies."""
    if len({tuple(image.shape) for image in images}) == 1:
        batch = torch.stack(images).to(device).float() / 255  # (N, 3, H, W)
    else:
        batch = torch.cat([resize(image[None].to(device).float() / 255, (INCEPTION_SIZE, INCEPTION_SIZE))
                           for image in images])
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        return model.outputs(batch)


def inception_features(model, images, device):
    """A list of uint8 (3, H, W) images -> (N, 2048) float32 pool features (the FID features)."""
    return inception_outputs(model, images, device).pool
