"""Bundled evaluator: ADM's suite (FID, sFID, Inception Score, precision, recall), density / coverage, and the
power spectrum of paper Fig. 4 and 5.

    # 1. reference statistics of real images (a folder of image files, searched recursively, or an npz with arr_0)
    python fid.py stats --images VIRTUAL_imagenet256_labeled.npz --inception W.pth --out ref.npz
    # 2. one row per samples npz (sample.py's: uint8 NHWC arr_0, sampling settings in `meta`); --ref may be images
    python fid.py eval --ref ref.npz --samples baseline.npz lpl.npz --inception W.pth --spectrum-plot spectrum.png \\
        --json report.json
    # 3. power spectra of image sets, the first one is the reference (no Inception needed)
    python fid.py spectrum real/ baseline.npz lpl.npz --plot spectra.png --json spectra.json --csv spectra.csv

Nothing is downloaded. The Inception weights W.pth are the ones pytorch-fid ported from the TensorFlow FID code: get
pt_inception-2015-12-05-6726825d.pth from FID_WEIGHTS_URL (inception.py) and pass its path to --inception.

The pipeline is layered as images -> Inception outputs (inception.py: pool_3, mixed_6/conv, logits, one pass) ->
statistics -> distances, and follows ADM's evaluator (guided-diffusion evaluations/evaluator.py) metric by metric:
- FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) on the 2048-d pool features, equal to
  pytorch-fid 0.3.0's calculate_frechet_distance (to 1e-13 relative, measured with scipy 1.17), N < 2048 included.
- sFID (Nash et al. 2021): the same distance on the 2023-d spatial features (mixed_6/conv, 7 channels, 17 x 17).
- Inception Score: exp(mean KL(p(y|x) || p(y))) in splits of 5000, softmax of the 1008 logits without bias.
- Precision / recall as ADM (Kynkaanniemi et al. 2019, k = 3, closed balls), all samples against all reference
  features; density / coverage (Naeem et al. 2020, --prdc-k) as the `prdc` package 0.2 (open balls).
- Power spectrum: the radially averaged log power spectrum of grayscale images (section 4.2 of the paper), every
  image first resized to the reference's size (the first image's) as Inception resizes: see SpectrumMean.
Statistics of another network (ADM's npz files hold TensorFlow's mu / sigma / mu_s / sigma_s) are never mixed
with ours: eval measures the reference's arr_0 instead, or refuses a file without images.
Errors in the input (a broken image, a junk npz, wrong shapes) stop a command with one line naming the file.

Files: a reference statistics npz holds `mu`, `sigma`, `mu_s`, `sigma_s` (float64), `features` (float32 pool
features of up to --max-features images, for precision / recall), `spectrum` (mean log10 power per cycle per image)
and `meta` (a 0-d string array holding a JSON object: image count, source, Inception weights sha256, resize method,
spectrum_size). Samples npz files may carry the same kind of `meta` array, written by sample.py (sampler, steps,
guidance scale and interval, checkpoint, autoencoder); eval copies it to `samples_meta` and the row.
"""

import argparse
import csv
import io
import json
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch
from PIL import Image
from tqdm import tqdm

from inception import (FEATURE_DIM, FID_WEIGHTS_NAME, FID_WEIGHTS_SHA256_PREFIX, FID_WEIGHTS_URL,  # noqa: F401
                       INCEPTION_SIZE, NUM_LOGITS, RESIZE_METHOD, SPATIAL_DIM, SPATIAL_LAYER, InceptionV3,
                       inception_features, inception_outputs, resize, sha256_of, tf_avg_pool)
from plot import COLORS, plot_spectra  # noqa: F401 (COLORS: fid.COLORS, re-exported)
from runtime import IMAGE_SUFFIXES, UserError, atomic_output, one_line_errors, rgb_image, write_json, write_text

# ----------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------

