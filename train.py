"""Train an MMDiT on flat-file latents, with or without the Latent Perceptual Loss.

    python train.py --lpl                         # self-contained CPU demo: a smoke run of the pipeline, not a result
    python train.py --data DATA --out runs/pre --model XL/2 --steps 600000            # phase 1, no LPL
    torchrun --nproc_per_node=8 train.py --data DATA --out runs/post --model XL/2 \\
        --init-from runs/pre/checkpoints/last.pt --lpl --vae sdxl_vae.safetensors --steps 200000   # phase 2
    torchrun --nproc_per_node=8 train.py ... --resume runs/post/checkpoints/last.pt   # continue bit-exactly

DATA is the flat-file dataset of DESIGN.md (`python autoencoder.py encode ...` writes one): latents.npy (N, C, h, w)
float16 with labels.npy (N,) or context.npy (N, L, D), and meta.json; or a folder of such shards.

Per step: z_t = alpha_t z0 + sigma_t eps (schedules.py); L_diff = ||D(z_t, t) - target||^2; with --lpl,
L_tot = L_diff + w_LPL * L_LPL(z0_hat, z0) where z0_hat = x0_from_pred(z_t, D, t) (Table 1, Eq. 3; lpl.py).
The paper's recipe (Sec. 4.1, Table 4): pre-train without LPL, then post-train with it (--init-from, or --lpl-start).

Writes OUT/checkpoints/step-NNNNNNN.pt and OUT/checkpoints/last.pt (atomically), OUT/log.jsonl, and sample grids
from the EMA model in OUT/samples/ when a decoder is available (--vae).
"""

import argparse
import contextlib
import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from autoencoder import atomic_output, build_kl_autoencoder, load_autoencoder, save_autoencoder, set_latent_space
from lpl import NORMS, LatentPerceptualLoss
from model import MODELS, build_model
from sample import default_cfg_scale, latents_to_uint8, mmdit_model_fn, sample, save_grid
from schedules import OBJECTIVES, Diffusion

CFG_DROPOUT = 0.1  # fraction of labels / contexts replaced by the null condition (classifier-free guidance)


