"""Everything lpl keeps on disk: the flat-file dataset (its specification, its writer `encode`, its reader that
train.py draws batches from, the bundled demo data), image folders, checkpoint files (written atomically;
safetensors read and written without the safetensors package; torch.load with weights_only), and train.py's
checkpoints and run folders (one writer per folder: a lock). autoencoder.py builds on these readers; the command lines
below import it when they need an autoencoder.

A dataset is a folder (a shard), or a folder whose sub-folders are shards. A shard holds:

    latents.npy        (N, C, h, w) float16  scaled latents z = (E(x) - shift) * scaling of images x in [-1, 1]
    latents_flip.npy   (N, C, h, w) float16  optional: row i is image i flipped left-right
    labels.npy         (N,) int64            optional: the class of row i, in [0, len(class_names))
    context.npy        (N, L, D) float16     optional, instead of labels: precomputed text embeddings (L tokens)
    meta.json                                written last: a shard without it is incomplete

meta.json keys that are read: "resolution" (image side in pixels; default 8 x the latent side), "scaling" and
"shift" (how the latents were scaled: LPL and the sample grids unscale them the same way before decoding) and
"class_names" (required with labels.npy). The others ("autoencoder", "family", "count", "crop", "images", ...)
record where the data came from. Arrays are plain .npy files, opened with np.load(mmap_mode="r"): a batch reads
only its rows. All shards of a dataset must agree on the latent shape, the conditioning, flips and class names.

Rows are addressed in one index space: 0..N-1 are the rows of the shards in sorted order; with flipped copies
N..2N-1 are the same rows flipped. EpochSampler walks a fresh permutation of that space every epoch, drawn from
seed + epoch, and gives rank r of W every W-th index of each global batch: its (epoch, batch) is all that an
exact resume needs.

    python data.py encode --vae sdxl_vae.safetensors --vae-family sdxl --images imagenet/train \\
        --out data/in256 --resolution 256 --flip
    torchrun --nproc_per_node=8 data.py encode ...   # one node: each rank encodes a contiguous share, rank 0 merges
    python data.py roundtrip --vae assets/taef2_encoder.pth --image assets/photos/kodim01.png --out /tmp/rt.png \
        --resolution 256                              # one image through the autoencoder: prints the PSNR

Images come from a folder of images (unconditional) or of class sub-folders (labels: the index of the sorted
folder name), ADM center-cropped (guided-diffusion's resize-then-crop) to --resolution.

The demo data (`python train.py` with no --data) is this same pipeline run on the bundled assets/: random crops
of the photos in assets/photos/, written as PNG files and encoded with the real pretrained taef2 autoencoder in
assets/; the last DEMO_VALIDATION_PHOTOS photos are held out as a validation set.
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


def fail(message):
    """A user error: one line, no traceback."""
    raise SystemExit(f"error: {message}")


def write_json(path, value):
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(value, indent=1) + "\n")


def write_npy(path, array):
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.save(file, array)


# ----------------------------------------------------------------------------------------------------------------
# Files: atomic writes; checkpoints as safetensors (without the safetensors package) or torch.load(weights_only)
# ----------------------------------------------------------------------------------------------------------------

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


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def safetensors_entry(path, name, info):
    """One header entry -> (dtype, shape, begin, end), or a ValueError saying what was expected."""
    dtype = info.get("dtype") if isinstance(info, dict) else None
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}; expected {', '.join(SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(map(is_count, shape)) and isinstance(offsets, list) and len(offsets) == 2
            and all(map(is_count, offsets))):
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}; expected a shape and two "
                         "data_offsets, all non-negative integers")
    return SAFETENSORS_DTYPES[dtype], tuple(shape), *offsets


def load_safetensors(path):
    """Reads a .safetensors file -> (tensors, metadata). Tensors are memory-mapped copy-on-write (np.memmap
    mode "c"): only those you use are read from disk, which matters for a 7 GB checkpoint holding a 160 MB VAE."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        if file_size < 10 or not 2 <= header_size <= file_size - 8:
            raise ValueError(f"{path} is truncated or not a .safetensors file: its header length field says "
                             f"{header_size} bytes, the file has {file_size}")
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a checkpoint: its .safetensors header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a checkpoint: its .safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: its .safetensors __metadata__ is not a JSON object of strings")
    entries = {name: safetensors_entry(path, name, info) for name, info in header.items()}
    data_start = 8 + header_size
    data_size = file_size - data_start
    described = max((end for *_, end in entries.values()), default=0)
    if described > data_size:
        raise ValueError(f"{path} is truncated: its header describes {described} bytes of tensor data, the file holds "
                         f"{data_size} (expected a complete .safetensors file)")
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=data_start, shape=(data_size,)) if data_size else None
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        item_size = torch.tensor([], dtype=dtype).element_size()
        if begin > end or end - begin != math.prod(shape) * item_size:
            raise ValueError(f"{path}: tensor {name!r} ({SAFETENSORS_NAMES[dtype]} {list(shape)}) has data_offsets "
                             f"{[begin, end]}, inconsistent with its shape")
        raw = data[begin:end] if end > begin else np.zeros(0, np.uint8)
        if (data_start + begin) % item_size:
            raw = np.array(raw)  # a misaligned tensor is copied into aligned memory
        tensor = torch.from_numpy(raw.view(NUMPY_STORAGE[dtype]).reshape(shape))
        tensors[name] = tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
    return tensors, metadata