IMAGE_KINDS = "/".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))  # the encoder's (data.py) list
NPZ_IMAGES = "uint8 images (N, H, W, 3) in key 'arr_0' (as sample.py writes them)"
DEFAULT_MAX_FEATURES = 10_000  # reference features kept by `stats` (ADM's reference batches hold 10,000 images)
DEFAULT_MAX_SAMPLE_FEATURES = 50_000  # sample features kept by `eval` (ADM: all of the standard 50,000)
FEATURE_SUBSET_SEED = 0  # which images keep their features for precision / recall (a fixed, seeded random subset)
IS_SPLIT_SIZE = 5000  # Inception Score splits (ADM, improved-gan)
ADM_PR_K = 3  # ADM's nhood_sizes=(3,)
DEFAULT_PRDC_K = 5  # Naeem et al.'s k for density / coverage
DISTANCE_BLOCK = 4096  # rows and columns of one block of pairwise distances: memory ~ DISTANCE_BLOCK^2, not N^2
TF_STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # ADM's reference batches: TensorFlow's statistics
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 grayscale
POWER_FLOOR = 1e-12  # power is floored before log10 so that a flat image gives a finite spectrum


# ----------------------------------------------------------------------------------------------------------------
# Files: atomic writes, input checks, image sets (folders and ADM-style npz)
# ----------------------------------------------------------------------------------------------------------------

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
# Inception Score in splits (ADM's evaluator, after improved-gan)
# ----------------------------------------------------------------------------------------------------------------

def split_inception_score(probabilities):
    """exp(mean_x KL(p(y|x) || p(y))) of one split of predictions (n, classes), p(y) the split's mean prediction.
    KL is sum_y p (log p - log p(y)) as ADM writes it, with 0 log 0 = 0 (ADM's float32 softmax gives NaN there)."""
    marginal = probabilities.mean(axis=0, keepdims=True)  # (1, classes)
    kl = scipy.special.xlogy(probabilities, probabilities) - scipy.special.xlogy(probabilities, marginal)
    return float(np.exp(kl.sum(axis=1).mean()))


class InceptionScoreSplits:
    """The Inception Score of predictions that arrive in batches: consecutive splits of split_size predictions
    (the last may be shorter, as ADM's range(0, N, split_size)), each scored once complete, so that memory holds
    one split, never the whole set. score() is the mean over splits."""

    def __init__(self, split_size=IS_SPLIT_SIZE):
        if split_size < 1:
            raise ValueError(f"Inception Score: split_size must be positive, got {split_size}")
        self.split_size, self.pending, self.pending_count, self.scores = split_size, [], 0, []

    def update(self, probabilities):
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 2 or not np.isfinite(probabilities).all() or (probabilities < 0).any():
            raise ValueError(f"Inception Score: expected finite non-negative (N, classes) probabilities, got shape "
                             f"{probabilities.shape}")
        if not np.allclose(probabilities.sum(axis=1), 1, rtol=0, atol=1e-4):
            raise ValueError("Inception Score: every row must sum to 1 (softmax outputs, not logits)")
        while len(probabilities):
            taken = probabilities[:self.split_size - self.pending_count]
            self.pending.append(taken)
            self.pending_count += len(taken)
            probabilities = probabilities[len(taken):]
            if self.pending_count == self.split_size:
                self.scores.append(split_inception_score(np.concatenate(self.pending)))
                self.pending, self.pending_count = [], 0

    def score(self):
        partial = [split_inception_score(np.concatenate(self.pending))] if self.pending else []
        if not self.scores + partial:
            raise ValueError("Inception Score: no predictions")
        return float(np.mean(self.scores + partial))

    @property
    def num_splits(self):
        return len(self.scores) + bool(self.pending)


def inception_score(probabilities, split_size=IS_SPLIT_SIZE):
    """ADM's Inception Score of softmax outputs (N, classes) (compute_inception_score): the set cut into
    consecutive splits of split_size, exp(mean KL(p(y|x) || p(y))) per split, their mean. It lies in
    [1, classes]: 1 when every prediction is the same, `classes` for one-hot predictions spread evenly."""
    splits = InceptionScoreSplits(split_size)
    splits.update(probabilities)
    return splits.score()


# ----------------------------------------------------------------------------------------------------------------
# Precision, recall (ADM's and prdc's), density, coverage in blocks
# ----------------------------------------------------------------------------------------------------------------

