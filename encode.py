"""The writer of the flat-file dataset that data.py specifies: an image folder (or a folder of class sub-folders)
encoded by an autoencoder into latents.npy (+ latents_flip.npy, latents_std.npy, labels.npy) and meta.json, one
rank's share at a time, resumable, locked, and made visible only when complete. Its command line is data.py's:

    python data.py encode --vae sdxl_vae.safetensors --vae-family sdxl --images imagenet/train \\
        --out data/in256 --resolution 256 --flip
    torchrun --nproc_per_node=8 data.py encode ...   # one node: each rank encodes a contiguous share, rank 0 merges

Images come from a folder of images (unconditional) or of class sub-folders (labels: the index of the sorted
folder name), read as RGB by runtime.rgb_image (16-bit images scaled to 8 bits, alpha dropped, float images refused)
and ADM center-cropped (guided-diffusion's resize-then-crop) to --resolution. An encode works in OUT.partial/ beside
--out (its lock, each rank's resumable progress, the dataset being assembled) and renames the complete dataset onto
--out, which until then keeps what it held; a failed or killed encode keeps OUT.partial/ to resume from, a
successful one leaves nothing else behind. Latents that are not finite stop the encode, naming their images.
`python data.py check` reads them all back.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from autoencoder import load_autoencoder
from runtime import (IMAGE_SUFFIXES, UserError, atomic_output, center_crop_arr, rgb_image, to_model_images,
                     write_json, write_npy)

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
    with tqdm(total=len(share), initial=progress["done"], unit="img", disable=not show_progress) as bar:
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
                refuse_non_finite(latents, len(arrays), [files[share[row]] for row in rows])
                for array, chunk in zip(arrays, np.split(latents, len(arrays))):
                    array[rows] = chunk
            for array in arrays:
                array.flush()  # progress.json never claims rows that are not on disk
            progress["done"] = batch[-1][0] + 1
            write_json(progress_path, progress)
            bar.update(len(batch))


def refuse_non_finite(latents, arrays, files):
    """latents: the `arrays` outputs of one encoder call stacked, (arrays x B, C, h, w) float16, for B files. A row
    that is NaN or inf in any of them (a float16 overflow, a broken autoencoder) stops the encode, naming its files."""
    finite = np.isfinite(latents.reshape(arrays, len(files), -1)).all(axis=(0, 2))
    if not finite.all():
        bad = [str(file) for file, ok in zip(files, finite) if not ok]
        raise UserError(f"the autoencoder gave non-finite latents (NaN or inf after the float16 cast) for {len(bad)} "
                        f"images: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; expected finite values, "
                        "nothing was written as complete")


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
            try:  # one complete share: a second name, no copy (the part stays whole for a rerun)
                os.link(parts[0] / name, out / name)
            except OSError:  # file systems without hard links
                shutil.copyfile(parts[0] / name, out / name)
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


# Files an encode writes into --out; a folder holding anything else is not replaced.
DATASET_FILES = {"meta.json", "latents.npy", "latents_flip.npy", "latents_std.npy", "latents_flip_std.npy",
                 "labels.npy", "_partial"}  # _partial: the progress folder of encodes before OUT.partial


def partial_folder(out):
    """OUT.partial, beside --out: the encode lock, each rank's resumable share, and the dataset being assembled."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise UserError(f"--out {out}: expected the dataset folder's own name (an encode replaces it as a whole)")
    return out.with_name(out.name + ".partial")


