"""Train an MMDiT on flat-file latents, with or without the Latent Perceptual Loss.

    python train.py --lpl                 # the demo: real photos through the real taef2 decoder (assets/), 2 CPU cores
    python train.py --data DATA --out runs/pre --model XL/2 --steps 600000                        # phase 1, no LPL
    torchrun --nproc_per_node=8 train.py --data DATA --out runs/post --model XL/2 --steps 200000 \\
        --init-from runs/pre/checkpoints/last.pt --lpl --vae sdxl_vae.safetensors      # phase 2 (Sec. 4.1, Table 4)
    torchrun --nproc_per_node=8 train.py ... --resume last           # continue a killed run bit-exactly (same flags)

DATA is a flat-file dataset (data.py holds its specification; `python data.py encode` writes one).

One optimiser step, for each micro-batch (Sec. 3.2; Table 1; Eq. 3):
    z_t = alpha_t z0 + sigma_t eps,  L_diff = ||D(z_t, t) - target||^2,  z0_hat = x0_from_pred(z_t, D, t)
    L_tot = L_diff + w_LPL * L_LPL(z0_hat, z0)                               (with --lpl, from --lpl-start on)
then gradient clipping, AdamW, and the EMA (float32).

Writes OUT/log.jsonl (one JSON line per log period: `loss` is always L_tot; with --val-data also one line per
evaluation and weight set, with "eval": "ema" | "raw"), OUT/checkpoints/step-NNNNNNN.pt and last.pt (atomically), and
sample grids from the EMA in OUT/samples/ when there is a decoder. OUT is locked while the run is alive.
"""

import argparse
import contextlib
import copy
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
from autoencoder import load_autoencoder
from lpl import DEPTH_WEIGHTS, MASK_SOURCES, NORMS, LatentPerceptualLoss
from model import FILE_FORMATS, MODELS, backbone_diffusion, build_from_config, build_model, load_backbone
from runtime import (UserError, append_jsonl, load_checkpoint, one_line_errors, run_folder, save_checkpoint,
                     setup_distributed, trim_jsonl)
from sample import mmdit_model_fn, null_condition, preview_images, save_grid
from schedules import OBJECTIVES, Diffusion, split_variance
from validation import VAL_LEVELS, evaluate

CFG_DROPOUT = 0.1  # fraction of labels / contexts replaced by the null condition (classifier-free guidance)
EMA_WARMUP = 10  # a fresh run's EMA decay at step k is min(decay, (1 + k) / (EMA_WARMUP + k)): short runs get one
RESUME_MUST_MATCH = ("model", "backbone", "objective", "global_batch_size", "grad_accum", "seed", "lpl", "lpl_weight",
                     "lpl_threshold", "lpl_blocks", "lpl_norm", "lpl_mask", "lpl_depth_weights", "lpl_start",
                     "lpl_max_samples", "ema_decay", "lr", "weight_decay", "warmup_steps", "grad_clip", "flow_shift")
DEMO = dict(model="demo", steps=600, global_batch_size=32, lr=1e-3, lpl_start=400, ckpt_every=300, log_every=20,
            eval_every=600, val_samples=64)  # python train.py [--lpl]: ~3.5 minutes on 2 CPU cores