def one_line(error):
    """A torch.load error on one line; of a weights_only refusal, only the reason (torch's advice to retry with
    weights_only=False is not for files of unknown content)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = "unpickler: " + text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    return " ".join(text.split()) or type(error).__name__


def load_torch_checkpoint(path, zipped):
    """A torch.save file (.ckpt/.pt/.pth) -> {name: tensor}; a full SD .ckpt keeps its weights under "state_dict"."""
    if zipped and not zipfile.is_zipfile(path):  # torch.load would only say "Invalid argument"
        raise ValueError(f"{path} is truncated or corrupt: a torch.save zip archive without its closing directory "
                         "(expected a complete .ckpt/.pt/.pth file)")
    try:  # torch.load raises many kinds of errors on a file it cannot read; all mean the same here
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as error:
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read: "
                         f"{one_line(error)}") from error
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
    try:
        with open(path, "rb") as file:
            head = file.read(9)
        if head[8:9] == b"{":  # first: a header length may begin with the pickle's 0x80; byte 8 tells them apart
            return load_safetensors(path)
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch.save zip archive, or a legacy pickle
            return load_torch_checkpoint(path, zipped=head[:1] == b"P"), {}
    except OSError as error:  # unreadable: permissions, I/O errors, a memory map refused
        raise ValueError(f"{path} cannot be read: {error}") from error
    raise ValueError(f"{path} is not a checkpoint: expected a .safetensors file or a torch.save file "
                     "(.ckpt, .pt, .pth)")


# ----------------------------------------------------------------------------------------------------------------
# train.py's checkpoints and run folders: written atomically, read back with one-line errors, one writer per folder
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_KEYS = ("model", "ema", "model_config", "diffusion", "args", "step")  # what every train.py checkpoint holds


def save_checkpoint(checkpoint, folder, step):
    """OUT/checkpoints/step-N.pt written to a temporary file and renamed; last.pt a hard link renamed onto it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    with atomic_output(path) as temporary:
        torch.save(checkpoint, temporary)
    with atomic_output(folder / "last.pt") as temporary:
        try:
            os.link(path, temporary)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, temporary)
    return path


