"""The floor the rest of lpl stands on: errors, files, checkpoints, images on disk and processes. It knows nothing
about diffusion and imports no other file of the project; every other file may import it.

- Errors. `UserError` is a bad input the user can fix (a file, a key, a flag); its message is one line that names
  it and says what was expected. Library code raises it; only the command lines turn it into `error: ...` and an
  exit status (`one_line_errors`).
- Files are written atomically (`atomic_output` and the writers on it): a reader, a crash or a kill never sees
  half a file, and a failed write leaves the old file in place.
- Checkpoint files: .safetensors read and written without the safetensors package (memory-mapped), torch.save files
  read with torch.load(weights_only=True); train.py's checkpoints (step-N.pt, last.pt) and the lock of its run folder.
- Images on disk: the suffixes read as images, a file as RGB uint8, ADM's center crop, uint8 -> [-1, 1].
- Processes: torchrun's environment -> (rank, world size, device); workers that exit when their launcher dies.
"""

import contextlib
import ctypes
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------

class UserError(ValueError):
    """A bad input the user can fix: the message is one line naming the file, key or flag, and what was expected."""


@contextlib.contextmanager
def one_line_errors(prefix="", also=()):
    """For command-line entry points: a UserError (and the exception types in `also`) becomes the one line
    `{prefix}error: message` on stderr and exit status 1, without a traceback."""
    try:
        yield
    except (UserError, *also) as error:
        raise SystemExit(f"{prefix}error: {' '.join(str(error).split())}") from None


# ----------------------------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output(path):
    """Yields a temporary path beside `path` (its folder is made), renamed onto `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def require(valid, name, expected, value):
    """UserError "NAME must be EXPECTED, got VALUE" unless valid: the check of a library function's argument."""
    if not valid:
        raise UserError(f"{name} must be {expected}, got {value!r}")


def check_output_file(path, flag):
    """A file a command will write, checked before it loads or computes anything: `path` is not a folder, and the
    folder it goes in exists (or can be made) and takes a new file (probed with a nameless temporary file, so a
    read-only disk or a missing permission shows now rather than at the end). UserError naming the flag otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; expected the path of a file to write")
    check_writable(path.parent, flag, path)


def check_output_folder(path, flag):
    """A folder a command will write into, checked the same way: it is a folder or can be made, and takes files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; expected a folder (or a path where one can be made)")
    check_writable(path, flag, path)


def check_writable(folder, flag, path):
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists: the rest can be made
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder; expected a path in a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({error.strerror or error})") from None


def write_text(path, text):
    with atomic_output(path) as temporary:
        temporary.write_text(text)


def write_json(path, value):
    write_text(path, json.dumps(value, indent=1) + "\n")


def write_npy(path, array):
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.save(file, array)


def wall_clock():
    """The local time with its UTC offset, to the second: the `time` of every log record."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def append_jsonl(path, record):
    """One JSON line appended (a log: a kill can cut only its last line, which trim_jsonl drops)."""
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def trim_jsonl(path, last_step):
    """Keeps the lines of a JSONL log whose "step" is <= last_step (and drops a line a kill cut short)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
    write_text(path, "".join(kept))


def remove_stale_temporaries(folder):
    """Removes the temporary files (.NAME.PID.tmp) that killed writers of atomic_output left in `folder`. Call it
    only while holding the folder's lock: then no live writer owns one. Returns how many were removed."""
    stale = list(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files: safetensors (without the package) and torch.load(weights_only=True)
# ----------------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# numpy has no bfloat16: those bytes are viewed as int16 and reinterpreted by torch.
NUMPY_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int64: np.int64}


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
    well_formed = (isinstance(shape, list) and all(map(is_count, shape))
                   and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets)))
    if not well_formed:
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
    path = Path(folder) / f"step-{step:07d}.pt"
    try:
        with atomic_output(path) as temporary:
            torch.save(checkpoint, temporary)
    except (OSError, RuntimeError) as error:  # torch.save says a full disk its own ways ("unexpected pos ...")
        if shutil.disk_usage(path.parent).free > 2 ** 26 and not isinstance(error, OSError):
            raise
        raise UserError(f"{path} could not be written ({' '.join(str(error).split())[:200]}; {folder} has "
                        f"{shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free): the disk is full? The "
                        "last good checkpoint is intact") from None
    with atomic_output(path.with_name("last.pt")) as temporary:
        try:
            os.link(path, temporary)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, temporary)
    return path


