"""Train an MMDiT on flat-file latents, with or without the Latent Perceptual Loss.

    python train.py --lpl                 # the demo: real photos through the real taef2 decoder (assets/), 2 CPU cores
    python train.py --data DATA --out runs/pre --model XL/2 --steps 600000                        # phase 1, no LPL
    torchrun --nproc_per_node=8 train.py --data DATA --out runs/post --model XL/2 --steps 200000 \\
        --init-from runs/pre/checkpoints/last.pt --lpl --vae sdxl_vae.safetensors      # phase 2 (Sec. 4.1, Table 4)
    torchrun --nproc_per_node=8 train.py ... --resume last           # continue a killed run bit-exactly (same flags)

DATA is a flat-file dataset (data.py holds its specification; `python data.py encode` writes one). The flags and
their checks are in train_args.py.

One optimiser step, for each micro-batch (Sec. 3.2; Table 1; Eq. 3):
    z_t = alpha_t z0 + sigma_t eps,  L_diff = ||D(z_t, t) - target||^2,  z0_hat = x0_from_pred(z_t, D, t)
    L_tot = L_diff + w_LPL * L_LPL(z0_hat, z0)                               (with --lpl, from --lpl-start on)
then gradient clipping, AdamW, and the EMA (float32).

Writes OUT/log.jsonl (one JSON line per log period: `loss` is always L_tot; with --val-data also one line per
evaluation and weight set, with "eval": "ema" | "raw"), OUT/checkpoints/step-NNNNNNN.pt and last.pt (atomically), and
sample grids from the EMA in OUT/samples/ when there is a decoder. OUT is locked while the run is alive.
"""

import contextlib
import copy
import itertools
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import train_args
from autoencoder import load_autoencoder
from lpl import LatentPerceptualLoss
from model import MODELS, backbone_diffusion, build_from_config, build_model, load_backbone
from plot import plot_curves
from runtime import (EXIT_STOPPED, StopSignals, UserError, append_jsonl, load_checkpoint, one_line_errors,
                     remove_stale_temporaries, run_folder, save_checkpoint, setup_distributed, trim_jsonl, wall_clock,
                     write_json)
from sample import mmdit_model_fn, preview_images, save_grid
from schedules import Diffusion, split_variance
from train_args import check_args, check_resume_args, started_as
from validation import VAL_LEVELS, evaluate

CFG_DROPOUT = 0.1  # fraction of labels / contexts replaced by the null condition (classifier-free guidance)
EMA_WARMUP = 10  # a fresh run's EMA decay at step k is min(decay, (1 + k) / (EMA_WARMUP + k)): short runs get one


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss, DDP replicas that diverged); the last good checkpoint stays."""


class StoppedBySignal(Exception):
    """A cluster's signal stopped the run after saving the checkpoint of step `args[0]`: exit with EXIT_STOPPED."""


def build_parser():
    """The flags (train_args.py: defaults are the paper's settings), with this docstring heading --help."""
    return train_args.build_parser(description=__doc__)