REAL = dict(model="XL/2", steps=400_000, global_batch_size=256, lr=1e-4, lpl_start=0, ckpt_every=50_000,
            log_every=100, eval_every=None, val_samples=256)


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss, DDP replicas that diverged); the last good checkpoint stays."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments: the defaults are the paper's settings
# ----------------------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    demo, real = "demo", "real run"  # defaults that differ between the two are in DEMO and REAL
    p.add_argument("--data", help="flat-file dataset (data.py); absent: the demo on the bundled photos")
    p.add_argument("--out", help="run folder (demo: runs/demo)")
    p.add_argument("--model", choices=list(MODELS), help=f"MMDiT size ({real} XL/2, {demo} demo)")
    p.add_argument("--steps", type=int, help=f"optimiser steps ({real} 400000, {demo} 600)")
    p.add_argument("--global-batch-size", type=int, help=f"over all ranks ({real} 256, {demo} 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate ({real} 1e-4 as DiT, {demo} 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="DDPM-eps, DDPM-v or Flow-OT (Table 1; default eps, or the backbone's)")
    p.add_argument("--flow-shift", type=float, help="flow: shift s of the training times (default resolution/256)")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, data order, times, noise")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="autocast of the MMDiT (default bf16 on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the MMDiT")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the MMDiT blocks")
    g = p.add_argument_group("LPL (Sec. 3.2, 4.1, 4.3)")
    g.add_argument("--lpl", action="store_true", help="add the latent perceptual loss")
    g.add_argument("--vae", help="autoencoder: LPL's decoder, the sample grids, validation (demo: assets/taef2)")
    g.add_argument("--vae-dtype", choices=("bf16", "fp32"), help="decoder dtype (default bf16 on GPU; never fp16)")
    g.add_argument("--lpl-weight", type=float, default=3.0, help="w_LPL (Fig. 9: best near 3)")
    g.add_argument("--lpl-threshold", type=float, default=4.0,
                   help="tau in sigma/alpha units at 256 px, scaled by resolution/256 (Fig. 6: best 3-6)")
    g.add_argument("--lpl-blocks", type=int, help="decoder taps (Fig. 7; default: 5, or all a smaller decoder has)")
    g.add_argument("--lpl-norm", choices=NORMS, default="shared", help="feature normalisation (Sec. 3.2, 4.3)")
    g.add_argument("--lpl-mask", choices=MASK_SOURCES, default="prediction",
                   help="features the outlier mask is computed from (Eq. 3: the prediction's)")
    g.add_argument("--lpl-depth-weights", choices=DEPTH_WEIGHTS, default="resolution",
                   help="omega_l = r_1/r_l, or 1 for every layer (ablation)")
    g.add_argument("--lpl-start", type=int, help=f"step at which LPL switches on (Table 4; {real} 0, {demo} 400)")
    g.add_argument("--lpl-max-samples", type=int, help="per rank: LPL on at most this many gated samples (unbiased)")
    g.add_argument("--lpl-checkpointing", action="store_true", help="activation checkpointing of the decoder")
    g.add_argument("--lpl-compile", action="store_true", help="torch.compile the decoder (dynamic gated batch)")
    g = p.add_argument_group("EMA, checkpoints, logs, validation")
    g.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay (Fig. 10: 0.9999 without LPL, 0.99975 with it), warmed up over the first steps")
    g.add_argument("--ckpt-every", type=int, help=f"checkpoint period ({real} 50000, {demo} 300)")
    g.add_argument("--log-every", type=int, help=f"log period ({real} 100, {demo} 20)")
    g.add_argument("--sample-every", type=int, help="sample-grid period (default --ckpt-every; 0: none)")
    g.add_argument("--resume", help="checkpoint to continue bit-exactly ('last': OUT/checkpoints/last.pt)")
    g.add_argument("--init-from", help="checkpoint whose weights (model and EMA) start a new run; any resolution")
    g.add_argument("--backbone", choices=FILE_FORMATS,
                   help="--init-from is a released DiT / SiT / REPA checkpoint (model.load_backbone): the model and "
                        "the process it was trained on come from it")
    g.add_argument("--val-data", help="flat-file validation set (demo: the held-out photos)")
    g.add_argument("--eval-every", type=int, help="validation period (default --ckpt-every; demo 600)")
    g.add_argument("--val-samples", type=int, help=f"validation rows used, the first ones ({real} 256, {demo} 64)")
    g.add_argument("--val-draws", type=int, default=1, help="noise draws per validation row and level")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    """Defaults that depend on demo vs real run, then every flag check that needs no file read."""
    demo, defaults = args.data is None, vars(parse_args([]))
    lpl_flags = [f"--{k.replace('_', '-')}" for k in defaults if k.startswith("lpl_") and getattr(args, k) != defaults[k]]
    if not args.lpl and lpl_flags:
        raise UserError(f"{', '.join(lpl_flags)} given without --lpl: they would do nothing")
    if args.backbone and not args.init_from:
        raise UserError(f"--backbone {args.backbone} says what --init-from holds: give --init-from FILE, the released "
                        "checkpoint")
    if args.backbone and args.model:
        raise UserError(f"--model {args.model}: with --backbone the model's size comes from --init-from's file")
    for name, value in (DEMO if demo else REAL).items():
        leave_model = name == "model" and (args.backbone or args.resume)  # the file's, or the checkpoint's
        if getattr(args, name) is None and not leave_model:
            setattr(args, name, value)
    backbone = args.backbone or MODELS.get(args.model or "", {}).get("backbone")  # DiT-XL/2 etc. name one too
    backbone = "dit" if backbone == "diffusers-dit" else backbone  # a file format of DiT's weights
    if backbone:
        objective = backbone_diffusion(backbone).objective
        if args.objective not in (None, objective) or args.flow_shift is not None:
            raise UserError(f"--objective / --flow-shift: a {backbone} model is trained as it was, {objective} "
                            "(model.backbone_diffusion)")
        args.objective = objective
    elif not args.resume:
        args.objective = args.objective or "eps"
    if demo:
        args.out = args.out or "runs/demo"
        args.vae = args.vae or str(data.DEMO_VAE)
    if args.out is None:
        raise UserError("--out DIR is required with --data (checkpoints go to DIR/checkpoints)")
    args.sample_every = args.ckpt_every if args.sample_every is None else args.sample_every
    args.eval_every = args.eval_every or args.ckpt_every
    for flag in ("steps", "global_batch_size", "grad_accum", "ckpt_every", "log_every", "eval_every", "val_samples",
                 "val_draws"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.sample_every < 0 or args.lpl_start < 0:
        raise UserError("--sample-every and --lpl-start must be >= 0")
    if args.lpl and args.vae is None:
        raise UserError("--lpl needs --vae PATH, the autoencoder whose decoder defines the loss")
    if args.resume and args.init_from:
        raise UserError("--resume and --init-from exclude each other (resume continues a run; init-from starts a "
                        "new one)")
    return args


def started_as(args, checkpoint):
    """On resume: the model, backbone, objective and --init-from the run was started with, unless given again."""
    for name in ("model", "backbone", "objective", "init_from"):
        if getattr(args, name) is None:
            setattr(args, name, checkpoint["args"].get(name, "eps" if name == "objective" else None))


def check_resume_args(checkpoint, args, path):
    """A resume continues one run: the flags that define it must be the ones it was started with."""
    saved, shown = checkpoint["args"], lambda v: "default" if v is None else v
    different = [f"--{k.replace('_', '-')} {shown(saved.get(k))} (checkpoint) vs {shown(getattr(args, k))} (given)"
                 for k in RESUME_MUST_MATCH if saved.get(k) != getattr(args, k)]
    if different:
        raise UserError(f"--resume {path} was trained with other settings: " + "; ".join(different))


# ----------------------------------------------------------------------------------------------------------------
# The optimiser, the learning rate, the EMA, and the weights checksum that compares DDP replicas
# ----------------------------------------------------------------------------------------------------------------

def build_optimizer(model, lr, weight_decay, device):
    """AdamW over every weight of the MMDiT, betas (0.9, 0.999) as DiT; fused kernels on CUDA."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999),
                             fused=torch.device(device).type == "cuda")


def learning_rate(step, lr, warmup_steps):
    """The learning rate of optimiser step `step` (0-based): a linear warm-up over warmup_steps, then constant."""
    if warmup_steps == 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup_steps)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * params, in float32."""
    torch._foreach_lerp_(list(ema.parameters()), [p.float() for p in model.parameters()], 1.0 - decay)


def warmed_up(decay, step):
    """The EMA decay at step `step` of a fresh run: at most (1 + step) / (EMA_WARMUP + step), so the EMA of a short run
    is an average of its recent weights rather than its initialisation (an EMA loaded by --init-from is not warmed)."""
    return min(decay, (1 + step) / (EMA_WARMUP + step))


@torch.no_grad()
def weights_checksum(tensors):
    """An exact checksum of the bits of float tensors (as float32 viewed as int32, summed in int64): one ulp changed
    anywhere changes it. Compared across ranks at each checkpoint, it catches DDP replicas that drifted apart."""
    return int(sum(t.detach().float().contiguous().view(torch.int32).sum(dtype=torch.int64) for t in tensors))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

class Trainer:
    """Everything one rank holds. The public surface: train_step(next_batches()) -> stats, state_dict() /
    load_state_dict() (exact resume), validate(), sample_grid(), train() (the loop)."""

    def __init__(self, args, rank, world, device, resume=None):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        if resume is not None:
            started_as(args, resume)
        self.log = print if rank == 0 else (lambda *a, **k: None)
        self.out, self.autocast_dtype = Path(args.out), torch.bfloat16 if args.precision == "bf16" else None
        self.data = data.LatentDataset(args.data)
        self.val = data.LatentDataset(args.val_data, "--val-data") if args.val_data else None
        if args.global_batch_size % (world * args.grad_accum):
            raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} ranks x "
                            f"--grad-accum {args.grad_accum}")
        self.micro_batch = args.global_batch_size // (world * args.grad_accum)
        self.sampler = data.EpochSampler(len(self.data), self.micro_batch, rank, world, args.seed)
        self.ae = self.load_vae()
        self.lpl = self.build_lpl()
        self.model = self.build_model(resume)
        self.diffusion = self.build_diffusion()
        self.ema = copy.deepcopy(self.model).float().requires_grad_(False).eval()
        self.optimizer = build_optimizer(self.model, args.lr, args.weight_decay, device)
        # Per rank: times, label dropout and LPL sub-batches on a CPU generator (the LPL gate needs no host-device
        # sync), noise on a device generator. Validation and sample grids use generators of their own.
        self.cpu_generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
        self.noise_generator = torch.Generator(device).manual_seed(args.seed * 1000 + rank + 500)
        self.step = 0
        if resume is not None:
            self.load_state_dict(resume)
            self.log(f"resumed from {args.resume} at step {self.step}")
        elif args.init_from and not args.backbone:
            self.load_weights(load_checkpoint(args.init_from, "--init-from"), "--init-from")
            self.log(f"initialised from {args.init_from}: model and EMA weights (positional embedding for this grid)")
        self.train_model = torch.compile(self.model) if args.compile else self.model
        if world > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
        self.model_fn = mmdit_model_fn(self.model, forward=self.train_model)  # (x, t, condition) -> prediction

    # -- set-up ---------------------------------------------------------------------------------------------------

    def load_vae(self):
        args = self.args
        if args.vae is None:
            return None
        dtype = torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32
        # The latents were scaled when they were encoded: LPL and decoding must unscale them the same way.
        try:
            ae = load_autoencoder(args.vae, device=self.device, dtype=dtype, **self.data.latent_scaling,
                                  verbose=self.rank == 0)
        except (ValueError, FileNotFoundError) as error:
            raise UserError(f"--vae {args.vae}: {error}") from None
        if ae.latent_channels != self.data.latent_shape[0]:
            raise UserError(f"--vae {args.vae} has {ae.latent_channels} latent channels, but the latents in --data "
                            f"{args.data} have {self.data.latent_shape[0]}")
        self.log(f"autoencoder: {ae.describe()} ({dtype}); latent scale and shift from {args.data}/meta.json")
        return ae

    def build_lpl(self):
        args = self.args
        if not args.lpl:
            return None
        try:
            lpl = LatentPerceptualLoss(self.ae, n_blocks=args.lpl_blocks, threshold=args.lpl_threshold,
                                       norm=args.lpl_norm, mask_from=args.lpl_mask,
                                       depth_weights=args.lpl_depth_weights, checkpointing=args.lpl_checkpointing,
                                       max_samples=args.lpl_max_samples, compile=args.lpl_compile)
        except ValueError as error:  # lpl.py names its argument; say which flag it came from
            flag = dict(n_blocks="blocks", threshold="threshold", max_samples="max-samples").get(str(error).split()[0])
            if flag is None:
                raise UserError(f"--lpl: {error}") from None
            raise UserError(f"--lpl-{flag} {getattr(args, 'lpl_' + flag.replace('-', '_'))}: {error}") from None
        self.log(f"LPL: w {args.lpl_weight}, {lpl.n_blocks} blocks, tau {lpl.tau(self.data.resolution):g} at "
                 f"{self.data.resolution}px, norm {args.lpl_norm}, mask from {args.lpl_mask}, from step {args.lpl_start}")
        return lpl

    def build_model(self, resume):
        """The network: a released DiT / SiT / REPA file (--backbone), the layout of a resumed checkpoint, or the
        named --model with initial weights from --seed."""
        args, (channels, height, width) = self.args, self.data.latent_shape
        if args.backbone and resume is None:
            model, _ = load_backbone(args.init_from, args.backbone, log=self.log)
        elif resume is not None and "backbone" in resume["model_config"]:
            model = build_from_config(resume["model_config"])
        else:
            model = self.named_model()
        fits = (model.in_channels, model.input_size, model.num_classes) == (channels, height, self.data.num_classes)
        if not fits:
            raise UserError(f"the model takes {model.in_channels}x{model.input_size}x{model.input_size} latents of "
                            f"{model.num_classes} classes; --data {args.data} has {channels}x{height}x{width} "
                            f"latents of {self.data.num_classes} classes")
        model.gradient_checkpointing = args.checkpointing
        return model.to(self.device)

    def build_diffusion(self):
        """The process: a DiT / SiT / REPA model's own (model.backbone_diffusion), else --objective's, Flow-OT with
        the resolution shift (--flow-shift, default resolution / 256)."""
        args = self.args
        if getattr(self.model, "backbone", None):
            return backbone_diffusion(self.model.backbone)
        if args.objective == "flow":
            return Diffusion("flow", shift=args.flow_shift if args.flow_shift is not None else self.data.resolution / 256)
        return Diffusion(args.objective)

    def named_model(self):
        args, (channels, height, width) = self.args, self.data.latent_shape
        overrides = dict(input_size=height, in_channels=channels, gradient_checkpointing=args.checkpointing)
        if self.data.conditioning == "labels":
            overrides["num_classes"] = self.data.num_classes
        elif self.data.conditioning == "context":
            overrides["context_dim"] = self.data.context_shape[-1]
        patch = MODELS[args.model]["patch_size"]
        if height != width or height % patch:
            raise UserError(f"--data latents are {channels}x{height}x{width}; --model {args.model} needs square "
                            f"latents whose side is a multiple of its patch size {patch}")
        with torch.random.fork_rng(devices=[]):  # initial weights from --seed alone; the global RNG is left as it was
            torch.manual_seed(args.seed)
            try:
                model = build_model(args.model, **overrides)  # built on the CPU: the same weights on every device
            except ValueError as error:
                raise UserError(f"--model {args.model}: {error}") from None
        self.log(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, latents "
                 f"{channels}x{height}x{width}, conditioning: {self.data.conditioning}")
        return model

    # -- state: weights, optimiser, step, RNG streams, data position ----------------------------------------------

    def state_dict(self):
        """This rank's complete state; save_checkpoint gathers every rank's RNG streams into one checkpoint."""
        return dict(model=self.model.state_dict(), ema=self.ema.state_dict(), optimizer=self.optimizer.state_dict(),
                    step=self.step, rng=dict(cpu=self.cpu_generator.get_state(),
                                             noise=self.noise_generator.get_state().cpu()),
                    data=self.sampler.state_dict())

    def load_state_dict(self, checkpoint):
        self.load_weights(checkpoint, "--resume")
        if getattr(self.model, "backbone", None):
            self.model.unused = dict(checkpoint.get("backbone_unused") or {})
            self.model.source_keys = checkpoint.get("backbone_keys")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if len(checkpoint["rng"]) != self.world:
            raise UserError(f"--resume was written by {len(checkpoint['rng'])} ranks, this run has {self.world}: a "
                            "bit-exact continuation needs the same number")
        self.cpu_generator.set_state(checkpoint["rng"][self.rank]["cpu"])
        self.noise_generator.set_state(checkpoint["rng"][self.rank]["noise"])
        self.sampler.load_state_dict(checkpoint["data"])
        self.step = checkpoint["step"]

    def load_weights(self, checkpoint, flag):
        saved, ours = checkpoint["model_config"], self.model.config
        different = [f"{k} {saved.get(k)} (checkpoint) vs {v} (this run)" for k, v in ours.items()
                     if k not in ("input_size", "gradient_checkpointing") and saved.get(k) != v]
        if different:
            raise UserError(f"{flag} holds a different model (trained with --model "
                            f"{checkpoint['args'].get('model')}): " + "; ".join(different))
        self.model.load_state_dict(checkpoint["model"])
        self.ema.load_state_dict(checkpoint["ema"])

    def save_checkpoint(self):
        """Every rank's RNG state and weights checksum are gathered; if all ranks hold the same model and EMA,
        rank 0 writes step-N.pt atomically and points last.pt at it."""
        state = self.state_dict()
        mine = dict(rng=state["rng"], checksum=weights_checksum([*state["model"].values(), *state["ema"].values()]))
        states = [mine]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, mine)
        checksums = [s["checksum"] for s in states]
        if len(set(checksums)) > 1:  # every rank sees the same list, so every rank stops
            raise TrainingStopped(f"at step {self.step} the ranks hold different weights (checksums {checksums}): the "
                                  f"DDP replicas diverged; stopping without saving: {self.last_good_checkpoint()}")
        if self.rank == 0:
            state.update(rng=[s["rng"] for s in states], replica_checksums=checksums, args=vars(self.args),
                         model_config=self.model.config, diffusion=self.diffusion.config(),
                         class_names=self.data.class_names, resolution=self.data.resolution,
                         latent_scaling=self.data.latent_scaling)
            if getattr(self.model, "backbone", None):  # what `python model.py export` gives back (REPA's projectors)
                state.update(backbone_unused=self.model.unused, backbone_keys=self.model.source_keys)
            self.log(f"saved {save_checkpoint(state, self.out / 'checkpoints', self.step)}")
        if self.world > 1:
            dist.barrier()

    def last_good_checkpoint(self):
        last = self.out / "checkpoints" / "last.pt"
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    # -- one optimiser step ---------------------------------------------------------------------------------------

    def next_batches(self):
        """grad_accum micro-batches: latents, condition (10% replaced by the null condition), t (CPU), noise."""
        batches = []
        for _ in range(self.args.grad_accum):
            indices = self.sampler.next_indices()
            latents, condition = self.data.get(indices)
            drop = torch.rand(len(latents), generator=self.cpu_generator) < CFG_DROPOUT
            if condition is not None:
                null = null_condition(self.model, condition)
                condition = torch.where(drop.view(-1, *[1] * (condition.dim() - 1)), null, condition)
                condition = condition.to(self.device, non_blocking=True)
            t = self.diffusion.sample_t(len(latents), generator=self.cpu_generator)
            z0 = latents.to(self.device, non_blocking=True)
            if self.data.posterior_std:  # z0 ~ N(mean, std^2), a fresh sample of the posterior each time (DiT)
                std = self.data.get_std(indices).to(self.device, non_blocking=True)
                z0 = z0 + std * torch.randn(z0.shape, generator=self.noise_generator, device=self.device)
            noise = torch.randn(z0.shape, generator=self.noise_generator, device=self.device)
            batches.append(dict(z0=z0, condition=condition, t=t, noise=noise))
        return batches

    def lpl_active(self):
        return self.lpl is not None and self.step >= self.args.lpl_start

    def losses(self, z0, condition, t, noise):
        """(L_tot, stats) of one micro-batch."""
        t_device = t.to(self.device, non_blocking=True)
        zt = self.diffusion.add_noise(z0, noise, t_device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            prediction, variance = split_variance(self.model_fn(zt, t_device, condition).float(), z0.shape[1])
            loss_diffusion = F.mse_loss(prediction, self.diffusion.target(z0, noise, t_device))
            stats = dict(diffusion=loss_diffusion.detach())
            if variance is not None:  # DiT's learned variance: Improved DDPM's hybrid loss, the mean's gradient stopped
                loss_vb = self.diffusion.variational_bound(z0, zt, t, prediction.detach(), variance).mean()
                loss_diffusion = loss_diffusion + loss_vb
                stats.update(diffusion=loss_diffusion.detach(), vb=loss_vb.detach())
            if not self.lpl_active():
                return loss_diffusion, stats
            z0_hat = self.diffusion.x0_from_pred(zt, prediction, t_device)  # Table 1
            loss_lpl, lpl_stats = self.lpl(z0_hat, z0, self.diffusion.sigma_ratio(t), generator=self.cpu_generator)
        stats.update(lpl=loss_lpl.detach(), **{f"lpl_{k}": v for k, v in lpl_stats.items()})
        return loss_diffusion + self.args.lpl_weight * loss_lpl, stats  # L_tot = L_diff + w_LPL L_LPL

    def train_step(self, batches):
        """One optimiser step over the micro-batches -> stats as device tensors (no host-device sync)."""
        args, totals = self.args, {}
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, args.lr, args.warmup_steps)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last or self.world == 1 else self.train_model.no_sync():
                loss, stats = self.losses(**batch)
                (loss / len(batches)).backward()
            stats["loss"] = loss.detach()
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + value / len(batches)
        max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, args.ema_decay if args.init_from else warmed_up(args.ema_decay, self.step))
        self.step += 1
        return totals

    # -- logs, validation, sample grids ---------------------------------------------------------------------------

    def write_log(self, sums, steps, seconds):
        """All-reduce the means since the last log (the loop's only sync point) and append one JSON line. A
        non-finite loss stops the run here, before anything is written: the last good checkpoint stays intact."""
        names = sorted(sums)
        values = torch.stack([sums[k].float() / steps for k in names])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        record = dict(step=self.step, **dict(zip(names, values.tolist())))
        if not math.isfinite(record["loss"]):
            raise TrainingStopped(f"non-finite loss in steps {self.step - steps + 1}..{self.step}; stopping: "
                                  f"{self.last_good_checkpoint()}")
        record.update(lr=self.optimizer.param_groups[0]["lr"],
                      img_per_s=steps * self.args.global_batch_size / seconds)
        if self.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.append_log(record)
        return record

    def append_log(self, record):
        if self.rank == 0:
            append_jsonl(self.out / "log.jsonl", record)

    def validate(self):
        """Rank 0 evaluates the EMA and the raw weights on --val-data (evaluate); the other ranks wait."""
        if self.rank == 0:
            for name, model in (("ema", self.ema), ("raw", self.model)):
                figures = evaluate(model.eval(), self.diffusion, self.val, self.ae, self.lpl,
                                   count=self.args.val_samples, draws=self.args.val_draws,
                                   batch_size=self.micro_batch, seed=self.args.seed, device=self.device,
                                   autocast_dtype=self.autocast_dtype)
                self.model.train()
                self.append_log(dict(step=self.step, eval=name, **figures))
                near = min(range(len(VAL_LEVELS)), key=lambda i: abs(VAL_LEVELS[i] - 1))
                decoded = f", PSNR {figures['psnr'][near]:.2f} dB, HF error {figures['hf_error'][near]:.3f}" \
                    if "psnr" in figures else ""
                self.log(f"validation ({name}) at step {self.step}, sigma/alpha 1: diffusion loss "
                         f"{figures['diffusion'][near]:.4f}{decoded}")
        if self.world > 1:
            dist.barrier()

    def sample_grid(self):
        """16 samples of the EMA (conditions: the first rows of --data) as OUT/samples/step-N.png, on rank 0."""
        if self.rank != 0 or self.ae is None:
            return
        conditions = None
        if self.data.conditioning != "none":
            conditions = self.data.get([i % self.data.count for i in range(16)])[1]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            images = preview_images(self.ema, self.diffusion, self.ae, self.data.latent_shape, conditions,
                                    self.args.seed, self.device)
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        save_grid(images, path)
        self.log(f"sample grid {path}")

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self):
        args = self.args
        if self.rank == 0:  # on resume, drop the lines a crashed run wrote after the checkpoint; fresh: all
            trim_jsonl(self.out / "log.jsonl", self.step)
        if self.step >= args.steps:
            self.log(f"nothing to do: the checkpoint is at step {self.step}, --steps is {args.steps}")
            return
        self.log(f"training {args.steps - self.step} steps, global batch {args.global_batch_size} = {self.world} ranks"
                 f" x {self.micro_batch} x {args.grad_accum} accumulation; out {self.out}")
        progress = tqdm(total=args.steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True)
        sums, steps, started = {}, 0, time.perf_counter()
        while self.step < args.steps:
            lpl_was_active = self.lpl_active()
            for name, value in self.train_step(self.next_batches()).items():
                sums[name] = sums.get(name, 0) + value  # device tensors: no sync
            steps += 1
            progress.update(1)
            at_end, step = self.step == args.steps, self.step
            evaluate_now = self.val is not None and (step % args.eval_every == 0 or at_end)
            save_now = step % args.ckpt_every == 0 or at_end
            grid_now = args.sample_every and (step % args.sample_every == 0 or at_end)
            # a log before anything is written or evaluated: it stops the run at a non-finite loss
            if step % args.log_every == 0 or at_end or save_now or evaluate_now or lpl_was_active != self.lpl_active():
                record = self.write_log(sums, steps, time.perf_counter() - started)
                progress.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "diffusion", "lpl") if k in record})
                sums, steps, started = {}, 0, time.perf_counter()
            if evaluate_now:
                self.validate()
            if save_now:
                self.save_checkpoint()
            if grid_now:
                self.sample_grid()
        progress.close()