def load_checkpoint(path, flag="--ckpt", mmap=False):
    """A train.py checkpoint as a dict of plain tensors and values (torch.load weights_only, on the CPU first: never
    piled onto GPU 0). Any unreadable file or missing key is a UserError naming the flag and the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{flag} {path} is empty (0 bytes); expected a checkpoint written by train.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch.load raises many kinds of errors on a truncated or foreign file
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise UserError(f"{flag} {path} is not a readable checkpoint ({type(error).__name__}: {first_line})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UserError(f"{flag} {path} is not a train.py checkpoint: it has no {missing}")
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
        holder = lock.read().strip() or "?"
        lock.close()
        raise UserError(f"run folder {out} in use by PID {holder} (its run.lock is held)") from None
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
# Images on disk
# ----------------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm"}


def rgb_image(image):
    """A PIL image in any mode -> an RGB PIL image of 8-bit pixels, as ADM's and torchvision's convert("RGB") give it,
    except where that is wrong:
    - "I;16", "I;16B", "I;16L", "I;16N" (16-bit PNG/TIFF) and "I" (32-bit integers; old Pillow's 16-bit PNGs) are
      scaled by the image's bit depth (16, or a TIFF's BitsPerSample), round(v * 255 / (2^bits - 1)), where
      convert("RGB") clips every value above 255 to white;
    - "F" (floating-point pixels) is refused: float images have no agreed range ([0, 1], [0, 255], linear HDR);
    - "P" with transparency takes its palette colours without Pillow's warning.
    As convert("RGB") does, alpha ("LA", "RGBA", "PA") is dropped, not composited ("P": the colour under a
    transparent pixel is its palette entry); "CMYK" goes through Pillow's naive formula (no ICC profile); "1" and "L"
    become grey."""
    if image.mode == "F":
        raise UserError(f"image {getattr(image, 'filename', '') or ''}: floating-point pixels (PIL mode F) have no "
                        "agreed range; expected 8- or 16-bit integer pixels")
    if image.mode == "I" or image.mode.startswith("I;16"):
        return Image.fromarray(integer_pixels_to_8_bits(image)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.copy()
        del image.info["transparency"]  # convert("RGB") ignores it, but warns about it
    return image.convert("RGB")


def integer_pixels_to_8_bits(image):
    """A 16- or 32-bit single-channel PIL image -> (H, W) uint8, v * 255 / (2^bits - 1) rounded (integer arithmetic:
    16-bit v -> v / 257)."""
    bits = 16
    if image.mode == "I":
        bits = (getattr(image, "tag_v2", None) or {}).get(258, 16)  # a TIFF's BitsPerSample, e.g. (32,)
        bits = bits[0] if isinstance(bits, tuple) else bits
    pixels, top = np.asarray(image).astype(np.int64), 2 ** int(bits) - 1
    if pixels.size and (pixels.min() < 0 or pixels.max() > top):
        raise UserError(f"image {getattr(image, 'filename', '') or ''}: PIL mode {image.mode} pixels span "
                        f"{pixels.min()}..{pixels.max()}, expected 0..{top} ({bits}-bit)")
    return ((pixels * 255 + top // 2) // top).astype(np.uint8)


def center_crop_arr(image, resolution):
    """ADM's center crop (guided-diffusion): halve with a box filter while the short side is >= 2x the target,
    resize bicubically so the short side is `resolution`, then crop the center. PIL image -> (R, R, 3) uint8."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(rgb_image(image))
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top: top + resolution, left: left + resolution]


def to_model_images(arrays):
    """(B, H, W, 3) or (B, 3, H, W) uint8 tensor -> float images in [-1, 1], (B, 3, H, W)."""
    return arrays.float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------------
# Processes: torchrun, and the signals a cluster sends before it stops a job
# ----------------------------------------------------------------------------------------------------------------

def exit_with_parent():
    """Under torchrun: this worker gets SIGTERM when its launcher dies (Linux prctl PR_SET_PDEATHSIG), so a killed
    launcher leaves no orphan behind (torchrun starts its workers in sessions of their own)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the call
        os._exit(1)


def setup_distributed():
    """(rank, world_size, device): torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; nccl on GPU, gloo on CPU. A plain
    `python` run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exit_with_parent()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; run the same command to continue


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 (what SLURM's --signal sends before it stops a job) ask the run to stop after its
    current step: `requested` turns True. A second signal exits at once, as the signal would have. A context
    manager: the previous handlers come back on exit. Only the main thread may install it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __enter__(self):
        self.requested, self.received = False, None
        self.previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        return self

    def handle(self, number, frame):
        if self.requested:  # the second signal: no more waiting
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
        self.requested, self.received = True, signal.Signals(number).name

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