def parse_args(argv=None):
    return build_parser().parse_args(argv)


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
        self.log = (lambda message: print(f"{wall_clock()} {message}", flush=True)) if rank == 0 else \
            (lambda message: None)
        self.out, self.autocast_dtype = Path(args.out), torch.bfloat16 if args.precision == "bf16" else None
        self.data = data.LatentDataset(args.data)
        self.val = data.LatentDataset(args.val_data, "--val-data") if args.val_data else None
        if args.global_batch_size % (world * args.grad_accum):
            raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} ranks x "
                            f"--grad-accum {args.grad_accum}")
        self.micro_batch = args.global_batch_size // (world * args.grad_accum)
        excluded = set(resume.get("excluded_rows", [])) if resume is not None else set()  # they accumulate
        if args.exclude_rows:
            excluded |= data.read_rows(args.exclude_rows, len(self.data), "--exclude-rows")
        self.sampler = data.EpochSampler(len(self.data), self.micro_batch, rank, world, args.seed, excluded)
        self.data_position = self.sampler.state_dict()  # of the batches consumed (the prefetch thread runs ahead)
        self.ae = self.load_vae()
        self.lpl = self.build_lpl()
        self.model = self.build_model(resume)
        self.diffusion = self.build_diffusion()
        self.ema = copy.deepcopy(self.model).float().requires_grad_(False).eval()
        self.optimizer = build_optimizer(self.model, args.lr, args.weight_decay, device)
        self.batches = data.StepBatches(self.data, self.sampler, self.diffusion, args.seed, args.grad_accum,
                                        CFG_DROPOUT, choose=self.lpl_sub_batch if self.lpl is not None else None)
        self.step = 0
        self.period = []  # (step, rows) of every micro-batch since the last log
        self.cpu_group = dist.new_group(backend="gloo") if world > 1 else None  # the stop flag's all_reduce
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
        if self.val is not None:
            self.check_validation_set()

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

    def check_validation_set(self):
        """Everything validation needs, before step 1 (not after a checkpoint period of days): its rows are the
        training rows' kind, and one of them runs through evaluate on rank 0."""
        val, ours = self.val, self.data
        if (val.latent_shape, val.conditioning, val.class_names) != (ours.latent_shape, ours.conditioning,
                                                                     ours.class_names):
            raise UserError(f"--val-data {self.args.val_data} holds {val.latent_shape} latents, {val.conditioning} "
                            f"conditioning, classes {val.class_names}; --data holds {ours.latent_shape}, "
                            f"{ours.conditioning}, {ours.class_names}")
        if self.rank == 0:
            try:
                evaluate(self.ema, self.diffusion, val, self.ae, self.lpl, count=1, device=self.device,
                         autocast_dtype=self.autocast_dtype)
            except Exception as error:  # noqa: BLE001 (whatever it is, it would stop the run at its first evaluation)
                raise UserError(f"--val-data {self.args.val_data}: validation fails before step 1 "
                                f"({type(error).__name__}: {' '.join(str(error).split())})") from error

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
        """The run's complete state: every random number is keyed by (seed, step, position) (keyed_draws), so
        weights, optimiser, step and data position are all an exact resume needs, on any number of ranks."""
        return dict(model=self.model.state_dict(), ema=self.ema.state_dict(), optimizer=self.optimizer.state_dict(),
                    step=self.step, data=self.data_position)

    def load_state_dict(self, checkpoint):
        saved, ours = checkpoint.get("dataset"), self.data.identity()
        if saved is not None and saved != ours:
            different = [f"{key} {saved.get(key)} vs {value}" for key, value in ours.items() if saved.get(key) != value]
            raise UserError(f"--resume: the run was trained on another dataset than --data {self.args.data} ("
                            f"{'; '.join(different)}); a resume needs the same rows (the folder may have moved)")
        self.load_weights(checkpoint, "--resume")
        if getattr(self.model, "backbone", None):
            self.model.unused = dict(checkpoint.get("backbone_unused") or {})
            self.model.source_keys = checkpoint.get("backbone_keys")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.sampler.load_state_dict(checkpoint["data"])
        self.data_position = checkpoint["data"]
        self.step = checkpoint["step"]
        written_by = checkpoint.get("world_size", self.world)
        if written_by != self.world:
            self.log(f"--resume: written by {written_by} ranks, continued on {self.world}: the same global batches, "
                     "the same random numbers (keyed by position), the same run up to float rounding")

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
        """Every rank's weights checksum is gathered; if all ranks hold the same model and EMA, rank 0 writes
        step-N.pt atomically and points last.pt at it."""
        state = self.state_dict()
        checksums = [weights_checksum([*state["model"].values(), *state["ema"].values()])]
        if self.world > 1:
            mine, checksums = checksums[0], [None] * self.world
            dist.all_gather_object(checksums, mine)
        if len(set(checksums)) > 1:  # every rank sees the same list, so every rank stops
            raise TrainingStopped(f"at step {self.step} the ranks hold different weights (checksums {checksums}): the "
                                  f"DDP replicas diverged; stopping without saving: {self.last_good_checkpoint()}")
        if self.rank == 0:
            state.update(replica_checksums=checksums, world_size=self.world, args=vars(self.args),
                         model_config=self.model.config, diffusion=self.diffusion.config(),
                         class_names=self.data.class_names, resolution=self.data.resolution,
                         latent_scaling=self.data.latent_scaling, dataset=self.data.identity(),
                         excluded_rows=sorted(self.sampler.excluded))
            if getattr(self.model, "backbone", None):  # what `python model.py export` gives back (REPA's projectors)
                state.update(backbone_unused=self.model.unused, backbone_keys=self.model.source_keys)
            self.log(f"saved {save_checkpoint(state, self.out / 'checkpoints', self.step)}")
        if self.world > 1:
            dist.barrier()

    def last_good_checkpoint(self):
        last = self.out / "checkpoints" / "last.pt"
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    # -- one optimiser step ---------------------------------------------------------------------------------------

    def lpl_sub_batch(self, t_all, keys, positions):
        """LPL's gate drawn over the global micro-batch, with each sample's keyed random number (keys): the same
        samples on any number of ranks -> (this rank's chosen samples, how many of its samples passed, the weight)."""
        ratio = self.diffusion.sigma_ratio(t_all)
        chosen, _, weight = self.lpl.gate(ratio, self.data.resolution, keys)
        mine = torch.isin(positions, chosen).nonzero().squeeze(1)  # indices into this rank's micro-batch
        passed = int((ratio[positions] <= self.lpl.tau(self.data.resolution)).sum())
        return mine, passed, weight

    def next_batches(self):
        """The device micro-batches of the next step, prepared here (train() prepares them ahead, in a thread)."""
        host = self.batches.host(self.step)
        self.data_position = host["data"]
        return self.batches.to_device(host, self.device)

    def lpl_active(self):
        return self.lpl is not None and self.step >= self.args.lpl_start

    def losses(self, z0, condition, t, noise, rows=None, chosen=None):
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
            loss_lpl, lpl_stats = self.lpl(z0_hat, z0, self.diffusion.sigma_ratio(t), chosen=chosen)
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
            self.period.append((self.step + 1, batch["rows"]))
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

    def write_log(self, sums, steps, seconds, data_wait=0.0, data_prepare=0.0):
        """All-reduce the means since the last log (the loop's only sync point) and append one JSON line. A
        non-finite loss stops the run here, before anything is written: the last good checkpoint stays intact."""
        names = sorted(sums)
        values = torch.stack([sums[k].float() / steps for k in names])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        record = dict(step=self.step, time=wall_clock(), **dict(zip(names, values.tolist())))
        if not math.isfinite(record["loss"]):
            self.stop_at_non_finite_rows()
        self.period = []
        record.update(lr=self.optimizer.param_groups[0]["lr"], img_per_s=steps * self.args.global_batch_size / seconds,
                      step_ms=1000 * seconds / steps, data_wait_ms=1000 * data_wait / steps,
                      data_prepare_ms=1000 * data_prepare / steps)
        if self.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.append_log(record)
        return record

    def stop_at_non_finite_rows(self):
        """The loss is not finite: the first step since the last log whose rows hold non-finite values, found by
        reading them again on every rank (written to OUT/nonfinite-rows.json for --exclude-rows); then stop."""
        bad = [(step, rows[~torch.isfinite(self.data.get(rows)[0]).flatten(1).all(1)].tolist())
               for step, rows in self.period]
        first = min((step for step, found in bad if found), default=math.inf)
        mine = (first, [row for step, found in bad if step == first for row in found])
        everyone = [mine] * self.world
        if self.world > 1:
            dist.all_gather_object(everyone, mine)
        step = min(first for first, _ in everyone)
        rows = sorted({row for first, found in everyone if first == step for row in found})
        if not rows:
            raise TrainingStopped(f"non-finite loss in steps {self.period[0][0]}..{self.step}, whose rows are finite: "
                                  f"the update diverged; stopping: {self.last_good_checkpoint()}")
        if self.rank == 0:
            write_json(self.out / "nonfinite-rows.json", dict(step=step, data=str(self.args.data), rows=rows))
        raise TrainingStopped(f"non-finite loss at step {step}: rows {rows[:20]} of --data {self.args.data} hold "
                              f"non-finite values (all of them in {self.out / 'nonfinite-rows.json'}: exclude them "
                              f"with --exclude-rows FILE --resume last; `python data.py check` finds every bad "
                              f"row); stopping: {self.last_good_checkpoint()}")

    def append_log(self, record):
        if self.rank == 0:
            append_jsonl(self.out / "log.jsonl", record)

    def validate(self):
        """Rank 0 evaluates the EMA and the raw weights on --val-data (evaluate); the other ranks wait. A failure is
        logged and reported and training goes on: the checkpoint of this step is already written."""
        if self.rank == 0:
            for name, model in (("ema", self.ema), ("raw", self.model)):
                try:
                    figures = evaluate(model.eval(), self.diffusion, self.val, self.ae, self.lpl,
                                       count=self.args.val_samples, draws=self.args.val_draws,
                                       batch_size=self.micro_batch, seed=self.args.seed, device=self.device,
                                       autocast_dtype=self.autocast_dtype)
                except Exception as error:  # noqa: BLE001 (a validation failure must not end a run of days)
                    message = f"{type(error).__name__}: {' '.join(str(error).split())}"
                    self.append_log(dict(step=self.step, time=wall_clock(), eval=name, error=message))
                    self.log(f"validation ({name}) at step {self.step} FAILED, training goes on: {message}")
                    continue
                finally:
                    self.model.train()
                self.append_log(dict(step=self.step, time=wall_clock(), eval=name, **figures))
                near = VAL_LEVELS.index(1.0)
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

    def draw_curves(self):
        """OUT/curves.png from log.jsonl (plot.py), on rank 0; a figure that fails to draw is logged, not fatal."""
        if self.rank == 0:
            try:
                plot_curves([self.out / "log.jsonl"], self.out / "curves.png", names=[self.out.name])
            except Exception as error:  # noqa: BLE001 (a plot must not end a run)
                self.log(f"curves.png not drawn: {type(error).__name__}: {error}")

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self):
        """The loop. A SIGTERM, SIGINT or SIGUSR1 (StopSignals) stops every rank after the same step, with a
        checkpoint of that step: the same command then continues the run."""
        args = self.args
        if self.rank == 0:  # on resume, drop the lines a crashed run wrote after the checkpoint; fresh: all
            trim_jsonl(self.out / "log.jsonl", self.step)
            remove_stale_temporaries(self.out / "checkpoints")  # left by kills during a write; we hold the lock
        if self.step >= args.steps:
            self.log(f"nothing to do: the checkpoint is at step {self.step}, --steps is {args.steps}")
            return
        self.log(f"training {args.steps - self.step} steps, global batch {args.global_batch_size} = {self.world} ranks"
                 f" x {self.micro_batch} x {args.grad_accum} accumulation; out {self.out}")
        progress = tqdm(total=args.steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True)
        sums, steps, started, data_wait, data_prepare = {}, 0, time.perf_counter(), 0.0, 0.0
        upcoming = itertools.count(self.step)  # the steps the prefetch thread prepares, ahead of self.step
        with StopSignals() as signals, data.Prefetcher(lambda: self.batches.host(next(upcoming))) as prefetched:
            while self.step < args.steps:
                lpl_was_active = self.lpl_active()
                waited = time.perf_counter()
                host = next(prefetched)
                batches = self.batches.to_device(host, self.device)
                data_wait += time.perf_counter() - waited  # what the data costs the training thread
                data_prepare += host["seconds"]  # what it would cost it without the prefetch thread
                self.data_position = host["data"]
                for name, value in self.train_step(batches).items():
                    sums[name] = sums.get(name, 0) + value  # device tensors: no sync
                steps += 1
                progress.update(1)
                stop = self.stop_agreed(signals.requested)
                at_end, step = self.step == args.steps or stop, self.step
                save_now = step % args.ckpt_every == 0 or at_end
                evaluate_now = self.val is not None and (step % args.eval_every == 0 or at_end) and not stop
                grid_now = args.sample_every and (step % args.sample_every == 0 or at_end) and not stop
                # a log before anything is written or evaluated: it stops the run at a non-finite loss
                if step % args.log_every == 0 or save_now or evaluate_now or lpl_was_active != self.lpl_active():
                    record = self.write_log(sums, steps, time.perf_counter() - started, data_wait, data_prepare)
                    progress.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "diffusion", "lpl") if k in record})
                    sums, steps, started, data_wait, data_prepare = {}, 0, time.perf_counter(), 0.0, 0.0
                if save_now:  # before validation: an error there never costs this checkpoint
                    self.save_checkpoint()
                if evaluate_now:
                    self.validate()
                if grid_now:
                    self.sample_grid()
                if save_now:
                    self.draw_curves()
                if stop:
                    self.stopped(signals.received)
        progress.close()
        (self.out / "stopped.json").unlink(missing_ok=True)

    def stop_agreed(self, requested):
        """A signal that reached one rank stops them all after the same step: a max over ranks of one flag, on a
        CPU group (gloo), so it costs no host-device sync."""
        if self.world == 1:
            return requested
        flag = torch.tensor([int(requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(flag)

    def stopped(self, received):
        """After a signal: the checkpoint of this step is written; say so, leave OUT/stopped.json for a requeue
        script, and exit with EXIT_STOPPED."""
        if self.rank == 0:
            write_json(self.out / "stopped.json", dict(step=self.step, signal=received, time=wall_clock()))
        self.log(f"stopped by {received or 'a signal on another rank'} at step {self.step}, checkpoint written: the "
                 f"same command with --resume last (or auto) continues the run")
        raise StoppedBySignal(self.step)


def main(argv=None):
    """The command line: a bad flag or file, or a run that had to stop, is one line `error: ...`, no traceback; a
    run stopped by a signal (its checkpoint written) exits with status EXIT_STOPPED."""
    try:
        with one_line_errors(also=(TrainingStopped,)):
            run(check_args(parse_args(argv)))
    except StoppedBySignal:
        raise SystemExit(EXIT_STOPPED) from None


def run(args):
    """Loads what a resume needs, starts the processes, makes the demo data if asked, trains in a locked folder."""
    resume = None
    if args.resume:
        path = Path(args.out) / "checkpoints" / "last.pt" if args.resume in ("last", "auto") else Path(args.resume)
        resume = load_checkpoint(path, "--resume", mmap=True)
        started_as(args, resume)
        check_resume_args(resume, args, path)
    elif (Path(args.out) / "checkpoints" / "last.pt").exists():
        raise UserError(f"{args.out}/checkpoints/last.pt exists: continue that run with --resume last, or start a "
                        f"new one in another --out (or remove {args.out})")
    rank, world, device = setup_distributed()
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
