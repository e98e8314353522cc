"""The flat-file dataset: its specification, its writer (`python data.py encode`), its reader that train.py draws
batches from, and the bundled demo data. Files, checkpoints and images on disk are runtime.py's; the autoencoder
that encodes is autoencoder.py's.

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
exact resume needs.

    python data.py encode --vae sdxl_vae.safetensors --vae-family sdxl --images imagenet/train \\
        --out data/in256 --resolution 256 --flip
    torchrun --nproc_per_node=8 data.py encode ...   # one node: each rank encodes a contiguous share, rank 0 merges
    python data.py roundtrip --vae assets/taef2_encoder.pth --image assets/photos/kodim01.png --out /tmp/rt.png \\
        --resolution 256                              # one image through the autoencoder: prints the PSNR

Images come from a folder of images (unconditional) or of class sub-folders (labels: the index of the sorted
folder name), ADM center-cropped (guided-diffusion's resize-then-crop) to --resolution.

The demo data (`python train.py` with no --data) is this same pipeline run on the bundled assets/: random crops
of the photos in assets/photos/, written as PNG files and encoded with the real pretrained taef2 autoencoder in
assets/; the last DEMO_VALIDATION_PHOTOS photos are held out as a validation set.
"""

import argparse
import hashlib
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from autoencoder import FAMILIES, load_autoencoder
from runtime import (IMAGE_SUFFIXES, UserError, atomic_output, center_crop_arr, one_line_errors, rgb_image,
                     to_model_images, write_json, write_npy)
# data.py also hands on these names of runtime.py, for the scripts that import them from here.
from runtime import load_checkpoint, load_safetensors, read_checkpoint, save_safetensors  # noqa: F401


# ----------------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------------

