"""The flags of train.py, whose defaults are the paper's settings, and every check of them that needs no file
read: a bad flag is one line `error: ...` before any process starts, not a failure hours into a run.

    DEMO / REAL        the defaults that differ between the demo (no --data) and a real run
    build_parser       the flags, grouped as the paper's sections (python train.py --help lists them)
    check_args         the demo/real defaults filled in, then each flag checked on its own line
    started_as         on --resume: the model, backbone, objective and --init-from of the run being continued
    check_resume_args  on --resume: the flags that define a run (RESUME_MUST_MATCH) must be the ones it started with
"""

import argparse
from pathlib import Path

import torch

import data
from lpl import DEPTH_WEIGHTS, MASK_SOURCES, NORMS
from model import FILE_FORMATS, MODELS, backbone_diffusion
from runtime import UserError, check_output_folder
from schedules import OBJECTIVES

RESUME_MUST_MATCH = ("model", "backbone", "objective", "global_batch_size", "grad_accum", "seed", "lpl", "lpl_weight",
                     "lpl_threshold", "lpl_blocks", "lpl_norm", "lpl_mask", "lpl_depth_weights", "lpl_start",
                     "lpl_max_samples", "ema_decay", "lr", "weight_decay", "warmup_steps", "grad_clip", "flow_shift",
                     "precision")
DEMO = dict(model="demo", steps=600, global_batch_size=32, lr=1e-3, lpl_start=400, ckpt_every=300, log_every=20,
            eval_every=600, val_samples=64)  # python train.py [--lpl]: ~3.5 minutes on 2 CPU cores
REAL = dict(model="XL/2", steps=400_000, global_batch_size=256, lr=1e-4, lpl_start=0, ckpt_every=50_000,
            log_every=100, eval_every=None, val_samples=256)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser(description=None):
    """train.py's flags; `description` heads --help (train.py passes its docstring: the commands that run it)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
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
    g.add_argument("--lpl-max-samples", type=int,
                   help="LPL on at most this many gated samples of each micro-batch of the global batch (unbiased)")
    g.add_argument("--lpl-checkpointing", action="store_true", help="activation checkpointing of the decoder")
    g.add_argument("--lpl-compile", action="store_true", help="torch.compile the decoder (dynamic gated batch)")
    g = p.add_argument_group("EMA, checkpoints, logs, validation")
    g.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay (Fig. 10: 0.9999 without LPL, 0.99975 with it), warmed up over the first steps")
    g.add_argument("--ckpt-every", type=int, help=f"checkpoint period ({real} 50000, {demo} 300)")
    g.add_argument("--log-every", type=int, help=f"log period ({real} 100, {demo} 20)")
    g.add_argument("--sample-every", type=int, help="sample-grid period (default --ckpt-every; 0: none)")
    g.add_argument("--resume", help="checkpoint to continue bit-exactly ('last': OUT/checkpoints/last.pt; 'auto': "
                                    "last.pt if it exists, else a fresh start: one command for a requeued job)")
    g.add_argument("--exclude-rows", help="JSON file of dataset rows to leave out (a list, or {\"rows\": [...]}, "
                                          "as OUT/nonfinite-rows.json); recorded in the checkpoint")
    g.add_argument("--init-from", help="checkpoint whose weights (model and EMA) start a new run; any resolution")
    g.add_argument("--backbone", choices=FILE_FORMATS,
                   help="--init-from is a released DiT / SiT / REPA checkpoint (model.load_backbone): the model and "
                        "the process it was trained on come from it")
    g.add_argument("--val-data", help="flat-file validation set (demo: the held-out photos)")
    g.add_argument("--eval-every", type=int, help="validation period (default --ckpt-every; demo 600)")
    g.add_argument("--val-samples", type=int, help=f"validation rows used, the first ones ({real} 256, {demo} 64)")
    g.add_argument("--val-draws", type=int, default=1, help="noise draws per validation row and level")
    return p


def check_args(args):
    """Defaults that depend on demo vs real run, then every flag check that needs no file read."""
    demo, defaults = args.data is None, vars(build_parser().parse_args([]))
    if args.resume == "auto":  # a requeued job: continue the run if it has a checkpoint, else start it
        out = args.out or ("runs/demo" if demo else None)
        if out is None or not (Path(out) / "checkpoints" / "last.pt").exists():
            args.resume = None
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
    check_output_folder(args.out, "--out")
    args.sample_every = args.ckpt_every if args.sample_every is None else args.sample_every
    args.eval_every = args.ckpt_every if args.eval_every is None else args.eval_every
    args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    args.vae_dtype = args.vae_dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    for flag in ("steps", "global_batch_size", "grad_accum", "ckpt_every", "log_every", "eval_every", "val_samples",
                 "val_draws"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.sample_every < 0 or args.lpl_start < 0:
        raise UserError("--sample-every and --lpl-start must be >= 0")
    if args.lr <= 0 or args.weight_decay < 0 or args.grad_clip < 0:
        raise UserError(f"--lr must be positive, --weight-decay and --grad-clip >= 0 (0: none), got {args.lr}, "
                        f"{args.weight_decay}, {args.grad_clip}")
    if args.warmup_steps < 0 or args.seed < 0:
        raise UserError(f"--warmup-steps and --seed must be >= 0, got {args.warmup_steps} and {args.seed}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.lpl and (args.lpl_weight <= 0 or args.lpl_start >= args.steps):
        raise UserError(f"--lpl-weight must be positive and --lpl-start below --steps {args.steps} (LPL would never "
                        f"act), got {args.lpl_weight} and {args.lpl_start}")
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