def load_checkpoint(path, flag="--ckpt", mmap=False):
    """A train.py checkpoint as a dict of plain tensors and values (torch.load weights_only, on the CPU first: never
    piled onto GPU 0). Any unreadable file or missing key is a one-line error naming the flag and the file."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {flag} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch.load raises many kinds of errors on a truncated or foreign file
        raise SystemExit(f"error: {flag} {path} is not a readable checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise SystemExit(f"error: {flag} {path} is not a train.py checkpoint: it has no {missing}")
    return checkpoint


@contextlib.contextmanager
def run_folder(out, rank):
    """Rank 0 holds an exclusive flock on OUT/run.lock (released by the kernel if the process dies, so a stale lock
    of a dead PID is simply taken over). A start that fails leaves no folder it created behind."""
    out, created = Path(out), not Path(out).exists()
    if rank != 0:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / "run.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"run folder {out} in use by PID {lock.read().strip() or '?'} (its run.lock is held)")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:
        yield
    finally:
        (out / "run.lock").unlink(missing_ok=True)
        lock.close()
        if created and not any(out.rglob("*.pt")) and not (out / "log.jsonl").exists():  # a start that failed
            shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

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


def list_images(folder, flag="--images"):
    """Images directly in `folder` (no labels), or in class sub-folders (labels: index of the sorted folder name).
    Returns (files, labels or None, class names or None, number of non-image files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        fail(f"{flag} {folder}: no such folder")
    entries = sorted(e for e in folder.iterdir() if not e.name.startswith((".", "_")))
    subfolders = [e for e in entries if e.is_dir()]
    top_files = [e for e in entries if e.is_file()]
    if subfolders and any(f.suffix.lower() in IMAGE_SUFFIXES for f in top_files):
        fail(f"{flag} {folder}: holds both images and sub-folders; expected either class sub-folders "
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
        fail(f"{flag} {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
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


# ----------------------------------------------------------------------------------------------------------------
# The writer: an image folder -> latents.npy (+ latents_flip.npy, labels.npy) + meta.json
# ----------------------------------------------------------------------------------------------------------------

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
            fail(f"{part} stopped at {progress['done']}/{len(share)}: rerun the same command to resume")
    masks = []
    for share, progress in zip(shares, progresses):
        mask = np.ones(len(share), dtype=bool)
        mask[[index for index, _, _ in progress["skipped"]]] = False
        masks.append(mask)
    kept = [share[i] for share, mask in zip(shares, masks) for i in np.flatnonzero(mask)]
    if not kept:
        fail(f"no readable image among the {len(files)} files")
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
    from autoencoder import load_autoencoder  # autoencoder.py reads its checkpoints with this file's readers

    out = Path(args.out)
    files, labels, class_names, others = list_images(args.images)
    device = torch.device(args.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if ae is None:
        ae = load_autoencoder(args.vae, device=device, scaling_factor=args.scaling_factor,
                              shift_factor=args.shift_factor, family=args.vae_family, verbose=rank == 0)
    if args.resolution % ae.downsample:
        fail(f"--resolution {args.resolution} is not a multiple of the autoencoder's {ae.downsample}x downsampling")
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


# ----------------------------------------------------------------------------------------------------------------
# The reader: memory-mapped shards, and a per-epoch permutation shared by all ranks
# ----------------------------------------------------------------------------------------------------------------

def load_npy(path, flag):
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        fail(f"{flag}: {path} is not a readable .npy array ({error})")


class LatentDataset:
    """The shards under `root` (a shard, or a folder of shard sub-folders) as one dataset. With flipped copies the
    index space is doubled: index i >= N is sample i - N, flipped. `flag` names the command-line flag in errors."""

    def __init__(self, root, flag="--data"):
        root, self.flag = Path(root), flag
        if not root.is_dir():
            fail(f"{flag} {root}: no such folder")
        shards = [root] if (root / "latents.npy").exists() else sorted(p.parent for p in root.glob("*/latents.npy"))
        if not shards:
            fail(f"{flag} {root}: no latents.npy in it or in its sub-folders (expected the flat-file dataset "
                 "written by `python data.py encode`)")
        self.shards = [self.open_shard(s) for s in shards]
        first = self.shards[0]
        for shard in self.shards[1:]:
            for key in ("latent_shape", "conditioning", "flips", "class_names"):
                if shard[key] != first[key]:
                    fail(f"{flag}: shard {shard['path']} has {key} {shard[key]}, but {first['path']} has {first[key]}")
        self.meta, self.latent_shape = first["meta"], first["latent_shape"]
        self.conditioning, self.flips, self.class_names = first["conditioning"], first["flips"], first["class_names"]
        self.num_classes = len(self.class_names) if self.conditioning == "labels" else None
        self.context_shape = first["context"].shape[1:] if self.conditioning == "context" else None
        self.offsets = np.cumsum([0] + [len(s["latents"]) for s in self.shards])
        self.count = int(self.offsets[-1])
        self.resolution = int(self.meta.get("resolution", self.latent_shape[-1] * 8))

    def open_shard(self, path):
        flag, meta_path = self.flag, path / "meta.json"
        if not meta_path.exists():
            fail(f"{flag}: {meta_path} is missing (each shard needs latents.npy and meta.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            fail(f"{flag}: {meta_path} is not JSON ({error})")
        latents = load_npy(path / "latents.npy", flag)
        if latents.ndim != 4:
            fail(f"{flag}: {path / 'latents.npy'} has shape {latents.shape}, expected (N, C, h, w)")
        flip_path = path / "latents_flip.npy"
        flips = load_npy(flip_path, flag) if flip_path.exists() else None
        if flips is not None and flips.shape != latents.shape:
            fail(f"{flag}: {flip_path} has shape {flips.shape}, {path / 'latents.npy'} {latents.shape}")
        shard = dict(path=path, meta=meta, latents=latents, flip_latents=flips, flips=flips is not None,
                     latent_shape=tuple(latents.shape[1:]), class_names=meta.get("class_names"))
        if (path / "labels.npy").exists():
            labels = load_npy(path / "labels.npy", flag)
            if labels.shape != (len(latents),):
                fail(f"{flag}: {path / 'labels.npy'} has shape {labels.shape}, expected ({len(latents)},)")
            if not shard["class_names"]:
                fail(f"{flag}: {meta_path} has no class_names for the labels in {path / 'labels.npy'}")
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(shard["class_names"]):
                fail(f"{flag}: {path / 'labels.npy'} holds labels {labels.min()}..{labels.max()}, "
                     f"expected 0..{len(shard['class_names']) - 1} (the class_names of {meta_path})")
            shard.update(conditioning="labels", labels=labels)
        elif (path / "context.npy").exists():
            context = load_npy(path / "context.npy", flag)
            if context.ndim != 3 or len(context) != len(latents):
                fail(f"{flag}: {path / 'context.npy'} has shape {context.shape}, expected ({len(latents)}, L, D)")
            shard.update(conditioning="context", context=context)
        else:
            shard.update(conditioning="none")
        return shard

    def __len__(self):
        return self.count * (2 if self.flips else 1)

    def get(self, indices):
        """Rows of the (doubled) index space -> latents (B, C, h, w) float32 and the condition, as CPU tensors."""
        latents, conditions = [], []
        for index in indices:
            flipped, index = divmod(int(index), self.count)
            shard_index = int(np.searchsorted(self.offsets, index, side="right")) - 1
            shard, row = self.shards[shard_index], index - int(self.offsets[shard_index])
            latents.append(shard["flip_latents" if flipped else "latents"][row])
            if self.conditioning == "labels":
                conditions.append(shard["labels"][row])
            elif self.conditioning == "context":
                conditions.append(shard["context"][row])
        latents = torch.from_numpy(np.stack(latents).astype(np.float32))
        if self.conditioning == "none":
            return latents, None
        condition = torch.from_numpy(np.stack(conditions))
        return latents, condition.long() if self.conditioning == "labels" else condition.float()


class EpochSampler:
    """Deterministic batches: epoch e is the permutation drawn from seed + e; each rank takes every world-th
    index of it. The position (epoch, batch in epoch) is all the state a resume needs."""

    def __init__(self, size, batch_size, rank, world, seed):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.batches_per_epoch = size // (batch_size * world)
        if self.batches_per_epoch == 0:
            fail(f"the dataset has {size} samples, fewer than one global micro-batch ({batch_size} x {world} ranks)")
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
    array = np.asarray(Image.open(photo).convert("RGB"))
    height, width = array.shape[:2]
    tops, lefts = rng.integers(0, height - size + 1, count), rng.integers(0, width - size + 1, count)
    return [array[top: top + size, left: left + size] for top, left in zip(tops, lefts)]


def build_demo_data(cache, resolution=DEMO_RESOLUTION, log=print):
    """assets/photos -> cache/train and cache/val flat-file datasets (cached: skipped when both exist). The crops
    are written as PNG files to cache/images/{train,val}/ and encoded by encode_folder, as a real dataset would be."""
    cache, photos = Path(cache), sorted((ASSETS / "photos").glob("*.png"))
    if len(photos) <= DEMO_VALIDATION_PHOTOS:
        fail(f"the demo needs the photos in {ASSETS / 'photos'} (found {len(photos)}); is the checkout complete?")
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
                                  workers=0, device="cpu")
        if ae is None:
            from autoencoder import load_autoencoder
            ae = load_autoencoder(DEMO_VAE, verbose=False)
        encode_folder(args, ae=ae)
        log(f"demo: {split}: {count} random {resolution}px crops of each of {', '.join(p.stem for p in files)}")
    return cache / "train", cache / "val"


# ----------------------------------------------------------------------------------------------------------------
# roundtrip: one image through the encoder and decoder
# ----------------------------------------------------------------------------------------------------------------

def run_roundtrip(args):
    from autoencoder import load_autoencoder

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


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def vae_arguments():
    """The flags that load an autoencoder (encode and roundtrip)."""
    from autoencoder import FAMILIES
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
    try:
        return run_encode(args) if args.command == "encode" else run_roundtrip(args)
    except (ValueError, FileNotFoundError, OSError) as error:  # the loaders' errors name the file
        raise SystemExit(f"data.py {args.command}: error: {error}") from None


if __name__ == "__main__":
    main()