def check_out_folder(out):
    """--out may be new, or a dataset an encode wrote: it is replaced as a whole, so it must hold nothing else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: not a folder")
    foreign = sorted(e.name for e in out.iterdir() if e.name not in DATASET_FILES
                     and not (e.name.startswith(".") and e.name.endswith(".tmp"))) if out.is_dir() else []
    if foreign:
        raise UserError(f"--out {out} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which an "
                        "encode does not write; expected a new folder or a dataset of `data.py encode` (replaced "
                        "whole)")


@contextlib.contextmanager
def encode_lock(partial, rank):
    """Rank 0 holds an exclusive flock on OUT.partial/encode.lock for the whole encode (runtime.run_folder's pattern:
    the kernel releases it when the process dies). On the way out the lock file goes, and OUT.partial if empty."""
    if rank != 0:
        yield
        return
    partial.mkdir(parents=True, exist_ok=True)
    lock = open(partial / "encode.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise UserError(f"--out {partial.with_suffix('')}: in use by PID {holder} (another encode holds "
                        f"{partial / 'encode.lock'})") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:
        yield
    finally:
        (partial / "encode.lock").unlink(missing_ok=True)
        lock.close()
        with contextlib.suppress(OSError):
            partial.rmdir()  # only if empty: a failed encode keeps its progress


@contextlib.contextmanager
def kept_for_resume(partial, part):
    """A failed encode keeps its share's progress in OUT.partial, and says so: in a UserError's one line, else on
    stderr. A share that stopped before its first batch was done has nothing to resume: it goes."""
    try:
        yield
    except BaseException as error:
        if not (part / "progress.json").exists():
            shutil.rmtree(part, ignore_errors=True)
            raise
        hint = f"{partial} keeps the progress: rerun the same command to resume, or delete it to start over"
        if isinstance(error, UserError):
            raise UserError(f"{error}; {hint}") from None
        print(f"encode: stopped ({type(error).__name__}); {hint}", file=sys.stderr, flush=True)
        raise


def replace_folder(complete, out, partial):
    """The assembled dataset becomes --out: the old --out (if any) is moved aside into OUT.partial, the new one renamed
    in, then OUT.partial removed. A kill between the two renames leaves the old dataset in OUT.partial/replaced."""
    shutil.rmtree(partial / "replaced", ignore_errors=True)
    if out.exists():
        os.replace(out, partial / "replaced")
    os.replace(complete, out)
    shutil.rmtree(partial)


def encode_folder(args, rank=0, world_size=1, barrier=lambda: None, ae=None):
    """Each rank encodes a contiguous share of the sorted files into OUT.partial/rank{r}-of-{w}/; after the barrier
    rank 0 merges them into OUT.partial/dataset/, writes meta.json (last) and renames it onto --out. --out is only ever
    replaced by a complete dataset; a killed or failed run keeps OUT.partial and resumes from it; a second encode into
    the same --out is refused while the first runs (OUT.partial/encode.lock)."""
    out, partial = Path(args.out), partial_folder(args.out)
    check_out_folder(out)
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
    shares = [range(r * len(files) // world_size, (r + 1) * len(files) // world_size) for r in range(world_size)]
    parts = [partial / f"rank{r}-of-{world_size}" for r in range(world_size)]
    with encode_lock(partial, rank):
        barrier()  # the other ranks write only once rank 0 holds the lock
        with kept_for_resume(partial, parts[rank]):
            encode_share(args, ae, files, shares[rank], parts[rank], device, show_progress=rank == 0)
            barrier()
            if rank != 0:
                return
            complete = partial / "dataset"
            shutil.rmtree(complete, ignore_errors=True)  # an earlier merge that was cut short
            complete.mkdir()
            kept, skipped = merge_shares(complete, parts, array_names(args), files, shares, labels)
            meta = dataset_meta(args, ae, labels, class_names, kept, skipped)
            write_json(complete / "meta.json", meta)
            check_out_folder(out)  # again: files may have appeared in it while the encode ran
            replace_folder(complete, out, partial)
    print(f"encode: wrote {len(kept)} latents {meta['latent_shape']} to {out} "
          f"({len(class_names) if class_names else 'no'} classes, {len(skipped)} unreadable images skipped"
          f"{': ' + ', '.join(skipped[:10]) if skipped else ''}{' ...' if len(skipped) > 10 else ''}; "
          f"{others} non-image files ignored)", flush=True)


def dataset_meta(args, ae, labels, class_names, kept, skipped):
    """meta.json of an encode: the keys LatentDataset reads, and where the data came from."""
    return {
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