def squared_distances(a, b):
    """Squared Euclidean distances (len(a), len(b)) as |a|^2 + |b|^2 - 2 a.b, one matrix product (float64 inputs).
    Values within the round-off of that expansion (dim * eps * (|a|^2 + |b|^2)) are set to exactly 0, so that a
    point is at distance 0 from itself and from its duplicates (as sklearn's zeroed diagonal in prdc), never below."""
    norms_a, norms_b = a.square().sum(1)[:, None], b.square().sum(1)[None, :]
    squared = torch.addmm(norms_b, a, b.T, alpha=-2).add_(norms_a)  # (len(a), len(b)), in place: memory-bound
    round_off = (norms_a + norms_b).mul_(a.shape[1] * torch.finfo(a.dtype).eps)
    return squared.masked_fill_(squared <= round_off, 0.0)


def distance_blocks(real, fake, block_size):
    """(rows, columns, squared distances (r, c) of real[rows] to fake[columns]) for every block_size^2 block."""
    for i in range(0, len(real), block_size):
        rows = slice(i, i + block_size)
        for j in range(0, len(fake), block_size):
            columns = slice(j, j + block_size)
            yield rows, columns, squared_distances(real[rows], fake[columns])


def knn_radii(points, k, chunk_size):
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded): ADM's
    radii (the k-th entry of the sorted row, the point's own 0 first), and prdc's squared."""
    radii = []
    for rows in points.split(chunk_size):
        nearest = rows.new_empty(len(rows), 0)  # (r, <= k + 1) smallest distances so far, the point itself included
        for columns in points.split(chunk_size):
            block = squared_distances(rows, columns)
            block = block.topk(min(k + 1, block.shape[1]), dim=1, largest=False).values  # (r, <= k + 1)
            candidates = torch.cat([nearest, block], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest.amax(dim=1))
    return torch.cat(radii)


def feature_pair(real_features, fake_features, k, flag):
    """Both feature sets as float64 tensors on the real features' device, checked: (N, D) and (M, D), finite, and
    more than k points each (flag: the option that sets k)."""
    real = torch.as_tensor(real_features).to(torch.float64)
    fake = torch.as_tensor(fake_features).to(real.device, torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision / recall: expected (N, D) real and (M, D) fake features, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision / recall: k={k} nearest neighbours ({flag}) need more than {k} points per "
                         f"set, got {len(real)} real and {len(fake)} fake")
    for name, features in (("real_features", real), ("fake_features", fake)):
        if not torch.isfinite(features).all():
            raise ValueError(f"precision / recall: {name} hold NaN or inf values")
    return real, fake


def adm_precision_recall(real_features, fake_features, k=ADM_PR_K, block_size=DISTANCE_BLOCK):
    """Precision and recall as ADM's evaluator computes them (Kynkaanniemi et al. 2019; ManifoldEstimator with
    nhood_sizes=(3,)): with r_i the squared distance from real i to its k-th nearest other real, s_j the same for
    fake j, and d the squared distance,
      precision = mean_j [exists i: d(i, j) <= r_i]      recall = mean_i [exists j: d(i, j) <= s_j]
    Closed balls (<=, where prdc() uses <); squared distances give the same sets as plain ones. Returns
    (precision, recall). Distances in float64 throughout, where ADM computes them in float16 first (float32 only if
    that overflows); in block_size^2 blocks, so memory is bounded by the block, not N x M."""
    real, fake = feature_pair(real_features, fake_features, k, "k")
    real_radii, fake_radii = knn_radii(real, k, block_size), knn_radii(fake, k, block_size)
    in_real_balls = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    in_fake_balls = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for rows, columns, distance in distance_blocks(real, fake, block_size):
        in_real_balls[columns] |= (distance <= real_radii[rows, None]).any(dim=0)
        in_fake_balls[rows] |= (distance <= fake_radii[None, columns]).any(dim=1)
    return in_real_balls.double().mean().item(), in_fake_balls.double().mean().item()


def prdc(real_features, fake_features, k=DEFAULT_PRDC_K, chunk_size=DISTANCE_BLOCK):
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
    real, fake = feature_pair(real_features, fake_features, k, "--prdc-k")
    real_radii, fake_radii = knn_radii(real, k, chunk_size), knn_radii(fake, k, chunk_size)
    precision_hit, recall_hit, coverage_hit = (torch.zeros(n, dtype=torch.bool, device=real.device)
                                               for n in (len(fake), len(real), len(real)))
    density_count = torch.zeros(len(fake), dtype=torch.int64, device=real.device)
    for rows, columns, distance in distance_blocks(real, fake, chunk_size):  # distance: compared with squared radii
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
# One pass over an image set
# ----------------------------------------------------------------------------------------------------------------

def measure_images(images, device, batch_size, workers, inception=None, keep_features=0, spectrum=False,
                   spectrum_size=None):
    """One pass over a set. With `inception`: the statistics of pool_3 (mu, sigma) and of mixed_6/conv (mu_s,
    sigma_s), the Inception Score, and the pool features of a seeded subset of keep_features images. With
    `spectrum`: the mean spectrum, its images brought to spectrum_size (default: the first image's size) first."""
    pool, spatial, scores = FeatureStatistics(), FeatureStatistics(), InceptionScoreSplits()
    spectrum_mean = SpectrumMean(spectrum_size) if spectrum else None
    keep = subset_mask(len(images), keep_features)
    kept, start = [], 0
    with tqdm(total=len(images), unit="img", desc=str(images.path)) as progress:
        for batch in images.batches(batch_size, workers):
            if inception is not None:
                outputs = inception_outputs(inception, batch, device)  # pool (B, 2048), spatial (B, 2023), logits
                check_finite_images(torch.cat(outputs, dim=1),
                                    f"{images.path}: Inception features of the batch from image {start}")
                pool.update(outputs.pool)
                spatial.update(outputs.spatial)
                scores.update(torch.softmax(outputs.logits.double(), dim=1).cpu().numpy())  # (B, 1008)
                kept.append(outputs.pool[torch.from_numpy(keep[start:start + len(batch)]).to(device)].cpu())
            if spectrum_mean is not None:
                spectrum_mean.update(batch, device)
            start += len(batch)
            progress.update(len(batch))
    result = {"count": len(images)}
    if inception is not None:
        result["mu"], result["sigma"] = pool.mean_and_covariance(images.path)
        result["mu_s"], result["sigma_s"] = spatial.mean_and_covariance(images.path)
        result.update(features=torch.cat(kept).numpy(), inception_score=scores.score(),
                      inception_score_num_splits=scores.num_splits)
    if spectrum_mean is not None:
        result.update(spectrum=spectrum_mean.mean(), spectrum_size=list(spectrum_mean.size),
                      spectrum_resized=spectrum_mean.resized)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Reference: our statistics, or images measured here; never another network's statistics
# ----------------------------------------------------------------------------------------------------------------

REFERENCE_KINDS = ("statistics written by `fid.py stats`, an npz with uint8 images (N, H, W, 3) in 'arr_0' (as "
                   "ADM's reference batches), or a folder of images")


def command_stats(args):
    inception, sha256 = InceptionV3.from_file(args.inception)
    images = open_images(args.images)
    result = measure_images(images, args.device, args.batch_size, args.workers, inception.to(args.device),
                            keep_features=args.max_features, spectrum=True)
    meta = {"num_images": result["count"], "source": str(images.path), "source_meta": images.meta,
            "source_arrays": images.arrays, "inception_sha256": sha256, "resize": RESIZE_METHOD,
            "spatial_layer": f"{SPATIAL_LAYER} (TF mixed_6/conv), channels :7, NHWC-flattened",
            "num_features": len(result["features"]), "feature_subset_seed": FEATURE_SUBSET_SEED,
            "spectrum": "mean log10 power, cycles per image",
            "spectrum_size": result["spectrum_size"]}  # eval brings samples to it before their spectrum
    with atomic_output(args.out) as temporary, open(temporary, "wb") as file:
        np.savez(file, mu=result["mu"], sigma=result["sigma"], mu_s=result["mu_s"], sigma_s=result["sigma_s"],
                 features=result["features"].astype(np.float32), spectrum=result["spectrum"],
                 meta=np.array(json.dumps(meta)))
    print(f"wrote {args.out}: statistics of {result['count']} images, {len(result['features'])} features kept")


def checked_statistics(path, arrays, meta):
    """A `fid.py stats` file's arrays, checked: mu, sigma; mu_s, sigma_s, features when there (older: no mu_s)."""
    expected = "statistics written by `fid.py stats`"
    shapes = {"mu": (FEATURE_DIM,), "sigma": (FEATURE_DIM, FEATURE_DIM), "mu_s": (SPATIAL_DIM,),
              "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for key, shape in shapes.items():
        if key in ("mu", "sigma") or key in arrays:
            if key not in arrays or arrays[key].shape != shape or not np.isfinite(arrays[key]).all():
                raise ValueError(f"{path}: key {key!r} missing, not {shape} or not finite; expected {expected}")
    if ("mu_s" in arrays) != ("sigma_s" in arrays):
        raise ValueError(f"{path}: holds only one of mu_s / sigma_s; expected {expected}")
    if "features" in arrays and arrays["features"].shape[1:] != (FEATURE_DIM,):
        raise ValueError(f"{path}: key 'features' is {arrays['features'].shape}, not (N, {FEATURE_DIM})")
    return dict(arrays, meta=meta)


def read_reference(path):
    """eval's --ref: a dict of arrays (and `meta`) for a `fid.py stats` file, whose meta names the Inception weights
    that computed it; else the images to measure (an npz with arr_0, a folder). Statistics without that record
    (ADM's npz files hold TensorFlow's, over the whole training set) are never mixed with this network's: an npz
    that also holds images is measured from them; one without images is refused."""
    path = Path(path)
    if path.is_dir():
        return open_images(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference {path} not found; expected {REFERENCE_KINDS}")
    keys, arrays = load_npz(path, REFERENCE_KINDS, skip=("arr_0",))
    meta = read_meta(arrays["meta"], path) if "meta" in keys else {}
    if "inception_sha256" in meta:
        return checked_statistics(path, arrays, meta)
    if "arr_0" in keys:
        return NpzImages(path)
    foreign = [key for key in keys if key in TF_STATISTICS_KEYS]
    if foreign:
        raise UserError(f"{path} holds statistics {foreign} but no record of the network that computed them (ADM's "
                        f"hold TensorFlow's); mixed with this PyTorch Inception's features they would give figures "
                        f"comparable with neither. Pass the reference images instead (an npz with arr_0, as ADM's "
                        f"reference batches) or `python fid.py stats --images IMAGES --inception W --out ref.npz`")
    raise UserError(f"{path} holds {keys}; expected {REFERENCE_KINDS}")


def measure_reference(images, inception, args):
    """Reference statistics measured here from its images (features of up to DEFAULT_MAX_FEATURES, as `stats`)."""
    result = measure_images(images, args.device, args.batch_size, args.workers, inception,
                            keep_features=DEFAULT_MAX_FEATURES, spectrum=bool(args.spectrum_plot))
    unused = [key for key in images.arrays if key in TF_STATISTICS_KEYS]
    source = (f"measured here from the {result['count']} images of {args.ref} with --inception"
              + (f"; its own {', '.join(unused)} (another network's statistics) not used" if unused else ""))
    return dict(result, meta={"num_images": result["count"], "spectrum_size": result.get("spectrum_size")},
                source=source)


def reference_of(args, reference, inception, sha256):
    """The reference statistics for eval: read (weights checked against --inception) or measured."""
    if not isinstance(reference, dict):
        return measure_reference(reference, inception, args)
    made_with = reference["meta"]["inception_sha256"]
    if made_with != sha256:
        raise ValueError(f"{args.ref} was made with Inception weights sha256 {made_with[:12]}..., --inception "
                         f"{args.inception} is {sha256[:12]}...: the features are not comparable")
    count = reference["meta"].get("num_images")
    return dict(reference, source=f"read from {args.ref} (`fid.py stats` of {count} images)")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the row of each samples file
# ----------------------------------------------------------------------------------------------------------------

DEFINITIONS = {  # what each figure of a row is, as the JSON report states it
    "fid": "Frechet distance of the pool_3 (2048-d) Gaussians of samples and reference",
    "sfid": f"Frechet distance of the mixed_6/conv ({SPATIAL_LAYER}) features: 7 channels x 17 x 17 = 2023-d",
    "inception_score": f"exp(mean KL(p(y|x) || p(y))), softmax of the {NUM_LOGITS} logits without bias, mean over "
                       f"consecutive splits of {IS_SPLIT_SIZE} samples (ADM)",
    "precision": f"ADM (Kynkaanniemi et al. 2019), k={ADM_PR_K}: samples inside a reference k-NN ball (closed)",
    "recall": f"ADM (Kynkaanniemi et al. 2019), k={ADM_PR_K}: reference images inside a sample k-NN ball (closed)",
    "density, coverage": "Naeem et al. 2020 (prdc package), k=prdc_k, open balls, prdc_num_fake samples"}


def sampler_settings(meta):
    """The sampling settings recorded in a samples npz's meta by sample.py (None where absent)."""
    meta = meta or {}
    return {"sampler": meta.get("sampler"), "steps": meta.get("steps"), "guidance_scale": meta.get("cfg",
            meta.get("cfg_scale")), "guidance_interval": meta.get("guidance_interval"),
            "guidance_channels": meta.get("cfg_channels")}  # DiT guides 3 of its 4 latent channels


def neighbour_metrics(real_features, fake_features, prdc_k, device):
    """ADM's precision / recall on all kept features; density / coverage on as many samples as the reference has
    features (a seeded subset), as Naeem et al. compare equal counts. Returns (metrics, missing: {names: why})."""
    real, fake = (torch.as_tensor(features, device=device) for features in (real_features, fake_features))
    fake_subset = fake[torch.from_numpy(subset_mask(len(fake), len(real))).to(device)]
    metrics, missing = {}, {}
    if min(len(real), len(fake)) > ADM_PR_K:
        metrics.update(zip(("precision", "recall"), adm_precision_recall(real, fake)), precision_recall_k=ADM_PR_K,
                       precision_recall_num_real=len(real), precision_recall_num_fake=len(fake))
    else:
        missing["precision, recall"] = f"k={ADM_PR_K} needs more than {ADM_PR_K} features per set"
    if len(fake_subset) > prdc_k:
        naeem = prdc(real, fake_subset, k=prdc_k)
        metrics.update(density=naeem["density"], coverage=naeem["coverage"], prdc_k=prdc_k,
                       prdc_num_real=len(real), prdc_num_fake=len(fake_subset))
    else:
        missing["density, coverage"] = f"--prdc-k {prdc_k} needs more than {prdc_k} features per set"
    return metrics, missing


def evaluate_samples(samples, reference, inception, args):
    """The row of one samples set against the reference: FID, sFID, IS, precision, recall, density, coverage."""
    result = measure_images(samples, args.device, args.batch_size, args.workers, inception,
                            keep_features=args.max_features, spectrum=bool(args.spectrum_plot),
                            spectrum_size=reference["meta"].get("spectrum_size"))
    row = {"samples": str(samples.path), "num_samples": result["count"],
           "fid": frechet_distance(result["mu"], result["sigma"], reference["mu"], reference["sigma"]),
           "sfid": None, "inception_score": result["inception_score"], "inception_score_split_size": IS_SPLIT_SIZE,
           "inception_score_num_splits": result["inception_score_num_splits"],
           "sampler_settings": sampler_settings(samples.meta), "samples_meta": samples.meta,
           "samples_arrays": samples.arrays, "missing": {}}
    if "mu_s" in reference:
        row["sfid"] = frechet_distance(result["mu_s"], result["sigma_s"], reference["mu_s"], reference["sigma_s"])
    else:
        row["missing"]["sfid"] = f"{args.ref} has no mu_s / sigma_s (an older `fid.py stats`): remake it for sFID"
    if args.prdc and "features" in reference:
        metrics, missing = neighbour_metrics(reference["features"], result["features"], args.prdc_k, args.device)
        row.update(metrics)
        row["missing"].update(missing)
    elif args.prdc:
        row["missing"]["precision, recall, density, coverage"] = f"{args.ref} has no features: remake it"
    if args.spectrum_plot:
        row["spectrum"] = result["spectrum"]
    return row


def markdown_table(rows):
    """The standard row of each samples set, as a Markdown table."""
    cell = lambda value, spec: "n/a" if value is None else format(value, spec)  # noqa: E731
    lines = ["| samples | N | FID | sFID | IS | precision | recall | density | coverage | sampler | steps | "
             "guidance | interval |", "|" + " --- |" * 13]
    for row in rows:
        settings = row["sampler_settings"]
        lines.append("| " + " | ".join([
            Path(row["samples"]).name, str(row["num_samples"]), cell(row["fid"], ".3f"), cell(row["sfid"], ".3f"),
            cell(row["inception_score"], ".2f")] + [cell(row.get(key), ".4f") for key in
                                                   ("precision", "recall", "density", "coverage")]
            + [cell(settings[key], "") for key in ("sampler", "steps", "guidance_scale", "guidance_interval")]) + " |")
    return "\n".join(lines)


def add_spectra(rows, reference, args):
    """Plot the samples' spectra against the reference's; each row gets its error per octave band."""
    names = [Path(row["samples"]).name for row in rows]
    names = [name if names.count(name) == 1 and name != "reference" else row["samples"]
             for name, row in zip(names, rows)]
    comparison = compare_spectra({"reference": reference["spectrum"],
                                  **{name: row.pop("spectrum") for name, row in zip(names, rows)}})
    plot_spectra(args.spectrum_plot, comparison, f"{', '.join(names)} vs {Path(args.ref).name}")
    for name, row in zip(names, rows):
        row["spectrum_band_error"] = comparison["band_error"][name]


def command_eval(args):
    reference = read_reference(args.ref)
    if args.spectrum_plot and isinstance(reference, dict) and "spectrum" not in reference:
        raise ValueError(f"{args.ref}: no key 'spectrum'; --spectrum-plot needs a reference made by `fid.py stats`")
    sample_sets = [open_images(path) for path in args.samples]
    inception, sha256 = InceptionV3.from_file(args.inception)
    inception = inception.to(args.device)
    reference = reference_of(args, reference, inception, sha256)
    print(f"reference statistics: {reference['source']}")
    shared = {"reference": str(args.ref), "reference_sha256": sha256_of(args.ref) if Path(args.ref).is_file() else None,
              "reference_num_images": reference["meta"]["num_images"], "reference_statistics": reference["source"],
              "inception_weights": str(args.inception), "inception_sha256": sha256,
              "inception_is_standard": sha256.startswith(FID_WEIGHTS_SHA256_PREFIX), "resize": RESIZE_METHOD,
              "definitions": DEFINITIONS, "device": str(args.device), "torch": torch.__version__}
    rows = [dict(evaluate_samples(samples, reference, inception, args), **shared) for samples in sample_sets]
    if args.spectrum_plot:
        add_spectra(rows, reference, args)
    table = markdown_table(rows)
    print(table)
    for row, markdown_row in zip(rows, table.split("\n")[2:]):
        row["markdown_row"] = markdown_row
        for metric, why in row["missing"].items():
            print(f"{Path(row['samples']).name}: no {metric}: {why}")
    if args.json:
        write_json(args.json, rows[0] if len(rows) == 1 else {"rows": rows, "markdown": table})
    return rows[0] if len(rows) == 1 else rows


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
    stats.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES, help="features kept for "
                       "precision / recall (a seeded random subset; ADM's reference batches hold 10,000 images)")
    add_loading_flags(stats)

    evaluate = commands.add_parser("eval", help="the row FID, sFID, IS, precision, recall, density, coverage")
    evaluate.add_argument("--ref", required=True, help="statistics .npz written by `fid.py stats`, or reference "
                          "images (an npz with arr_0, as ADM's reference batches, or a folder), measured here")
    evaluate.add_argument("--samples", required=True, nargs="+", help="npz files with uint8 arr_0 (or folders of "
                          "images), one row each (baseline and LPL side by side)")
    evaluate.add_argument("--inception", required=True, help=f"path to {FID_WEIGHTS_NAME}")
    evaluate.add_argument("--prdc", action=argparse.BooleanOptionalAction, default=True,
                          help="precision / recall (ADM, k=3) and density / coverage (on by default)")
    evaluate.add_argument("--prdc-k", type=int, default=DEFAULT_PRDC_K, help="nearest neighbours for density / "
                          "coverage (Naeem et al.); precision / recall use ADM's k=3")
    evaluate.add_argument("--max-features", type=int, default=DEFAULT_MAX_SAMPLE_FEATURES, help="sample features "
                          "kept for precision / recall (a seeded random subset above it; 4 bytes x 2048 each)")
    evaluate.add_argument("--spectrum-plot", help="PNG of the samples' power spectra against the reference's "
                          "(samples resized to the reference's image size first, as Inception resizes)")
    evaluate.add_argument("--json", help="report .json to write: the row of one samples file, or "
                          "{rows, markdown} for several")
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
