"""The flat-file dataset: its specification, its reader, the batches of train.py's steps (prepared ahead, their random
numbers keyed by position), `check`, and the bundled demo data. Its writer (`python data.py encode`) is encode.py;
files, checkpoints and images on disk are runtime.py's; the autoencoder that encodes is autoencoder.py's.

A dataset is a folder (a shard), or a folder whose sub-folders are shards. A shard holds:

    latents.npy        (N, C, h, w) float16  scaled latents z = (E(x) - shift_factor) * scaling_factor of images x
                                             in [-1, 1]
    latents_flip.npy   (N, C, h, w) float16  optional: row i is image i flipped left-right
    latents_std.npy    (N, C, h, w) float16  optional: the scaled posterior std of a KL VAE (latents.npy holds the
                                             mean): a batch then draws z = mean + std * N(0, 1), as DiT trained
                                             (`latent_dist.sample()`); with flips also latents_flip_std.npy
    labels.npy         (N,) int64            optional: the class of row i, in [0, len(class_names))
    context.npy        (N, L, D) float16     optional, instead of labels: precomputed text embeddings (L tokens)
    meta.json                                written last: a shard without it is incomplete

meta.json keys that are read: "resolution" (image side in pixels; default 8 x the latent side), "scaling_factor" and
"shift_factor" (how the latents were scaled: LPL and the sample grids unscale them the same way before decoding;
datasets written before these names read "scaling" and "shift") and "class_names" (required with labels.npy). The
others ("autoencoder", "family", "count", "crop", "images", ...) record where the data came from. Arrays are plain
.npy files, opened with np.load(mmap_mode="r"): a batch reads only its rows. All shards of a dataset must agree on
the latent shape, the conditioning, flips and class names.

Rows are addressed in one index space: 0..N-1 are the rows of the shards in sorted order; with flipped copies
N..2N-1 are the same rows flipped. EpochSampler walks a fresh permutation of that space every epoch, drawn from
seed + epoch, and gives rank r of W every W-th index of each global batch: its (epoch, batch) is all that an
exact resume needs. `get(indices, dtype=None)` leaves the rows float16 for a cast on the device, and a Prefetcher
reads the next batches on a background thread, in order.

    python data.py encode --vae sdxl_vae.safetensors --vae-family sdxl --images imagenet/train \\
        --out data/in256 --resolution 256 --flip
    torchrun --nproc_per_node=8 data.py encode ...   # one node: each rank encodes a contiguous share, rank 0 merges
    python data.py check data/in256                   # every row scanned; bad rows by dataset index; exit status 1
    python data.py roundtrip --vae assets/taef2_encoder.pth --image assets/photos/kodim01.png --out /tmp/rt.png \\
        --resolution 256                              # one image through the autoencoder: prints the PSNR

The demo data (`python train.py` with no --data) is this same pipeline run on the bundled assets/: random crops
of the photos in assets/photos/, written as PNG files and encoded with the real pretrained taef2 autoencoder in
assets/; the last DEMO_VALIDATION_PHOTOS photos are held out as a validation set.
"""

import argparse
import hashlib
import json
import math
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from autoencoder import FAMILIES, load_autoencoder
from encode import encode_folder, run_encode
from runtime import UserError, atomic_output, center_crop_arr, one_line_errors, rgb_image, to_model_images, write_json
# data.py also hands on these names of encode.py and runtime.py, for the scripts that import them from here.
from encode import list_images  # noqa: F401
from runtime import load_checkpoint, load_safetensors, read_checkpoint, save_safetensors  # noqa: F401


# ----------------------------------------------------------------------------------------------------------------
# The reader: memory-mapped shards, and a per-epoch permutation shared by all ranks
# ----------------------------------------------------------------------------------------------------------------

def load_npy(path, flag):
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"{flag}: {path} is not a readable .npy array ({error})")


def shard_folders(root, flag):
    """The shards of a dataset: `root` itself if it holds latents.npy, else its sub-folders that do (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder")
    shards = [root] if (root / "latents.npy").exists() else sorted(p.parent for p in root.glob("*/latents.npy"))
    if not shards:
        raise UserError(f"{flag} {root}: no latents.npy in it or in its sub-folders (expected the flat-file dataset "
                        "written by `python data.py encode`)")
    return shards


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_meta(path, flag):
    """A shard's meta.json -> dict, the keys that are read checked: a one-line error names the file and the key."""
    if not path.exists():
        raise UserError(f"{flag}: {path} is missing (each shard needs latents.npy and meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{flag}: {path} is not JSON ({error})")
    if not isinstance(meta, dict):
        raise UserError(f"{flag}: {path} holds a {type(meta).__name__}, expected a JSON object of keys")
    resolution, names = meta.get("resolution"), meta.get("class_names")
    if "resolution" in meta and not (is_number(resolution) and resolution == int(resolution) and resolution > 0):
        raise UserError(f'{flag}: {path}: "resolution" is {json.dumps(resolution)[:40]}, expected the image side in '
                        "pixels (a positive integer)")
    for key in ("scaling_factor", "shift_factor", "scaling", "shift"):
        if meta.get(key) is not None and not is_number(meta[key]):
            raise UserError(f'{flag}: {path}: "{key}" is {json.dumps(meta[key])[:40]}, expected a number (or null)')
    if names is not None and not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise UserError(f'{flag}: {path}: "class_names" is {json.dumps(names)[:40]}, expected a list of strings '
                        "(label i is class_names[i])")
    return meta