def list_images(folder, flag="--images"):
    """Images directly in `folder` (no labels), or in class sub-folders (labels: index of the sorted folder name).
    Returns (files, labels or None, class names or None, number of non-image files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: no such folder")
    entries = sorted(e for e in folder.iterdir() if not e.name.startswith((".", "_")))
    subfolders = [e for e in entries if e.is_dir()]
    top_files = [e for e in entries if e.is_file()]
    if subfolders and any(f.suffix.lower() in IMAGE_SUFFIXES for f in top_files):
        raise UserError(f"{flag} {folder}: holds both images and sub-folders; expected either class sub-folders "
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
        raise UserError(f"{flag} {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
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
                array = center_crop_arr(rgb_image(image), self.resolution)
            return index, torch.from_numpy(array.copy()).permute(2, 0, 1), None
        except Exception as error:
            return index, None, f"{type(error).__name__}: {error}"


def keep_as_list(batch):
    return batch

# ----------------------------------------------------------------------------------------------------------------
# The writer: an image folder -> latents.npy (+ latents_flip.npy, labels.npy) + meta.json
# ----------------------------------------------------------------------------------------------------------------

def array_names(args):
    """The arrays an encode writes, in the order one encoder call produces them (see encode_share)."""
    names = ["latents.npy"] + (["latents_flip.npy"] if args.flip else [])
    if args.posterior_std:
        names += [name.replace(".npy", "_std.npy") for name in names]
    return names


def encode_share(args, ae, files, share, part, device, show_progress):
    """Encodes files[share] into part/latents.npy (and latents_flip.npy), resuming from part/progress.json when
    it was written by the same settings. Rows of unreadable images stay zero and are listed as skipped."""
    shape = (len(share), ae.latent_channels, args.resolution // ae.downsample, args.resolution // ae.downsample)
    key = hashlib.sha1(json.dumps([ae.describe(), [str(files[i]) for i in share], args.resolution, args.flip,
                                   args.posterior_std]).encode()).hexdigest()
    names = array_names(args)
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
            with torch.no_grad():  # [mean, flipped mean] (+ [std, flipped std]): the order of array_names
                latents = torch.cat(ae.encode_posterior(images)) if args.posterior_std else ae.encode(images)
                latents = latents.float().cpu().numpy().astype(np.float16)
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
            raise UserError(f"{part} stopped at {progress['done']}/{len(share)}: rerun the same command to resume")
    masks = []
    for share, progress in zip(shares, progresses):
        mask = np.ones(len(share), dtype=bool)
        mask[[index for index, _, _ in progress["skipped"]]] = False
        masks.append(mask)
    kept = [share[i] for share, mask in zip(shares, masks) for i in np.flatnonzero(mask)]
    if not kept:
        raise UserError(f"no readable image among the {len(files)} files")
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


def encode_folder(args, rank=0, world_size=1, barrier=lambda: None, ae=None):
    """Each rank encodes a contiguous share of the sorted files into out/_partial/rank{r}-of-{w}/; after the
    barrier rank 0 merges them. meta.json is written last and marks a complete dataset: it is removed when a run
    starts, latents.npy only ever appears complete (rename), and a killed run resumes from its partial files."""
    out = Path(args.out)
    files, labels, class_names, others = list_images(args.images)
    device = torch.device(args.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if ae is None:
        ae = load_autoencoder(args.vae, device=device, scaling_factor=args.scaling_factor,
                              shift_factor=args.shift_factor, family=args.vae_family, verbose=rank == 0)
    if args.resolution % ae.downsample:
        raise UserError(f"--resolution {args.resolution} is not a multiple of the autoencoder's {ae.downsample}x "
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
    names = array_names(args)
    kept, skipped = merge_shares(out, parts, names, files, shares, labels)
    produced = set(names) | ({"labels.npy"} if labels is not None else set())
    for stale in {"latents_flip.npy", "latents_std.npy", "latents_flip_std.npy", "labels.npy"} - produced:
        (out / stale).unlink(missing_ok=True)  # left by an earlier run with other flags
    meta = {
        "autoencoder": str(Path(ae.files[0]).resolve()),
        "autoencoder_files": [str(Path(f).resolve()) for f in ae.files],
        "autoencoder_describe": ae.describe(),
        "family": ae.family, "scaling_factor": ae.scaling_factor, "shift_factor": ae.shift_factor,
        "resolution": args.resolution, "crop": "ADM center crop",
        "count": len(kept), "latent_shape": [ae.latent_channels, *[args.resolution // ae.downsample] * 2],
        "dtype": "float16", "latents": "latents.npy",
        "flip_latents": "latents_flip.npy" if args.flip else None,  # row i: image i flipped left-right
        "posterior_std": "latents_std.npy" if args.posterior_std else None,
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
    # gloo: only a barrier is needed, and it must wait for the slowest rank's whole share
    dist.init_process_group("gloo", timeout=timedelta(hours=12))
    try:
        encode_folder(args, dist.get_rank(), dist.get_world_size(), barrier=dist.barrier)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# The reader: memory-mapped shards, and a per-epoch permutation shared by all ranks
# ----------------------------------------------------------------------------------------------------------------

def load_npy(path, flag):
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"{flag}: {path} is not a readable .npy array ({error})")


class LatentDataset:
    """The shards under `root` (a shard, or a folder of shard sub-folders) as one dataset. With flipped copies the
    index space is doubled: index i >= N is sample i - N, flipped. `flag` names the command-line flag in errors."""

    def __init__(self, root, flag="--data"):
        root, self.flag = Path(root), flag
        if not root.is_dir():
            raise UserError(f"{flag} {root}: no such folder")
        shards = [root] if (root / "latents.npy").exists() else sorted(p.parent for p in root.glob("*/latents.npy"))
        if not shards:
            raise UserError(f"{flag} {root}: no latents.npy in it or in its sub-folders (expected the flat-file dataset "
                 "written by `python data.py encode`)")
        self.shards = [self.open_shard(s) for s in shards]
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
        self.resolution = int(self.meta.get("resolution", self.latent_shape[-1] * 8))

    @property
    def latent_scaling(self):
        """{"scaling_factor", "shift_factor"} of meta.json (None where it records none): how the latents were
        scaled, z = (E(x) - shift_factor) * scaling_factor. Older datasets wrote "scaling" and "shift"."""
        meta = self.meta
        return dict(scaling_factor=meta.get("scaling_factor", meta.get("scaling")),
                    shift_factor=meta.get("shift_factor", meta.get("shift")))

    def open_shard(self, path):
        flag, meta_path = self.flag, path / "meta.json"
        if not meta_path.exists():
            raise UserError(f"{flag}: {meta_path} is missing (each shard needs latents.npy and meta.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{flag}: {meta_path} is not JSON ({error})")
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

    def get(self, indices):
        """Rows of the (doubled) index space -> latents (B, C, h, w) float32 and the condition, as CPU tensors."""
        groups = self.locate(indices)
        latents = torch.from_numpy(self.gather(groups, len(indices), "latents", "flip_latents").astype(np.float32))
        if self.conditioning == "none":
            return latents, None
        condition = torch.from_numpy(self.gather(groups, len(indices), self.conditioning, self.conditioning))
        return latents, condition.long() if self.conditioning == "labels" else condition.float()

    def get_std(self, indices):
        """The posterior std of the rows (B, C, h, w) float32 (a dataset encoded with --posterior-std)."""
        return torch.from_numpy(self.gather(self.locate(indices), len(indices), "std", "flip_std").astype(np.float32))


class EpochSampler:
    """Deterministic batches: epoch e is the permutation drawn from seed + e; each rank takes every world-th
    index of it. The position (epoch, batch in epoch) is all the state a resume needs."""

    def __init__(self, size, batch_size, rank, world, seed):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.batches_per_epoch = size // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise UserError(f"the dataset has {size} samples, fewer than one global micro-batch ({batch_size} x {world} ranks)")
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
            self._permutation = torch.randperm(self.size, generator=generator)
            self._permutation_epoch = self.epoch
        start = self.batch * self.batch_size * self.world
        batch = self._permutation[start: start + self.batch_size * self.world][self.rank:: self.world]
        self.batch += 1
        return batch


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
    tops, lefts = rng.integers(0, height - size + 1, count), rng.integers(0, width - size + 1, count)
    return [array[top: top + size, left: left + size] for top, left in zip(tops, lefts)]


def build_demo_data(cache, resolution=DEMO_RESOLUTION, log=print):
    """assets/photos -> cache/train and cache/val flat-file datasets (cached: skipped when both exist). The crops
    are written as PNG files to cache/images/{train,val}/ and encoded by encode_folder, as a real dataset would be."""
    cache, photos = Path(cache), sorted((ASSETS / "photos").glob("*.png"))
    if len(photos) <= DEMO_VALIDATION_PHOTOS:
        raise UserError(f"the demo needs the photos in {ASSETS / 'photos'} (found {len(photos)}); is the checkout complete?")
    splits = dict(train=(photos[:-DEMO_VALIDATION_PHOTOS], DEMO_TRAIN_CROPS, True),
                  val=(photos[-DEMO_VALIDATION_PHOTOS:], DEMO_VALIDATION_CROPS, False))
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
    encode.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    encode.add_argument("--resolution", type=int, default=256, help="ADM center crop to this square size")
    encode.add_argument("--flip", action="store_true", help="also write latents_flip.npy (left-right flipped images)")
    encode.add_argument("--posterior-std", action="store_true",
                        help="also write latents_std.npy: training then samples the posterior, as DiT did")
    encode.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    encode.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding processes")
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
    with one_line_errors(f"data.py {args.command}: ", also=(ValueError, OSError)):  # the loaders' errors name the file
        return run_encode(args) if args.command == "encode" else run_roundtrip(args)


if __name__ == "__main__":
    main()