def main(argv=None):
    """The command line: a bad flag or file, or a run that had to stop, is one line `error: ...`, no traceback."""
    with one_line_errors(also=(TrainingStopped,)):
        run(check_args(parse_args(argv)))


def run(args):
    """Loads what a resume needs, starts the processes, makes the demo data if asked, trains in a locked folder."""
    resume = None
    if args.resume:
        path = Path(args.out) / "checkpoints" / "last.pt" if args.resume == "last" else Path(args.resume)
        resume = load_checkpoint(path, "--resume", mmap=True)
        started_as(args, resume)
        check_resume_args(resume, args, path)
    elif (Path(args.out) / "checkpoints" / "last.pt").exists():
        raise UserError(f"{args.out}/checkpoints/last.pt exists: continue that run with --resume last, or start a "
                        f"new one in another --out (or remove {args.out})")
    rank, world, device = setup_distributed()
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.vae_dtype = args.vae_dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    demo = args.data is None
    try:
        if demo:  # rank 0 builds (or reuses) the datasets from assets/, the others wait
            cache = Path(args.out).parent / "demo-cache"
            if rank == 0:
                data.build_demo_data(cache)
            if world > 1:
                dist.barrier()
            args.data, args.val_data = str(cache / "train"), args.val_data or str(cache / "val")
        with run_folder(args.out, rank):
            Trainer(args, rank, world, device, resume).train()
        if demo and rank == 0:
            print(f"demo finished: {args.out}/log.jsonl (validation lines: \"eval\"), {args.out}/samples/. A toy run "
                  "with a real decoder, not a result: README.md, 'The demo' and 'Evidence'")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