def as_tensor(array, dtype):
    """numpy rows -> a CPU tensor in `dtype` (None: as stored). numpy casts to float32 on the calling thread; torch's
    cast fans out to its intra-op threads, which on 2 loaded cores took 16 ms for 256 x 4x32x32 rows, numpy 7 ms."""
    if dtype is None:
        return torch.from_numpy(array)
    return torch.from_numpy(array.astype(np.float32)) if dtype == torch.float32 else torch.from_numpy(array).to(dtype)


class LatentDataset:
    """The shards under `root` (a shard, or a folder of shard sub-folders) as one dataset. With flipped copies the
    index space is doubled: index i >= N is sample i - N, flipped. `flag` names the command-line flag in errors."""

    def __init__(self, root, flag="--data"):
        self.flag, self.root = flag, Path(root)
        self.shards = [self.open_shard(s) for s in shard_folders(root, flag)]
        first = self.shards[0]
        for shard in self.shards[1:]:
            for key in ("latent_shape", "conditioning", "flips", "posterior_std", "class_names"):
                if shard[key] != first[key]:
                    raise UserError(f"{flag}: shard {shard['path']} has {key} {shard[key]}, but {first['path']} has {first[key]}")
        self.meta, self.latent_shape = first["meta"], first["latent_shape"]
        self.conditioning, self.flips, self.class_names = first["conditioning"], first["flips"], first["class_names"]
        self.posterior_std = first["posterior_std"]  # latents.npy holds posterior means, latents_std.npy their std
        self.num_classes = len(self.class_names) if self.conditioning == "labels" else None
        self.context_shape = first["context"].shape[1:] if self.conditioning == "context" else None
        self.offsets = np.cumsum([0] + [len(s["latents"]) for s in self.shards])
        self.count = int(self.offsets[-1])
        self.resolution = int(self.meta.get("resolution") or self.latent_shape[-1] * 8)

    def identity(self):
        """What a resume must find again, wherever the dataset now lies: the rows, their shape and conditioning, and
        each shard by name, size and meta.json."""
        shards = [dict(name=str(shard["path"].relative_to(self.root)), rows=len(shard["latents"]),
                       meta=hashlib.sha256(json.dumps(shard["meta"], sort_keys=True).encode()).hexdigest()[:16])
                  for shard in self.shards]
        return dict(rows=self.count, flips=self.flips, posterior_std=self.posterior_std,
                    latent_shape=list(self.latent_shape), conditioning=self.conditioning, shards=shards)

    @property
    def latent_scaling(self):
        """{"scaling_factor", "shift_factor"} of meta.json (None where it records none): how the latents were
        scaled, z = (E(x) - shift_factor) * scaling_factor. Older datasets wrote "scaling" and "shift"."""
        meta = self.meta
        return dict(scaling_factor=meta.get("scaling_factor", meta.get("scaling")),
                    shift_factor=meta.get("shift_factor", meta.get("shift")))

    def open_shard(self, path):
        flag, meta_path = self.flag, path / "meta.json"
        meta = read_meta(meta_path, flag)
        latents = load_npy(path / "latents.npy", flag)
        if latents.ndim != 4:
            raise UserError(f"{flag}: {path / 'latents.npy'} has shape {latents.shape}, expected (N, C, h, w)")
        flip_path = path / "latents_flip.npy"
        flips = load_npy(flip_path, flag) if flip_path.exists() else None
        if flips is not None and flips.shape != latents.shape:
            raise UserError(f"{flag}: {flip_path} has shape {flips.shape}, {path / 'latents.npy'} {latents.shape}")
        shard = dict(path=path, meta=meta, latents=latents, flip_latents=flips, flips=flips is not None,
                     latent_shape=tuple(latents.shape[1:]), class_names=meta.get("class_names"))
        std_names = ["latents_std.npy"] + (["latents_flip_std.npy"] if flips is not None else [])
        stds = [load_npy(path / name, flag) if (path / name).exists() else None for name in std_names]
        for name, std in zip(std_names, stds):
            if std is not None and std.shape != latents.shape:
                raise UserError(f"{flag}: {path / name} has shape {std.shape}, {path / 'latents.npy'} {latents.shape}")
        if any(std is not None for std in stds) and any(std is None for std in stds):
            raise UserError(f"{flag}: {path} holds some of {std_names}, not all (encode --posterior-std writes all)")
        shard.update(std=stds[0], flip_std=stds[-1], posterior_std=stds[0] is not None)
        if (path / "labels.npy").exists():
            labels = load_npy(path / "labels.npy", flag)
            if labels.shape != (len(latents),):
                raise UserError(f"{flag}: {path / 'labels.npy'} has shape {labels.shape}, expected ({len(latents)},)")
            if not shard["class_names"]:
                raise UserError(f"{flag}: {meta_path} has no class_names for the labels in {path / 'labels.npy'}")
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(shard["class_names"]):
                raise UserError(f"{flag}: {path / 'labels.npy'} holds labels {labels.min()}..{labels.max()}, "
                     f"expected 0..{len(shard['class_names']) - 1} (the class_names of {meta_path})")
            shard.update(conditioning="labels", labels=labels)
        elif (path / "context.npy").exists():
            context = load_npy(path / "context.npy", flag)
            if context.ndim != 3 or len(context) != len(latents):
                raise UserError(f"{flag}: {path / 'context.npy'} has shape {context.shape}, expected ({len(latents)}, L, D)")
            shard.update(conditioning="context", context=context)
        else:
            shard.update(conditioning="none")
        return shard

    def __len__(self):
        return self.count * (2 if self.flips else 1)

    def locate(self, indices):
        """Rows of the (doubled) index space -> [(shard, flipped, positions in the batch, rows of the shard)], the
        rows sorted: each array is then read with one gather per shard, in file order."""
        indices = np.asarray(indices, dtype=np.int64)
        flipped, index = np.divmod(indices, self.count)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        rows = index - self.offsets[shard_of]
        groups = []
        for shard_index in np.unique(shard_of):
            for flip in (0, 1):
                positions = np.flatnonzero((shard_of == shard_index) & (flipped == flip))
                if len(positions):
                    order = np.argsort(rows[positions], kind="stable")
                    groups.append((self.shards[shard_index], bool(flip), positions[order], rows[positions][order]))
        return groups

    def gather(self, groups, count, name, flipped_name=None):
        """One array of the shards (`flipped_name` for flipped rows) at the located rows -> numpy (count, ...)."""
        out = None
        for shard, flipped, positions, rows in groups:
            values = shard[flipped_name if flipped else name][rows]
            if out is None:
                out = np.empty((count, *values.shape[1:]), dtype=values.dtype)
            out[positions] = values
        return out

    def get(self, indices, dtype=torch.float32):
        """Rows of the (doubled) index space -> latents (B, C, h, w) and the condition (labels int64, or a context), as
        CPU tensors in `dtype`; dtype=None keeps the stored float16, for a cast on the device (half the bytes)."""
        groups = self.locate(indices)
        latents = as_tensor(self.gather(groups, len(indices), "latents", "flip_latents"), dtype)
        if self.conditioning == "none":
            return latents, None
        condition = self.gather(groups, len(indices), self.conditioning, self.conditioning)
        if self.conditioning == "labels":
            return latents, torch.from_numpy(condition).long()
        return latents, as_tensor(condition, dtype)

    def get_std(self, indices, dtype=torch.float32):
        """The posterior std of the rows (B, C, h, w) in `dtype` (None: float16 as stored), of a dataset encoded with
        --posterior-std."""
        return as_tensor(self.gather(self.locate(indices), len(indices), "std", "flip_std"), dtype)