# ----------------------------------------------------------------------------------------------------------------
# Arguments: the defaults are the paper's settings
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="flat-file dataset folder (or a folder of shards); absent: the built-in demo")
    p.add_argument("--out", default=None, help="run folder (default runs/demo for the demo)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 400000; demo 300)")
    p.add_argument("--model", choices=list(MODELS), default=None, help="MMDiT size (default XL/2; demo 'demo')")
    p.add_argument("--objective", choices=OBJECTIVES, default="eps", help="DDPM-eps, DDPM-v or Flow-OT (Table 1)")
    p.add_argument("--flow-shift", type=float, default=None,
                   help="flow: resolution shift s of the training times (default resolution / 256, SD3)")
    p.add_argument("--global-batch-size", type=int, default=None, help="over all ranks (default 256; demo 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (DiT)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="autocast (default bf16 on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the MMDiT")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the MMDiT blocks")
    # LPL (Sec. 3.2, 4.1, 4.3)
    p.add_argument("--lpl", action="store_true", help="add the latent perceptual loss")
    p.add_argument("--vae", help="autoencoder checkpoint: LPL's decoder and the sample grids")
    p.add_argument("--vae-dtype", choices=("bf16", "fp32"), default=None,
                   help="dtype of the decoder used by LPL (default bf16 on GPU; never fp16: SDXL's VAE overflows)")
    p.add_argument("--lpl-weight", type=float, default=3.0, help="w_LPL (Fig. 9: best near 3)")
    p.add_argument("--lpl-threshold", type=float, default=4.0,
                   help="tau in sigma/alpha units at 256 px, scaled by resolution/256 (Fig. 6: best 3-6)")
    p.add_argument("--lpl-blocks", type=int, default=None,
                   help="decoder taps: mid block + up blocks (Fig. 7; default 5, or all a smaller decoder has)")
    p.add_argument("--lpl-norm", choices=NORMS, default="shared", help="feature normalisation (Sec. 3.2, 4.3)")
    p.add_argument("--lpl-mask", choices=("prediction", "target", "none"), default="prediction",
                   help="features the outlier mask is computed from (Eq. 3: the prediction's)")
    p.add_argument("--lpl-depth-weights", choices=("resolution", "uniform"), default="resolution")
    p.add_argument("--lpl-start", type=int, default=0, help="step at which LPL switches on (Table 4)")
    p.add_argument("--lpl-max-samples", type=int, default=None,
                   help="per rank: LPL on at most this many gated samples, reweighted (unbiased, cheaper)")
    p.add_argument("--lpl-checkpointing", action="store_true", help="activation checkpointing of the decoder")
    p.add_argument("--lpl-channels-last", action="store_true", help="decoder convolutions in NHWC (faster on GPU)")
    # EMA, checkpoints, logs
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay (Fig. 10: 0.9999 without LPL, 0.99975 with it)")
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint period (default 50000; demo 100)")
    p.add_argument("--log-every", type=int, default=None, help="log period (default 100; demo 10)")
    p.add_argument("--sample-every", type=int, default=None,
                   help="sample-grid period (default: --ckpt-every; 0: no grids)")
    p.add_argument("--resume", help="checkpoint to continue from bit-exactly ('last': OUT/checkpoints/last.pt)")
    p.add_argument("--init-from", help="checkpoint whose weights (model and EMA) start this run; any resolution")
    p.add_argument("--demo-images", type=int, default=512, help="demo: size of the synthetic image set")
    return p.parse_args(argv)


def fill_defaults(args):
    """Defaults that depend on whether this is the CPU demo or a real run."""
    demo = args.data is None
    real = dict(out=None, steps=400_000, model="XL/2", global_batch_size=256, ckpt_every=50_000, log_every=100)
    small = dict(out="runs/demo", steps=300, model="demo", global_batch_size=32, ckpt_every=100, log_every=10)
    for name, value in (small if demo else real).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        raise SystemExit("train.py: --out DIR is required with --data (checkpoints go to DIR/checkpoints)")
    if args.sample_every is None:
        args.sample_every = args.ckpt_every
    for flag in ("steps", "global_batch_size", "grad_accum", "ckpt_every", "log_every", "demo_images"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"train.py: --{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.sample_every < 0:
        raise SystemExit(f"train.py: --sample-every must be 0 (no grids) or a period, got {args.sample_every}")
    if args.lpl and args.vae is None and not demo:
        raise SystemExit("train.py: --lpl needs --vae PATH, the autoencoder whose decoder defines the loss")
    if not args.lpl:
        defaults = vars(parse_args([]))
        given = [f"--{k.replace('_', '-')}" for k in defaults if k.startswith("lpl_") and getattr(args, k) != defaults[k]]
        if given:
            raise SystemExit(f"train.py: {', '.join(given)} given without --lpl: they would do nothing")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python train.py` is one rank
# ----------------------------------------------------------------------------------------------------------------

def setup_distributed():
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Flat-file data (DESIGN.md): memory-mapped shards, a per-epoch permutation shared by all ranks
# ----------------------------------------------------------------------------------------------------------------

class LatentDataset:
    """One or several shards, each a folder with latents.npy (+ latents_flip.npy), labels.npy or context.npy,
    meta.json. With flipped copies the index space is doubled: index i >= N is sample i - N, flipped."""

    def __init__(self, root):
        root = Path(root)
        if not root.is_dir():
            raise SystemExit(f"train.py: --data {root}: no such folder")
        shards = [root] if (root / "latents.npy").exists() else sorted(p.parent for p in root.glob("*/latents.npy"))
        if not shards:
            raise SystemExit(f"train.py: --data {root}: no latents.npy in it or in its sub-folders "
                             "(expected the flat-file dataset written by `python autoencoder.py encode`)")
        self.shards = [self.open_shard(s) for s in shards]
        first = self.shards[0]
        for shard in self.shards[1:]:
            for key in ("latent_shape", "conditioning", "flips", "class_names"):
                if shard[key] != first[key]:
                    raise SystemExit(f"train.py: shard {shard['path']} has {key} {shard[key]}, "
                                     f"but {first['path']} has {first[key]}")
        self.meta, self.latent_shape = first["meta"], first["latent_shape"]
        self.conditioning, self.flips, self.class_names = first["conditioning"], first["flips"], first["class_names"]
        self.num_classes = len(self.class_names) if self.conditioning == "labels" else None
        self.context_shape = first["context"].shape[1:] if self.conditioning == "context" else None
        self.offsets = np.cumsum([0] + [len(s["latents"]) for s in self.shards])
        self.count = int(self.offsets[-1])
        self.resolution = int(self.meta.get("resolution", self.latent_shape[-1] * 8))

    @staticmethod
    def open_shard(path):
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise SystemExit(f"train.py: {meta_path} is missing (each shard needs latents.npy and meta.json)")
        meta = json.loads(meta_path.read_text())
        latents = np.load(path / "latents.npy", mmap_mode="r")
        if latents.ndim != 4:
            raise SystemExit(f"train.py: {path / 'latents.npy'} has shape {latents.shape}, expected (N, C, h, w)")
        flip_path = path / "latents_flip.npy"
        flips = np.load(flip_path, mmap_mode="r") if flip_path.exists() else None
        if flips is not None and flips.shape != latents.shape:
            raise SystemExit(f"train.py: {flip_path} has shape {flips.shape}, {path / 'latents.npy'} {latents.shape}")
        shard = dict(path=path, meta=meta, latents=latents, flip_latents=flips, flips=flips is not None,
                     latent_shape=tuple(latents.shape[1:]), class_names=meta.get("class_names"))
        if (path / "labels.npy").exists():
            labels = np.load(path / "labels.npy", mmap_mode="r")
            if labels.shape != (len(latents),):
                raise SystemExit(f"train.py: {path / 'labels.npy'} has shape {labels.shape}, expected ({len(latents)},)")
            if not shard["class_names"]:
                raise SystemExit(f"train.py: {meta_path} has no class_names for the labels in {path / 'labels.npy'}")
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(shard["class_names"]):
                raise SystemExit(f"train.py: {path / 'labels.npy'} holds labels {labels.min()}..{labels.max()}, "
                                 f"expected 0..{len(shard['class_names']) - 1} (the class_names of {meta_path})")
            shard.update(conditioning="labels", labels=labels)
        elif (path / "context.npy").exists():
            context = np.load(path / "context.npy", mmap_mode="r")
            if context.ndim != 3 or len(context) != len(latents):
                raise SystemExit(f"train.py: {path / 'context.npy'} has shape {context.shape}, "
                                 f"expected ({len(latents)}, L, D)")
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
            raise SystemExit(f"train.py: the dataset has {size} samples, fewer than one global micro-batch "
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
            self._permutation = torch.randperm(self.size, generator=generator)
            self._permutation_epoch = self.epoch
        start = self.batch * self.batch_size * self.world
        batch = self._permutation[start: start + self.batch_size * self.world][self.rank:: self.world]
        self.batch += 1
        return batch


# ----------------------------------------------------------------------------------------------------------------
# The built-in demo: synthetic labelled images, a small random KL autoencoder, flat files (cached)
# ----------------------------------------------------------------------------------------------------------------

DEMO_CLASSES = ("disks", "stripes", "checkers", "rings")
DEMO_RESOLUTION = 64


def synthetic_image(kind, rng, size=DEMO_RESOLUTION):
    """A procedural RGB image in [-1, 1] of one of DEMO_CLASSES, with random colours, frequency and position."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    background, foreground = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
    cx, cy, angle, frequency = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0, np.pi), rng.uniform(3, 8)
    radius = np.hypot(xx - cx, yy - cy)
    if kind == "disks":
        inside = radius < rng.uniform(0.1, 0.3)
    elif kind == "stripes":
        inside = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle))) > 0
    elif kind == "checkers":
        inside = (np.floor(xx * frequency) + np.floor(yy * frequency)) % 2 == 0
    else:
        inside = np.sin(2 * np.pi * frequency * radius) > 0
    image = np.where(inside[..., None], foreground, background) + rng.normal(0, 0.05, (size, size, 3))
    return np.clip(image, -1, 1).transpose(2, 0, 1).astype(np.float32)


def random_demo_autoencoder():
    """A small KL autoencoder with random weights (4 levels: /8, 4 latent channels, 5 LPL taps), its latent scale
    set so the demo's latents have unit standard deviation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ae = build_kl_autoencoder("sd", ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    rng = np.random.default_rng(1)
    images = torch.from_numpy(np.stack([synthetic_image(DEMO_CLASSES[i % 4], rng) for i in range(32)]))
    with torch.no_grad():
        std = ae.encode(images).std().item()
    return set_latent_space(ae, "custom", ae.scaling_factor / std, 0.0)


def build_demo_data(root, vae_path, count, log):
    """Encode `count` synthetic images with the autoencoder at vae_path into root (skipped when cached)."""
    root = Path(root)
    if (root / "meta.json").exists():
        log(f"demo: using the cached dataset {root}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    ae = load_autoencoder(vae_path, verbose=False)
    if not ae.has_encoder:
        raise SystemExit(f"train.py: the demo encodes its images, but {vae_path} has no encoder "
                         "(give the *_decoder.pth of a pair whose *_encoder.pth sits beside it)")
    rng = np.random.default_rng(0)
    labels = np.arange(count) % len(DEMO_CLASSES)
    latents = []
    with torch.no_grad():
        for start in range(0, count, 64):
            images = np.stack([synthetic_image(DEMO_CLASSES[k], rng) for k in labels[start:start + 64]])
            latents.append(ae.encode(torch.from_numpy(images)).numpy().astype(np.float16))
    latents = np.concatenate(latents)
    atomic_numpy_save(root / "labels.npy", labels.astype(np.int64))
    atomic_numpy_save(root / "latents.npy", latents)
    meta = dict(autoencoder=str(vae_path), describe=ae.describe(), scaling=ae.scaling_factor,
                shift=ae.shift_factor, resolution=DEMO_RESOLUTION, count=count,
                class_names=list(DEMO_CLASSES), source="train.py demo: procedural images")
    atomic_write_text(root / "meta.json", json.dumps(meta, indent=1))  # written last: marks the cache complete
    log(f"demo: encoded {count} synthetic {DEMO_RESOLUTION}px images into {root}, latents {latents.shape[1:]}")
    return root


def prepare_demo(args, rank, world, log):
    """Point args at a demo dataset and autoencoder (made by rank 0, cached under the run folder's parent)."""
    cache = Path(args.out).parent / "demo-cache"
    if args.vae is None:
        args.vae = str(cache / "random-kl-vae.safetensors")
        if rank == 0 and not Path(args.vae).exists():
            cache.mkdir(parents=True, exist_ok=True)
            save_autoencoder(random_demo_autoencoder(), args.vae)
    data = cache / f"data-{Path(args.vae).stem}"
    if rank == 0:
        log("demo: a smoke run of the whole pipeline on synthetic data with a small random autoencoder -- "
            "NOT a result. A real run: python autoencoder.py encode --vae VAE --images IMAGENET --out DATA "
            "--resolution 256, then torchrun --nproc_per_node=8 train.py --data DATA --out runs/x --lpl --vae VAE")
        build_demo_data(data, args.vae, args.demo_images, log)
    if world > 1:
        dist.barrier()
    args.data = str(data)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: plain tensors and dicts, written to a temporary file and renamed
# ----------------------------------------------------------------------------------------------------------------

def atomic_torch_save(obj, path):
    with atomic_output(path) as temporary:
        torch.save(obj, temporary)


def atomic_numpy_save(path, array):
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.save(file, array)


def atomic_write_text(path, text):
    with atomic_output(path) as temporary:
        Path(temporary).write_text(text)


def link_last(step_path, last_path):
    """last.pt -> the newest checkpoint, as a hard link renamed into place (a copy where links are refused)."""
    with atomic_output(last_path) as temporary:
        try:
            os.link(step_path, temporary)
        except OSError:
            shutil.copyfile(step_path, temporary)


def load_checkpoint(path, what):
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"train.py: {what} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # CPU first: never pile onto GPU 0
    except Exception as error:
        raise SystemExit(f"train.py: {what} {path} is not a readable checkpoint ({error})") from None
    for key in ("model", "ema", "model_config", "args", "step"):
        if key not in checkpoint:
            raise SystemExit(f"train.py: {what} {path} has no {key!r}: not a train.py checkpoint")
    return checkpoint


MUST_MATCH_ON_RESUME = ("model", "objective", "global_batch_size", "grad_accum", "seed", "lpl", "lpl_weight",
                        "lpl_threshold", "lpl_blocks", "lpl_norm", "lpl_mask", "lpl_depth_weights", "lpl_start",
                        "lpl_max_samples", "ema_decay", "lr", "weight_decay", "warmup_steps", "grad_clip", "flow_shift")


def check_resume_args(checkpoint, args, path):
    """A resume continues one run: the flags that define it must be the ones it was started with."""
    saved = checkpoint["args"]
    different = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {getattr(args, k)} (given)"
                 for k in MUST_MATCH_ON_RESUME if saved.get(k) != getattr(args, k)]
    if different:
        raise SystemExit(f"train.py: --resume {path} was trained with other settings: " + "; ".join(different))


# ----------------------------------------------------------------------------------------------------------------
# EMA, kept in float32: ema <- decay * ema + (1 - decay) * params
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, [p.float() for p in params], 1.0 - decay)


@torch.no_grad()
def weights_checksum(tensors):
    """An exact checksum of the bits of float tensors (as float32 viewed as int32, summed in int64): one ulp changed
    anywhere changes it. Compared across ranks at each checkpoint, it catches DDP replicas that drifted apart."""
    return int(sum(t.detach().float().contiguous().view(torch.int32).sum(dtype=torch.int64) for t in tensors))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.log = print if rank == 0 else (lambda *a, **k: None)
        self.out = Path(args.out)
        self.ckpt_dir = self.out / "checkpoints"
        if rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None

        resume = self.resolve_resume_path()
        self.data = LatentDataset(args.data)
        self.micro_batch = self.split_batch()
        self.model = self.build_model()
        self.ae = self.load_vae()
        self.diffusion = self.build_diffusion()
        self.lpl = self.build_lpl()

        self.ema = copy.deepcopy(self.model).float().requires_grad_(False).eval()
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           betas=(0.9, 0.999), fused=fused)
        self.sampler = EpochSampler(len(self.data), self.micro_batch, rank, world, args.seed)
        # Two generators per rank: times, label dropout and LPL sub-batches on the CPU (so the LPL gate needs no
        # host-device sync), noise on the device.
        self.cpu_generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
        self.noise_generator = torch.Generator(device).manual_seed(args.seed * 1000 + rank + 500)
        self.step = 0
        if resume:
            self.resume(resume)
        elif args.init_from:
            self.init_from(args.init_from)
        self.trim_log()

        self.train_model = self.model
        if args.compile:
            self.train_model = torch.compile(self.model)
        if world > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)

    # -- set-up ---------------------------------------------------------------------------------------------------

    def resolve_resume_path(self):
        if not self.args.resume:
            if (self.ckpt_dir / "last.pt").exists():
                raise SystemExit(f"train.py: {self.ckpt_dir / 'last.pt'} exists: continue that run with --resume last, "
                                 f"or start a new one in another --out (or remove {self.out})")
            return None
        if self.args.init_from:
            raise SystemExit("train.py: --resume and --init-from exclude each other (resume continues a run; "
                             "init-from starts a new one from its weights)")
        return self.ckpt_dir / "last.pt" if self.args.resume == "last" else Path(self.args.resume)

    def split_batch(self):
        args, per_step = self.args, self.world * self.args.grad_accum
        if args.global_batch_size % per_step:
            raise SystemExit(f"train.py: --global-batch-size {args.global_batch_size} is not divisible by "
                             f"{self.world} ranks x --grad-accum {args.grad_accum}")
        return args.global_batch_size // per_step

    def build_model(self):
        args, (channels, height, width) = self.args, self.data.latent_shape
        overrides = dict(input_size=height, in_channels=channels, gradient_checkpointing=args.checkpointing)
        if self.data.conditioning == "labels":
            overrides["num_classes"] = self.data.num_classes
        elif self.data.conditioning == "context":
            overrides["context_dim"] = self.data.context_shape[-1]
        patch = MODELS[args.model]["patch_size"]
        if height != width or height % patch:
            raise SystemExit(f"train.py: --data latents are {channels}x{height}x{width}; --model {args.model} needs "
                             f"square latents whose side is a multiple of its patch size {patch}")
        with torch.random.fork_rng(devices=[]):  # initial weights from --seed alone; the global RNG is left as it was
            torch.manual_seed(args.seed)
            model = build_model(args.model, **overrides)  # built on the CPU: the same weights on every device
        model = model.to(self.device)
        parameters = sum(p.numel() for p in model.parameters())
        self.log(f"model {args.model}: {parameters / 1e6:.1f}M parameters, latents {channels}x{height}x{width}, "
                 f"conditioning: {self.data.conditioning}")
        return model

    def load_vae(self):
        args = self.args
        if args.vae is None:
            return None
        dtype = torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32
        # The latents were scaled when they were encoded: LPL must unscale them the same way (meta.json).
        scaling, shift = self.data.meta.get("scaling"), self.data.meta.get("shift")
        if scaling is not None:
            self.log(f"latent scaling {scaling:g}, shift {shift or 0:g} from {Path(args.data) / 'meta.json'}")
        ae = load_autoencoder(args.vae, device=self.device, dtype=dtype, scaling_factor=scaling, shift_factor=shift,
                              verbose=self.rank == 0)
        channels = self.data.latent_shape[0]
        if ae.latent_channels != channels:
            raise SystemExit(f"train.py: --vae {args.vae} has {ae.latent_channels} latent channels, but the latents "
                             f"in --data {args.data} have {channels}")
        self.log(f"autoencoder: {ae.describe()} ({dtype})")
        return ae

    def build_diffusion(self):
        args = self.args
        shift = args.flow_shift if args.flow_shift is not None else self.data.resolution / 256
        diffusion = Diffusion(args.objective, shift=shift) if args.objective == "flow" else Diffusion(args.objective)
        self.log(f"diffusion: {diffusion}")
        return diffusion

    def build_lpl(self):
        args = self.args
        if not args.lpl:
            return None
        if args.lpl_blocks is None:
            args.lpl_blocks = min(5, self.ae.num_feature_blocks)
        if not 1 <= args.lpl_blocks <= self.ae.num_feature_blocks:
            raise SystemExit(f"train.py: --lpl-blocks must be in 1..{self.ae.num_feature_blocks} for --vae {args.vae} "
                             f"(its decoder has {self.ae.num_feature_blocks} feature taps), got {args.lpl_blocks}")
        if args.lpl_max_samples is not None and args.lpl_max_samples < 1:
            raise SystemExit(f"train.py: --lpl-max-samples must be at least 1, got {args.lpl_max_samples}")
        lpl = LatentPerceptualLoss(self.ae, n_blocks=args.lpl_blocks, threshold=args.lpl_threshold,
                                   norm=args.lpl_norm, mask_from=args.lpl_mask, depth_weights=args.lpl_depth_weights,
                                   checkpointing=args.lpl_checkpointing, max_samples=args.lpl_max_samples,
                                   channels_last=args.lpl_channels_last)
        tau = lpl.tau(self.data.resolution)
        self.log(f"LPL: w {args.lpl_weight}, {args.lpl_blocks} blocks, tau {tau:g} at {self.data.resolution}px, "
                 f"norm {args.lpl_norm}, mask from {args.lpl_mask}, from step {args.lpl_start}")
        return lpl

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def rng_state(self):
        return dict(cpu=self.cpu_generator.get_state(), noise=self.noise_generator.get_state())

    def save_checkpoint(self):
        """Every rank's RNG state and weights checksum are gathered; if all ranks hold the same model and EMA,
        rank 0 writes step-N.pt atomically and points last.pt at it."""
        model, ema = self.model.state_dict(), self.ema.state_dict()
        mine = dict(rng={k: v.cpu() for k, v in self.rng_state().items()},
                    checksum=weights_checksum([*model.values(), *ema.values()]))
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        checksums = [state["checksum"] for state in states]
        if len(set(checksums)) > 1:  # every rank sees the same list, so every rank stops
            raise SystemExit(f"train.py: at step {self.step} the ranks hold different weights (checksums {checksums}):"
                             f" the DDP replicas diverged; stopping without saving: {self.last_good_checkpoint()}")
        if self.rank == 0:
            checkpoint = dict(model=model, ema=ema, optimizer=self.optimizer.state_dict(), step=self.step,
                              args=vars(self.args), model_config=self.model.config,
                              diffusion=self.diffusion.config(), class_names=self.data.class_names,
                              rng=[state["rng"] for state in states], replica_checksums=checksums,
                              data=self.sampler.state_dict(), resolution=self.data.resolution,
                              latent_scaling=dict(scaling_factor=self.data.meta.get("scaling"),
                                                  shift_factor=self.data.meta.get("shift")))
            path = self.ckpt_dir / f"step-{self.step:07d}.pt"
            atomic_torch_save(checkpoint, path)
            link_last(path, self.ckpt_dir / "last.pt")
            self.log(f"saved {path}")
        if self.world > 1:
            dist.barrier()

    def last_good_checkpoint(self):
        last = self.ckpt_dir / "last.pt"
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    def resume(self, path):
        checkpoint = load_checkpoint(path, "--resume")
        check_resume_args(checkpoint, self.args, path)
        self.load_weights(checkpoint, path, "--resume")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if len(checkpoint["rng"]) != self.world:
            raise SystemExit(f"train.py: --resume {path} was written by {len(checkpoint['rng'])} ranks, this run has "
                             f"{self.world}: a bit-exact continuation needs the same number")
        self.cpu_generator.set_state(checkpoint["rng"][self.rank]["cpu"])
        self.noise_generator.set_state(checkpoint["rng"][self.rank]["noise"])
        self.sampler.load_state_dict(checkpoint["data"])
        self.step = checkpoint["step"]
        self.log(f"resumed from {path} at step {self.step}")

    def init_from(self, path):
        checkpoint = load_checkpoint(path, "--init-from")
        self.load_weights(checkpoint, path, "--init-from")
        saved = checkpoint["model_config"]
        self.log(f"initialised from {path} (step {checkpoint['step']}, latents {saved['input_size']}px -> "
                 f"{self.model.input_size}px; positional embedding recomputed for the new grid)")

    def load_weights(self, checkpoint, path, flag):
        saved, ours = checkpoint["model_config"], self.model.config
        keys = ("patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes", "context_dim")
        different = [f"{k} {saved.get(k)} (checkpoint) vs {ours[k]} (this run)" for k in keys if saved.get(k) != ours[k]]
        if different:
            raise SystemExit(f"train.py: {flag} {path} holds a different model (trained with --model "
                             f"{checkpoint['args'].get('model')}): " + "; ".join(different))
        self.model.load_state_dict(checkpoint["model"])
        self.ema.load_state_dict(checkpoint["ema"])

    def trim_log(self):
        """Keep the log lines up to this run's step: on resume, drop those a crashed run wrote after the
        checkpoint; on a fresh start in an old folder, drop the old run's."""
        path = self.out / "log.jsonl"
        if self.rank == 0 and path.exists():
            lines = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        lines.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line half-written by a killed run
            atomic_write_text(path, "".join(line + "\n" for line in lines))

    # -- one step -------------------------------------------------------------------------------------------------

    def next_batch(self):
        latents, condition = self.data.get(self.sampler.next_indices())
        z0 = latents.to(self.device, non_blocking=True)
        drop = torch.rand(len(latents), generator=self.cpu_generator) < CFG_DROPOUT
        if condition is None:
            return z0, {}
        if self.data.conditioning == "labels":
            condition = torch.where(drop, self.model.null_label, condition)
            return z0, dict(y=condition.to(self.device, non_blocking=True))
        condition = condition * (~drop).float()[:, None, None]  # the null text context is all zeros
        return z0, dict(context=condition.to(self.device, non_blocking=True))

    def lpl_active(self):
        return self.lpl is not None and self.step >= self.args.lpl_start

    def micro_step(self, sums):
        z0, condition = self.next_batch()
        t_cpu = self.diffusion.sample_t(len(z0), generator=self.cpu_generator)
        t = t_cpu.to(self.device, non_blocking=True)
        noise = torch.randn(z0.shape, generator=self.noise_generator, device=self.device)
        zt = self.diffusion.add_noise(z0, noise, t)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            prediction = self.train_model(zt, t, **condition).float()
            loss_diffusion = F.mse_loss(prediction, self.diffusion.target(z0, noise, t))
            loss = loss_diffusion
            if self.lpl_active():
                z0_hat = self.diffusion.x0_from_pred(zt, prediction, t)  # Table 1
                loss_lpl, lpl_stats = self.lpl(z0_hat, z0, self.diffusion.sigma_ratio(t_cpu),
                                               generator=self.cpu_generator)
                loss = loss + self.args.lpl_weight * loss_lpl  # L_tot = L_diff + w_LPL L_LPL
                sums["lpl"] += loss_lpl.detach()
                for name, value in lpl_stats.items():
                    sums[f"lpl_{name}"] = sums.get(f"lpl_{name}", 0) + value  # device tensors: no sync
        sums["diffusion"] += loss_diffusion.detach()
        sums["count"] += 1
        return loss

    def optimizer_step(self, sums):
        args = self.args
        for group in self.optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (self.step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.train_model.no_sync()
            with sync:
                loss = self.micro_step(sums)
                (loss / args.grad_accum).backward()
            # First non-finite step, kept on the device: checked at log and checkpoint time, no per-step sync.
            bad = ~torch.isfinite(loss.detach())
            sums["first_bad_step"] = torch.where(bad & (sums["first_bad_step"] < 0), self.step + 1,
                                                 sums["first_bad_step"])
        max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
        sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, args.ema_decay)
        self.step += 1

    # -- logging and previews -------------------------------------------------------------------------------------

    def new_sums(self):
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        return dict(diffusion=zero(), lpl=zero(), grad_norm=zero(), count=0,
                    first_bad_step=torch.full((), -1, device=self.device, dtype=torch.long))

    def check_finite(self, sums):
        """Stop at a non-finite loss before anything is written: the last good checkpoint stays intact."""
        bad = sums["first_bad_step"].clone()
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() >= 0:
            raise SystemExit(f"train.py: non-finite loss at step {bad.item()} (rank-max); stopping: "
                             f"{self.last_good_checkpoint()}")

    def write_log(self, sums, steps, seconds):
        """All-reduce the sums since the last log (the only sync point of the loop) and append one JSON line."""
        names = sorted(k for k, v in sums.items() if torch.is_tensor(v) and k != "first_bad_step")
        values = torch.stack([sums[k].float() for k in names])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        record = dict(step=self.step)
        for name, value in zip(names, values.tolist()):
            divisor = steps if name == "grad_norm" else sums["count"]
            record[name] = value / divisor
        record["loss"] = record["diffusion"] + (self.args.lpl_weight * record["lpl"] if self.lpl_active() else 0.0)
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["img_per_s"] = steps * self.args.global_batch_size / seconds
        if self.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    @torch.no_grad()
    def sample_grid(self):
        """16 samples of the EMA model, decoded, as OUT/samples/step-N.png (rank 0)."""
        if self.rank != 0 or self.ae is None:
            return
        generator = torch.Generator(self.device).manual_seed(self.args.seed)
        channels, height, width = self.data.latent_shape
        noise = torch.randn((16, channels, height, width), generator=generator, device=self.device)
        cond = null = None
        if self.data.conditioning == "labels":
            cond = torch.arange(16, device=self.device) % self.data.num_classes
            null = torch.full_like(cond, self.model.null_label)
        elif self.data.conditioning == "context":
            cond = self.data.get([i % self.data.count for i in range(16)])[1].to(self.device)  # the first contexts
            null = torch.zeros_like(cond)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            z0 = sample(mmdit_model_fn(self.ema), self.diffusion, noise, steps=50,
                        cfg_scale=default_cfg_scale(self.data.resolution) if cond is not None else 1.0,
                        cond=cond, null_cond=null)
            images = self.ae.decode(z0.to(next(self.ae.parameters()).dtype)).float()
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(latents_to_uint8(images), path)
        self.log(f"sample grid {path}")

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self):
        args = self.args
        if self.step >= args.steps:
            self.log(f"nothing to do: the checkpoint is at step {self.step}, --steps is {args.steps}")
            return
        self.log(f"training {args.steps - self.step} steps, global batch {args.global_batch_size} = {self.world} ranks"
                 f" x {self.micro_batch} x {args.grad_accum} accumulation; out {self.out}")
        progress = tqdm(total=args.steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True)
        sums, steps_since, started = self.new_sums(), 0, time.perf_counter()
        while self.step < args.steps:
            self.optimizer_step(sums)
            steps_since += 1
            progress.update(1)
            at_end = self.step == args.steps
            if self.step % args.log_every == 0 or at_end:
                self.check_finite(sums)
                record = self.write_log(sums, steps_since, time.perf_counter() - started)
                postfix = dict(loss=f"{record['diffusion']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                if self.lpl_active():
                    postfix["lpl"] = f"{record['lpl']:.4f}"
                progress.set_postfix(postfix)
                sums, steps_since, started = self.new_sums(), 0, time.perf_counter()
            if self.step % args.ckpt_every == 0 or at_end:
                self.check_finite(sums)
                self.save_checkpoint()
            if args.sample_every and (self.step % args.sample_every == 0 or at_end):
                self.sample_grid()
        progress.close()


def main(argv=None):
    args = parse_args(argv)
    demo = args.data is None
    args = fill_defaults(args)
    rank, world, device = setup_distributed()
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.vae_dtype is None:
        args.vae_dtype = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        if demo:
            prepare_demo(args, rank, world, log)
        Trainer(args, rank, world, device).train()
        if demo:
            log(f"demo finished: log {Path(args.out) / 'log.jsonl'}, grids {Path(args.out) / 'samples'}. "
                "This was a smoke run on synthetic data, not a result.")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