def read_rows(path, size, flag):
    """Dataset rows from a JSON file: a list, or an object with "rows" (`python data.py check --json`,
    train.py's OUT/nonfinite-rows.json)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: not a readable JSON file ({error})") from None
    rows = value.get("rows") if isinstance(value, dict) else value
    if not isinstance(rows, list) or not all(isinstance(row, int) and 0 <= row < size for row in rows):
        raise UserError(f"{flag} {path}: expected a list of dataset rows in 0..{size - 1} (or {{\"rows\": [...]}})")
    return set(rows)


class EpochSampler:
    """Deterministic batches: epoch e is the permutation drawn from seed + e, without the `excluded` rows (bad ones,
    train.py --exclude-rows); each rank takes every world-th index of each global batch. The position (epoch, batch
    in epoch) is all the state a resume needs."""

    def __init__(self, size, batch_size, rank, world, seed, excluded=()):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.excluded = set(excluded)
        self.batches_per_epoch = (size - len(self.excluded)) // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise UserError(f"the dataset has {size - len(self.excluded)} samples, fewer than one global micro-batch "
                            f"({batch_size} x {world} ranks)")
        self.epoch, self.batch = 0, 0
        self._permutation_epoch, self._permutation = None, None

    def state_dict(self):
        return dict(epoch=self.epoch, batch=self.batch)

    def load_state_dict(self, state):
        self.epoch, self.batch = state["epoch"], state["batch"]

    def next_indices(self):
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        if self._permutation_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            permutation = torch.randperm(self.size, generator=generator)
            if self.excluded:
                permutation = permutation[~torch.isin(permutation, torch.tensor(sorted(self.excluded)))]
            self._permutation, self._permutation_epoch = permutation, self.epoch
        start = self.batch * self.batch_size * self.world
        batch = self._permutation[start: start + self.batch_size * self.world][self.rank:: self.world]
        self.batch += 1
        return batch


def pinned(item):
    """CPU tensors of a (nested dict / list / tuple) item in page-locked memory: their .to(cuda, non_blocking=True) is
    then a real asynchronous copy."""
    if isinstance(item, torch.Tensor):
        return item.pin_memory() if item.device.type == "cpu" else item
    if isinstance(item, dict):
        return {key: pinned(value) for key, value in item.items()}
    if isinstance(item, (list, tuple)):
        return type(item)(pinned(value) for value in item)
    return item


class Prefetcher:
    """Calls `produce()` (it returns the next step's batch, e.g. a dict of CPU tensors) on a background thread, up to
    `depth` items ahead, so that reading rows overlaps the step on the device. One thread and a FIFO queue: items come
    out in production order. CPU tensors are pinned when CUDA is available (pin_memory=None) or asked for. An
    exception raised by produce() is raised by the next() that would have returned its item (and by every later one);
    StopIteration from produce() ends the iteration. close(), or leaving the `with` block, stops and joins the thread
    (after the produce() call under way, if any).

    produce() runs on the other thread, ahead of the consumer: it must own what it mutates (its sampler, a
    torch.Generator of its own, never the global RNG that the step also draws from), and state that a checkpoint
    records (the sampler position) should travel inside the item it belongs to, not be read off the sampler."""

    def __init__(self, produce, depth=2, pin_memory=None):
        self.produce, self.finished, self.closed = produce, None, False
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.queue, self.stopping = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self.run, name="Prefetcher", daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            try:
                item = self.produce()
                item = pinned(item) if self.pin else item
            except BaseException as error:  # handed to the consumer, StopIteration included
                self.hand_over((None, error))
                return
            if not self.hand_over((item, None)):
                return

    def hand_over(self, item):
        """Puts (item, error) into the queue, waking every 50 ms to see whether close() was called. False: closed."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self.closed:
            raise ValueError("next() on a closed Prefetcher")
        if self.finished is None:
            item, error = self.queue.get()  # the thread's last hand-over is an error (StopIteration), unless closed
            if error is None:
                return item
            self.finished = error
        if isinstance(self.finished, StopIteration):
            raise StopIteration
        raise self.finished

    def close(self):
        self.stopping.set()
        self.thread.join()
        self.closed = True
        while not self.queue.empty():  # frees the (pinned) items that were never taken
            self.queue.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# The batches of one optimiser step: rows, conditions, times and noise, the random numbers keyed by position
# ----------------------------------------------------------------------------------------------------------------

def keyed_stream(seed, step, micro, kind, position=0):
    """numpy's generator for one key: independent streams for distinct keys (SeedSequence spawn keys, all of one
    length), unlike torch's CPU generator, which keeps 32 bits of a seed."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(step, micro, kind, position)))


def keyed_draws(seed, step, micro, positions, global_size, shape, posterior_std=False):
    """The random numbers of micro-batch `micro` of optimiser step `step`, keyed by (seed, step, micro-batch, the
    sample's position in the global micro-batch) alone: the same global batch draws the same numbers on 1 or 8
    ranks, and a resume needs no generator state. For every position of the global micro-batch (LPL's gate is taken
    over all of them): uniforms for the time, the CFG dropout and LPL's sub-batch; for this rank's `positions`: the
    noise eps and, with a posterior std, the noise of the latent's sample, each row from a stream of its own."""
    shared = keyed_stream(seed, step, micro, 0).random((3, global_size))
    noise, latent_noise = [], []
    for position in positions.tolist():
        row = keyed_stream(seed, step, micro, 1, position)
        noise.append(row.standard_normal(shape, dtype=np.float32))
        if posterior_std:
            latent_noise.append(row.standard_normal(shape, dtype=np.float32))
    draws = dict(time=torch.from_numpy(shared[0]), dropout=torch.from_numpy(shared[1]),
                 lpl=torch.from_numpy(shared[2]), noise=torch.from_numpy(np.stack(noise)))
    if posterior_std:
        draws["latent_noise"] = torch.from_numpy(np.stack(latent_noise))
    return draws


class StepBatches:
    """What one optimiser step of train.py consumes: grad_accum micro-batches of this rank's rows (float16, cast on
    the device), their conditions (`dropout` of them replaced by the null condition: the extra label row, or an
    all-zero context), times (diffusion.times_from_uniform), noise and, through `choose(t, keys, positions)`, LPL's
    sub-batch drawn over the global micro-batch. Every random number is keyed_draws': the same global batch gets the
    same numbers on any number of ranks. host(step) runs on a Prefetcher's thread; to_device on the training one."""

    def __init__(self, dataset, sampler, diffusion, seed, grad_accum, dropout, choose=None):
        self.dataset, self.sampler, self.diffusion, self.seed = dataset, sampler, diffusion, seed
        self.grad_accum, self.dropout, self.choose = grad_accum, dropout, choose
        self.global_size = sampler.batch_size * sampler.world
        self.positions = torch.arange(sampler.rank, self.global_size, sampler.world)  # the sampler gives us these

    def null_condition(self, condition):
        if self.dataset.conditioning == "labels":
            return torch.full_like(condition, self.dataset.num_classes)
        return torch.zeros_like(condition)

    def host(self, step):
        """The micro-batches of optimiser step `step` (0-based), on the CPU, the sampler's position after them, and
        the seconds it took (what the training thread would wait without a Prefetcher)."""
        batches, dataset, started = [], self.dataset, time.perf_counter()
        for micro in range(self.grad_accum):
            rows = self.sampler.next_indices()
            latents, condition = dataset.get(rows, dtype=torch.float16)
            draws = keyed_draws(self.seed, step, micro, self.positions, self.global_size, latents.shape[1:],
                                dataset.posterior_std)
            t_all = self.diffusion.times_from_uniform(draws["time"]).float()
            if condition is not None:
                drop = draws["dropout"][self.positions] < self.dropout
                condition = torch.where(drop.view(-1, *[1] * (condition.dim() - 1)), self.null_condition(condition),
                                        condition)
            batch = dict(rows=rows, z0=latents, condition=condition, t=t_all[self.positions], noise=draws["noise"])
            if dataset.posterior_std:  # z0 ~ N(mean, std^2): a fresh sample of the posterior each step (DiT)
                batch.update(std=dataset.get_std(rows, dtype=torch.float16), latent_noise=draws["latent_noise"])
            if self.choose is not None:
                batch["chosen"] = self.choose(t_all, draws["lpl"], self.positions)
            batches.append(batch)
        return dict(step=step, batches=batches, data=self.sampler.state_dict(), seconds=time.perf_counter() - started)

    @staticmethod
    def to_device(host, device):
        """Host micro-batches -> device tensors (non_blocking: from pinned memory the copies overlap the step)."""
        batches = []
        for batch in host["batches"]:
            z0 = batch["z0"].to(device, non_blocking=True).float()
            if "std" in batch:
                std = batch["std"].to(device, non_blocking=True).float()
                z0 = z0 + std * batch["latent_noise"].to(device, non_blocking=True)
            condition = batch["condition"]
            if condition is not None:  # labels stay integers; a float16 context is cast on the device
                condition = condition.to(device, non_blocking=True)
                condition = condition.float() if condition.is_floating_point() else condition
            batches.append(dict(rows=batch["rows"], z0=z0, condition=condition, t=batch["t"],
                                noise=batch["noise"].to(device, non_blocking=True), chosen=batch.get("chosen")))
        return batches


# ----------------------------------------------------------------------------------------------------------------
# check: every row of a dataset scanned, chunk by chunk, bad ones reported by their index
# ----------------------------------------------------------------------------------------------------------------

CHECK_CHUNK_BYTES = 64 << 20  # rows read per step of the scan: memory stays bounded whatever the shard's size
SHARD_ARRAYS = {"flip": "latents_flip.npy", "std": "latents_std.npy", "flip_std": "latents_flip_std.npy",
                "labels": "labels.npy", "context": "context.npy"}


def file_chunks(array, chunk_bytes):
    """(first row, rows) of a memory-mapped C-order .npy array, read from its file with plain reads of about
    chunk_bytes: a scan through the memory map would keep every page it touched mapped."""
    row_items = math.prod(array.shape[1:])
    step = max(1, chunk_bytes // max(1, row_items * array.dtype.itemsize))
    with open(array.filename, "rb") as file:
        for begin in range(0, len(array), step):
            count = min(step, len(array) - begin)
            file.seek(array.offset + begin * row_items * array.dtype.itemsize)
            values = np.fromfile(file, dtype=array.dtype, count=count * row_items)
            yield begin, values.reshape(count, *array.shape[1:])


def bad_rows(array, test, chunk_bytes):
    """Rows of `array` (a shard's file) for which test(chunk as (rows, items)) is True, as an int64 array."""
    found = [begin + np.flatnonzero(test(chunk.reshape(len(chunk), -1))) for begin, chunk in
             file_chunks(array, chunk_bytes)]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def open_for_check(path, problems, dtype, shape=None):
    """One array of a shard, memory-mapped, or None with the reason appended to `problems`."""
    if not path.exists():
        return None
    try:
        array = load_npy(path, "check")
    except UserError as error:
        problems.append(str(error).removeprefix("check: "))
        return None
    if array.dtype != dtype or (shape is not None and array.shape != shape):
        problems.append(f"{path} is {array.dtype} {array.shape}, expected {np.dtype(dtype)} "
                        f"{shape if shape is not None else ''}".rstrip())
        return None
    if array.ndim > 1 and not array.flags.c_contiguous:
        problems.append(f"{path} is stored in Fortran order, expected C order (np.save of a C-contiguous array)")
        return None
    return array


def inspect_shard(path, problems):
    """A shard's arrays (None where absent or unusable) and meta.json, file-level problems appended to `problems`."""
    try:
        meta = read_meta(path / "meta.json", "check")
    except UserError as error:
        meta = None
        problems.append(str(error).removeprefix("check: "))
    latents = open_for_check(path / "latents.npy", problems, np.float16)
    if latents is not None and latents.ndim != 4:
        problems.append(f"{path / 'latents.npy'} has shape {latents.shape}, expected (N, C, h, w)")
        latents = None
    shard = dict(path=path, meta=meta, latents=latents, rows=0 if latents is None else len(latents))
    if latents is None:
        return shard
    for key in ("flip", "std", "flip_std"):
        shard[key] = open_for_check(path / SHARD_ARRAYS[key], problems, np.float16, latents.shape)
    shard["labels"] = open_for_check(path / "labels.npy", problems, np.int64, (len(latents),))
    shard["context"] = open_for_check(path / "context.npy", problems, np.float16)
    if shard["context"] is not None and (shard["context"].ndim != 3 or len(shard["context"]) != len(latents)):
        problems.append(f"{path / 'context.npy'} has shape {shard['context'].shape}, expected ({len(latents)}, L, D)")
        shard["context"] = None
    meta = meta or {}
    for key, value in (("count", len(latents)), ("latent_shape", list(latents.shape[1:]))):
        if key in meta and meta[key] != value:
            problems.append(f'{path / "meta.json"}: "{key}" is {meta[key]}, {path / "latents.npy"} holds {value}')
    for key, name in (("flip_latents", "latents_flip.npy"), ("posterior_std", "latents_std.npy"),
                      ("labels", "labels.npy")):
        if key in meta and bool(meta[key]) != (path / name).exists():
            problems.append(f'{path / "meta.json"}: "{key}" is {json.dumps(meta[key])} but {name} '
                            f"{'exists' if (path / name).exists() else 'is missing'}")
    if (path / "labels.npy").exists() and not meta.get("class_names"):
        problems.append(f"{path / 'meta.json'} has no class_names for the labels in {path / 'labels.npy'}")
    return shard


def row_scans(class_count):
    """(what is wrong, array, test of (rows, items), which copies of a row it spoils) of check_dataset's scan."""
    def not_finite(rows):
        return ~np.isfinite(rows).all(axis=1)

    def not_a_std(rows):
        return ~(np.isfinite(rows) & (rows >= 0)).all(axis=1)

    def outside(rows):
        return ((rows < 0) | (rows >= class_count))[:, 0]

    return [("latents.npy: not finite", "latents", not_finite, "plain"),
            ("latents_flip.npy: not finite", "flip", not_finite, "flipped"),
            ("latents_std.npy: not finite, or negative", "std", not_a_std, "plain"),
            ("latents_flip_std.npy: not finite, or negative", "flip_std", not_a_std, "flipped"),
            (f"labels.npy: outside 0..{class_count - 1}", "labels", outside, "both"),
            ("context.npy: not finite", "context", not_finite, "both")]


def shards_disagree(shards, problems):
    """LatentDataset needs every shard to hold the same arrays, latent shape and class names."""
    for key, name in SHARD_ARRAYS.items():
        holders = [str(shard["path"]) for shard in shards if shard[key] is not None]
        if 0 < len(holders) < len(shards):
            problems.append(f"only {len(holders)} of {len(shards)} shards hold {name} ({', '.join(holders[:3])})")
    for shard in shards:
        if shard["flip"] is not None and (shard["std"] is None) != (shard["flip_std"] is None):
            problems.append(f"{shard['path']} holds one of latents_std.npy and latents_flip_std.npy, not both")
        for what, value in (("latent shape", lambda s: s["latents"].shape[1:]),
                            ("class_names", lambda s: (s["meta"] or {}).get("class_names"))):
            if value(shard) != value(shards[0]):
                problems.append(f"shard {shard['path']} has {what} {value(shard)}, {shards[0]['path']} "
                                f"{value(shards[0])}")


def check_dataset(root, chunk_bytes=CHECK_CHUNK_BYTES):
    """Scans every row of a dataset in chunks of about chunk_bytes, changing nothing: latents, flipped latents and
    contexts that are not finite, posterior stds that are not finite or negative, labels outside 0..len(class_names)-1;
    and the files (shapes, dtypes, meta.json, counts vs meta.json, shards that disagree). Bad rows are indices of
    LatentDataset's space: row r of shard s is offsets[s] + r, its flipped copy N + offsets[s] + r (a bad label or
    context spoils both). Returns {"root", "count", "size", "flips", "shards": [{"path", "rows", "first_index"}],
    "problems": [line], "bad_rows": {what: [index]}, "rows": [every bad index], "clean": bool}: as a JSON file, what
    train.py --exclude-rows reads."""
    problems = []
    shards = [inspect_shard(path, problems) for path in shard_folders(root, "check")]
    offsets = np.cumsum([0] + [shard["rows"] for shard in shards])
    count = int(offsets[-1])
    usable = [shard for shard in shards if shard["latents"] is not None]
    shards_disagree(usable, problems)
    flips = bool(usable) and all(shard["flip"] is not None for shard in usable)
    found = {}
    for shard, offset in zip(shards, offsets[:-1]):
        class_count = len((shard["meta"] or {}).get("class_names") or [])
        for what, key, test, copies in row_scans(class_count) if shard["latents"] is not None else []:
            if shard.get(key) is None or (key == "labels" and not class_count) or (copies == "flipped" and not flips):
                continue
            found_rows = offset + bad_rows(shard[key], test, chunk_bytes)
            spoiled = dict(plain=[found_rows], flipped=[count + found_rows],
                           both=[found_rows] + ([count + found_rows] if flips else []))
            found.setdefault(what, []).extend(spoiled[copies])
    bad = {what: np.unique(np.concatenate(parts)).tolist() for what, parts in found.items()}
    bad = {what: indices for what, indices in bad.items() if indices}
    rows = sorted(set().union(*bad.values()))
    return dict(root=str(root), count=count, size=count * (2 if flips else 1), flips=flips,
                shards=[dict(path=str(s["path"]), rows=s["rows"], first_index=int(o)) for s, o in zip(shards, offsets)],
                problems=problems, bad_rows=bad, rows=rows, clean=not problems and not rows)


def run_check(args):
    """Prints check_dataset's report (and writes it whole with --json); exit status 1 unless the dataset is clean."""
    report = check_dataset(args.data)
    flipped = f" ({report['size']} with flipped copies)" if report["flips"] else ""
    print(f"check: {args.data}: {len(report['shards'])} shards, {report['count']} rows{flipped}")
    for problem in report["problems"]:
        print(f"check: problem: {problem}")
    for what, indices in report["bad_rows"].items():
        shown = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
        print(f"check: {what}: {len(indices)} rows, at dataset indices {shown}")
    if args.json:
        write_json(args.json, report)
    summary = f"{len(report['rows'])} bad rows, {len(report['problems'])} problems"
    print(f"check: {'clean' if report['clean'] else 'NOT clean'}: {summary}"
          f"{f'; the full report is in {args.json}' if args.json else ''}", flush=True)
    if not report["clean"]:
        raise SystemExit(1)
    return report


# ----------------------------------------------------------------------------------------------------------------
# The demo data: random crops of the bundled photos, through the bundled taef2 autoencoder
# ----------------------------------------------------------------------------------------------------------------

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_VAE = ASSETS / "taef2_decoder.pth"  # its sibling taef2_encoder.pth is loaded with it
DEMO_RESOLUTION = 64  # crop side in pixels: 8x8x32 taef2 latents
DEMO_VALIDATION_PHOTOS = 4  # the last photos (sorted by name) are held out
DEMO_TRAIN_CROPS, DEMO_VALIDATION_CROPS = 64, 32  # random crops per photo


def demo_crops(photo, count, size, rng):
    """`count` random size x size crops of one photo, at positions drawn uniformly from rng."""
    with Image.open(photo) as image:
        array = np.asarray(rgb_image(image))
    height, width = array.shape[:2]
    if min(height, width) < size:
        raise UserError(f"{photo}: {width}x{height} pixels, smaller than the {size}x{size} crops")
    tops, lefts = rng.integers(0, height - size + 1, count), rng.integers(0, width - size + 1, count)
    return [array[top: top + size, left: left + size] for top, left in zip(tops, lefts)]


def build_demo_data(cache, resolution=DEMO_RESOLUTION, log=print, photos=None, held_out=None, crops=None):
    """Photos -> cache/train and cache/val flat-file datasets (cached: skipped when both exist). The crops are
    written as PNG files to cache/images/{train,val}/ and encoded by encode_folder, as a real dataset would be.
    photos: the image files (default: assets/photos); held_out: those of them that make the validation set (default:
    the last DEMO_VALIDATION_PHOTOS by name); the others make the training set. crops: (training, held-out) crops
    per photo (default DEMO_TRAIN_CROPS, DEMO_VALIDATION_CROPS)."""
    cache = Path(cache)
    photos = sorted((ASSETS / "photos").glob("*.png")) if photos is None else list(photos)
    held_out = photos[-DEMO_VALIDATION_PHOTOS:] if held_out is None else list(held_out)
    training = [photo for photo in photos if photo not in held_out]
    if not training or not held_out:
        raise UserError(f"the demo data needs photos to train on and photos to hold out: {len(training)} and "
                        f"{len(held_out)} of {len(photos)} (the default photos: {ASSETS / 'photos'}; is the checkout "
                        f"complete?)")
    train_crops, val_crops = crops or (DEMO_TRAIN_CROPS, DEMO_VALIDATION_CROPS)
    splits = dict(train=(training, train_crops, True), val=(held_out, val_crops, False))
    if all((cache / split / "meta.json").exists() for split in splits):
        log(f"demo: using the cached datasets in {cache}")
        return cache / "train", cache / "val"
    ae = None
    for seed, (split, (files, count, flip)) in enumerate(splits.items()):
        images, rng = cache / "images" / split, np.random.default_rng(seed)
        images.mkdir(parents=True, exist_ok=True)
        for photo in files:
            for i, crop in enumerate(demo_crops(photo, count, resolution, rng)):
                Image.fromarray(crop).save(images / f"{photo.stem}-{i:03d}.png")
        args = argparse.Namespace(images=images, out=cache / split, resolution=resolution, flip=flip, batch_size=64,
                                  workers=0, device="cpu", posterior_std=False)
        if ae is None:
            ae = load_autoencoder(DEMO_VAE, verbose=False)
        encode_folder(args, ae=ae)
        log(f"demo: {split}: {count} random {resolution}px crops of each of {', '.join(p.stem for p in files)}")
    return cache / "train", cache / "val"


# ----------------------------------------------------------------------------------------------------------------
# roundtrip: one image through the encoder and decoder
# ----------------------------------------------------------------------------------------------------------------

def psnr(images, reference):
    """PSNR in dB of images in [-1, 1] against a reference (peak = the full [-1, 1] range), over the whole batch."""
    mse = ((images.float().clamp(-1, 1) - reference.float()) / 2).square().mean()
    return (10 * torch.log10(1 / mse)).item()


def run_roundtrip(args):
    ae = load_autoencoder(args.vae, device=args.device,
                          scaling_factor=args.scaling_factor, shift_factor=args.shift_factor, family=args.vae_family)
    with Image.open(args.image) as image:
        image = rgb_image(image)
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


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def vae_arguments():
    """The flags that load an autoencoder (encode and roundtrip)."""
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
    return vae


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    formatter, vae = argparse.ArgumentDefaultsHelpFormatter, vae_arguments()
    encode = commands.add_parser("encode", parents=[vae], formatter_class=formatter,
                                 help="image folder -> latents.npy (+ latents_flip.npy, labels.npy) and meta.json")
    encode.add_argument("--images", type=Path, required=True,
                        help="a folder of images (unconditional), or of class sub-folders of images (labels.npy)")
    encode.add_argument("--out", type=Path, required=True,
                        help="dataset folder to write: replaced whole once complete, built in OUT.partial beside it")
    encode.add_argument("--resolution", type=int, default=256, help="ADM center crop to this square size")
    encode.add_argument("--flip", action="store_true", help="also write latents_flip.npy (left-right flipped images)")
    encode.add_argument("--posterior-std", action="store_true",
                        help="also write latents_std.npy: training then samples the posterior, as DiT did")
    encode.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    encode.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
    check = commands.add_parser("check", formatter_class=formatter,
                                help="scan a dataset for bad rows; exit status 1 if any",
                                description="Scans every row of a dataset, chunk by chunk, changing nothing: latents, "
                                "flipped latents, posterior stds and contexts that are not finite (stds also < 0), "
                                "labels outside the class range; shapes, dtypes, counts vs meta.json. Bad rows are "
                                "printed as indices of the dataset (row r of shard s: offsets[s] + r; flipped copy: "
                                "N + that). Exit status: 0 if the dataset is clean, 1 if it found bad rows or problems "
                                "(or could not read the dataset).")
    check.add_argument("data", type=Path, help="the dataset: a shard folder, or a folder of shard folders")
    check.add_argument("--json", type=Path, default=None,
                       help="also write the whole report here (its \"rows\": for train.py --exclude-rows)")
    roundtrip = commands.add_parser("roundtrip", parents=[vae], formatter_class=formatter,
                                    help="encode + decode one image, print the PSNR")
    roundtrip.add_argument("--image", type=Path, required=True, help="the image")
    roundtrip.add_argument("--out", type=Path, required=True, help="decoded PNG to write")
    roundtrip.add_argument("--resolution", type=int, default=None,
                           help="ADM center crop to this size (default: the image, cropped to multiples of 8)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "workers", 0) < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    commands = dict(encode=run_encode, check=run_check, roundtrip=run_roundtrip)
    with one_line_errors(f"data.py {args.command}: ", also=(ValueError, OSError)):  # the loaders' errors name the file
        return commands[args.command](args)


if __name__ == "__main__":
    main()
