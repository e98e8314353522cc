"""Throughput, memory and LPL-overhead benchmark: the figures a README table cites, each with its exact command.

    python bench.py train --model XL/2 --resolution 256 --batch-size 32 --vae-arch sdxl --lpl-blocks 5 \\
        --lpl-threshold 4 [--lpl-checkpointing] [--lpl-max-samples K] [--lpl-compile] [--compile] \\
        [--checkpointing] [--dtype bf16] [--json train.json]
    python bench.py fid                                   # Frechet distance vs scipy sqrtm at 2048-d, Inception img/s
    python bench.py sample --model XL/2 --resolution 256 --batch-size 32 --steps 50 --cfg 1.5 --decode
    python bench.py lpl-subbatch --resolution 256 --batch-size 32 --max-samples 4 8 16 --repeats 16
    python bench.py lpl --vae-arch sdxl --resolution 256 --gated 24 --lpl-blocks 5 --dtype bf16 [--checkpointing] \\
        [--compile] [--exact-quantiles] [--json lpl.json]  # LPL alone: time per part, saved-for-backward bytes
    python suite.py --out bench-gpu                       # all of them at the paper's settings (the GPU check)

At CPU scale (OMP_NUM_THREADS=1: one core, so that the figures can be compared):

    python bench.py train --model S/2 --resolution 64 --batch-size 8 --vae-arch sdxl --vae-ch 32 --warmup 2 --steps 5
    python bench.py train ... --lpl-checkpointing         # also: --lpl-blocks 4, --lpl-max-samples 2
    python bench.py fid --repeats 1 --inception-batch 8 --inception-iters 2
    python bench.py sample --model S/2 --resolution 64 --batch-size 8 --steps 50 --cfg 1.5 --decode --vae-ch 32
    python bench.py lpl-subbatch --resolution 64 --batch-size 32 --vae-ch 32 --max-samples 4 8 16 --repeats 16
    python bench.py lpl --resolution 128 --gated 4 --vae-ch 32 --dtype fp32 --warmup 1 --repeats 5

`train` times the real optimiser step of train.py (Trainer.train_step: MMDiT forward, LPL, backward, clipping, fused
AdamW on CUDA, EMA) on a synthetic flat-file dataset and a random-weight decoder saved and loaded as train.py does:
first without LPL, then each LPL variant, each a fresh Trainer from the same seed fed the same pre-drawn batches
(data, times, noise). Weights are random: throughput does not depend on their values. The samples LPL decodes per
step are read from its `decoded_fraction` statistic (no host-device sync).

FLOPs are counted from shapes, never timed: the MMDiT's with model.flops_per_forward (exact matmul count; a training
step is 3 forwards), the decoder's with torch.utils.flop_counter.FlopCounterMode on one latent on the meta device,
forward and backward to its input (the decoder is frozen: no weight gradients). LPL per step = decoded samples x
(target forward + prediction forward + backward [+ recomputed forward with --lpl-checkpointing]); the LPL part of the
step is the LPL step's time minus the no-LPL step's, and its decoder utilisation those FLOPs / that time / the peak.
MFU = model FLOPs / time / the GPU's dense bf16 peak (PEAK_BF16_FLOPS; --peak-tflops for other GPUs); recomputation
from checkpointing is not counted. Peak memory is CUDA's max_memory_allocated over the timed steps; on the CPU it is
"n/a".
"""

import argparse
import functools
import gc
import json
import math
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.stats
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fid
import train
from autoencoder import KL_ARCHS, build_kl_autoencoder, save_autoencoder
from lpl import MASK_SOURCES, NORMS, LatentPerceptualLoss
from model import MODELS, backbone_diffusion, build_model
from runtime import UserError, one_line_errors, write_json, write_npy, write_text
from sample import mmdit_model_fn, null_condition, sample, sample_share
from schedules import Diffusion

IMAGENET_CLASSES = 1000  # the synthetic datasets are class-conditional, like the paper's ImageNet models
PREDICTION_ERROR = 0.1  # lpl-subbatch: std of the stand-in network's eps error (z0_hat = x0_from_pred(eps + 0.1 n))
GATE_SAMPLES = 2 ** 20  # Monte Carlo draws of t for the expected gated fraction
SAMPLE_WARMUP_STEPS = 2  # sampler steps of the untimed warm-up call
SAMPLE_REPEATS = 3  # timed calls; the median is reported

# Dense (no sparsity) bf16 tensor-core FLOP/s, from NVIDIA's datasheets; matched on the CUDA device name, most
# specific first ("NVIDIA H100 PCIe" must not match "H100").
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("A100", 312e12),
)

# Targets (PASS/MISS), set by issue 11 from the first H200 measurement: the LPL part of the step (LPL step minus
# no-LPL step) runs the decoder's FLOPs at >= 25% of the dense bf16 peak (11% then); peak memory <= 1.9x the no-LPL
# step, <= 1.35x with the decoder checkpointed (the paper's Fig. 7: 83.4 / 64.9 GB = 1.29x); the MMDiT without LPL
# at >= 25% MFU eager and >= 35% with --compile; fid.py's Frechet distance 5x faster than scipy's sqrtm at 2048-d
# (full-rank covariances) and equal to 1e-6 relative.
TARGET_LPL_DECODER_UTILISATION = 0.25
TARGET_LPL_MEMORY_RATIO = dict(plain=1.9, checkpointed=1.35)
TARGET_MFU = dict(eager=0.25, compiled=0.35)
TARGET_FID_SPEEDUP = 5.0
TARGET_FID_RELATIVE_DIFFERENCE = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# The machine: device, peak FLOP/s, timing, memory
# ----------------------------------------------------------------------------------------------------------------

def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    return f"CPU: {platform.processor() or platform.machine()}"


def environment(device):
    """What every figure is printed with: the device, the software, the threads."""
    env = dict(device=device_name(device), torch=torch.__version__, python=platform.python_version(),
               cpu_threads=torch.get_num_threads())
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1))
    return env


def peak_flops(device, dtype, peak_tflops=None):
    """Peak FLOP/s for MFU: --peak-tflops if given, else the bf16 table by CUDA device name; None (MFU n/a) on the
    CPU, in fp32, or on a GPU the table does not know."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda" or dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key.lower() in name.lower()), None)


def configure_backends(device):
    """TF32 for the fp32 matmuls and convolutions that remain under autocast, as train.py's main() sets."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mark(device):
    """A point in time: a CUDA event on a GPU (read after one synchronisation at the end), perf_counter on the CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds_between(start, end):
    return start.elapsed_time(end) / 1000 if isinstance(start, torch.cuda.Event) else end - start


def lap_times(fn, count, device):
    """Seconds of each of `count` calls of fn: CUDA events between calls on a GPU (no synchronisation until the
    end, so the host runs ahead as in training), time.perf_counter on the CPU."""
    synchronize(device)
    marks = [mark(device)]
    for _ in range(count):
        fn()
        marks.append(mark(device))
    synchronize(device)
    return [seconds_between(start, end) for start, end in zip(marks, marks[1:])]


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """CUDA's peak allocated memory since the last reset; None on the CPU (no reliable per-phase peak there)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def torch_dtype(dtype):
    return torch.bfloat16 if dtype == "bf16" else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, counted from shapes
# ----------------------------------------------------------------------------------------------------------------

def counted_flops(fn):
    """FLOPs of the matmuls and convolutions fn() runs (torch.utils.flop_counter: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def decoder_flops(vae_arch, vae_ch, latent_shape, n_blocks):
    """(forward, backward) FLOPs of decoder_features(z, n_blocks) for ONE latent of latent_shape (C, h, w), counted on
    the meta device (shapes only). The backward is to the input alone: LPL's decoder is frozen."""
    with torch.device("meta"):
        ae = build_kl_autoencoder(vae_arch, ch=vae_ch)
        z = torch.zeros((1, *latent_shape), requires_grad=True)
    features = []
    forward = counted_flops(lambda: features.extend(ae.decoder_features(z, n_blocks)))
    backward = counted_flops(lambda: torch.autograd.backward(features, [torch.ones_like(f) for f in features]))
    return forward, backward


def lpl_flops(decoded, forward, backward, checkpointing):
    """(model, hardware) FLOPs of LPL for `decoded` samples: target forward + prediction forward + backward to the
    input; with checkpointing the prediction branch is recomputed in the backward pass (hardware only)."""
    model_flops = decoded * (2 * forward + backward)
    return model_flops, model_flops + (decoded * forward if checkpointing else 0)


def expected_gated_fraction(diffusion, tau, seed=0):
    """P(sigma_t / alpha_t <= tau) under train.py's distribution of t (Monte Carlo, GATE_SAMPLES seeded draws)."""
    t = diffusion.sample_t(GATE_SAMPLES, generator=torch.Generator().manual_seed(seed))
    return (diffusion.sigma_ratio(t) <= tau).double().mean().item()


def expected_decoded(batch, fraction, max_samples=None):
    """E[min(G, max_samples)], G ~ Binomial(batch, fraction): the samples LPL decodes per batch."""
    if max_samples is None or max_samples >= batch:
        return batch * fraction
    counts = np.arange(batch + 1)
    return float((np.minimum(counts, max_samples) * scipy.stats.binom.pmf(counts, batch, fraction)).sum())


# ----------------------------------------------------------------------------------------------------------------
# Targets and reports: every figure with the device, torch version and the command that made it
# ----------------------------------------------------------------------------------------------------------------

def target(name, value, goal, higher_is_better, unit="x", why_not="not measurable here"):
    """A figure checked against its goal: PASS / MISS and by how much, or n/a (value None) and why."""
    if value is None:
        return dict(name=name, value=None, goal=goal, status="n/a", text=f"[n/a ] {name}: n/a ({why_not})")
    passed = value >= goal if higher_is_better else value <= goal
    by = abs(value / goal - 1) * 100
    relation = ">=" if higher_is_better else "<="
    how = (f"{by:.0f}% better than the goal" if passed else f"missed by {by:.0f}%")
    text = f"[{'PASS' if passed else 'MISS'}] {name}: {value:.3g}{unit} (goal {relation} {goal:g}{unit}; {how})"
    return dict(name=name, value=value, goal=goal, status="PASS" if passed else "MISS", text=text)


def command_line(argv, program="bench.py"):
    return f"python {program} " + shlex.join(argv)


def new_report(kind, argv, device, settings, program="bench.py"):
    return dict(kind=kind, command=command_line(argv, program), environment=environment(device), settings=settings,
                figures={}, rows=[], targets=[])


def start_report(kind, settings):
    """(device, report) of a benchmark: TF32 as train.py sets it, and a report citing the exact command."""
    device = default_device()
    configure_backends(device)
    return device, new_report(kind, settings.argv, device, settings_dict(settings))


def add_row(report, label, text):
    report["rows"].append([label, text])


def format_report(report):
    env = report["environment"]
    header = [f"== {report['command']}",
              f"   {env['device']} | torch {env['torch']}" + (f" | CUDA {env['cuda']}" if "cuda" in env else "")
              + f" | {env['cpu_threads']} CPU threads"]
    width = max((len(label) for label, _ in report["rows"]), default=0)
    rows = [f"   {label:<{width}}  {text}" for label, text in report["rows"]]
    return "\n".join(header + rows + [f"   {t['text']}" for t in report["targets"]])


def json_ready(value):
    """Reports hold only numbers, strings, lists and dicts; tuples become lists, non-finite floats None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def gflops(flops):
    return f"{flops / 1e9:,.4g} GFLOP"


# ----------------------------------------------------------------------------------------------------------------
# Synthetic inputs written as train.py reads them: flat-file latents, a random decoder-only VAE checkpoint
# ----------------------------------------------------------------------------------------------------------------

def write_synthetic_dataset(folder, count, latent_shape, seed=0):
    """`count` N(0, 1) latents (float16) with labels, as a flat-file dataset (data.py)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((count, *latent_shape), dtype=np.float32)
    write_npy(folder / "latents.npy", latents.astype(np.float16))
    write_npy(folder / "labels.npy", (np.arange(count) % IMAGENET_CLASSES).astype(np.int64))
    write_json(folder / "meta.json", dict(autoencoder="random (bench.py)", resolution=latent_shape[-1] * 8,
                                          count=count, class_names=[f"class{i}" for i in range(IMAGENET_CLASSES)],
                                          source="bench.py: N(0, 1) latents"))
    return folder


def save_random_decoder(path, vae_arch, vae_ch, seed=0):
    """A random KL autoencoder of vae_arch's layout (width vae_ch), saved without its encoder: LPL needs only the
    decoder, and a baseline that holds no encoder weights keeps the memory ratio honest."""
    torch.manual_seed(seed)
    ae = build_kl_autoencoder(vae_arch, ch=vae_ch)
    ae.encoder, ae.quant_conv = None, None
    save_autoencoder(ae, path)
    return path


def random_autoencoder(settings, device):
    """A random KL autoencoder of the settings' layout (seeded), on the device in the benchmark's dtype."""
    torch.manual_seed(settings.seed)
    return build_kl_autoencoder(settings.vae_arch, ch=settings.vae_ch).to(device, torch_dtype(settings.dtype))


def latent_shape_of(settings):
    return KL_ARCHS[settings.vae_arch]["z_channels"], settings.resolution // 8, settings.resolution // 8


# ----------------------------------------------------------------------------------------------------------------
# train: train.py's own optimiser step (Trainer.train_step), without and with LPL
# ----------------------------------------------------------------------------------------------------------------

LPL_FLAGS = ("lpl_blocks", "lpl_threshold", "lpl_max_samples", "lpl_checkpointing", "lpl_compile")


def train_argv(settings, dataset, vae, out, steps=1_000_000, lpl=True):
    """The train.py command line of these settings (the Trainer is built from it, and the torchrun smoke runs it).
    The baseline loads the decoder too (--vae without --lpl): every run holds the same weights in memory."""
    argv = ["--data", str(dataset), "--out", str(out), "--model", settings.model, "--steps", str(steps),
            "--global-batch-size", str(settings.batch_size), "--precision", settings.dtype,
            "--vae-dtype", settings.dtype, "--vae", str(vae), "--seed", str(settings.seed)]
    argv += ["--compile"] * settings.compile + ["--checkpointing"] * settings.checkpointing
    if lpl:
        argv += ["--lpl", "--lpl-blocks", str(settings.lpl_blocks), "--lpl-threshold", str(settings.lpl_threshold)]
        argv += ["--lpl-max-samples", str(settings.lpl_max_samples)] if settings.lpl_max_samples is not None else []
        argv += ["--lpl-checkpointing"] * settings.lpl_checkpointing + ["--lpl-compile"] * settings.lpl_compile
    return argv


def build_trainer(settings, dataset, vae, out, lpl):
    args = train.check_args(train.parse_args(train_argv(settings, dataset, vae, out, lpl=lpl)))
    return train.Trainer(args, 0, 1, default_device())


def syncs_per_step(trainer, batch):
    """Host-device synchronisations in one optimiser step (CUDA's sync debug mode, warnings counted)."""
    if trainer.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def flash_attention_check(trainer, latent_shape, dtype):
    """Does the MMDiT's attention run on the flash kernel? One forward with SDPA restricted to flash."""
    model, device = trainer.model, trainer.device
    x, t = torch.zeros((1, *latent_shape), device=device), torch.full((1,), 0.5, device=device)
    try:
        with torch.no_grad(), autocast(device, dtype), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            model(x, t, y=torch.zeros(1, dtype=torch.long, device=device))
        return "yes"
    except RuntimeError as error:
        return f"no ({str(error).splitlines()[0][:120]})"


def time_steps(trainer, batches, warmup):
    """train_step over `batches`: the first `warmup` untimed, the others timed; peak memory over the timed ones.
    (The cache is emptied before the warm-up, not after it: the timed steps must not pay for cudaMalloc.)"""
    device, sums = trainer.device, {}
    free_memory(device)
    for batch in batches[:warmup]:
        trainer.train_step(batch)
    reset_peak_memory(device)
    timed = iter(batches[warmup:])

    def step():
        for name, value in trainer.train_step(next(timed)).items():
            sums[name] = sums.get(name, 0) + value
    times = lap_times(step, len(batches) - warmup, device)
    peak = peak_memory_gib(device)
    means = {name: float(value) / len(times) for name, value in sums.items()}
    if not math.isfinite(means["loss"]):  # a benchmark of NaN steps would be no benchmark
        raise RuntimeError(f"non-finite loss in the timed steps: {means}")
    return dict(step_s=float(np.mean(times)), step_s_std=float(np.std(times)), step_times=times, peak_gib=peak,
                decoded_per_step=means.get("lpl_decoded_fraction", 0.0) * trainer.micro_batch,
                losses=dict(diffusion=means["diffusion"], lpl=means.get("lpl", 0.0)))


def measure_run(trainer, batches, settings, variant, log):
    """One run of `trainer` on the shared batches: the baseline (variant None) or an LPL variant. A variant that
    runs out of GPU memory is recorded as such, and the others still run."""
    run = dict(name="no LPL" if variant is None else lpl_label(variant),
               command=command_line(settings.argv if variant is None else variant.argv),
               settings=None if variant is None else {k: getattr(variant, k) for k in LPL_FLAGS})
    try:
        run.update(time_steps(trainer, batches, settings.warmup))
    except torch.cuda.OutOfMemoryError as error:
        if variant is None:
            raise
        run["error"] = f"out of memory: {str(error).splitlines()[0]}"
        log(f"  {run['name']}: {run['error']}")
        return run
    log(f"  {run['name']}: {run['step_s'] * 1000:.1f} ms/step")
    return run


def variant_settings(settings, flags):
    """The settings of one LPL variant: base settings plus `flags`, which may only change LPL_FLAGS."""
    variant = parse_args(settings.argv + list(flags))
    changed = [k for k, v in vars(variant).items() if k not in LPL_FLAGS + ("argv",) and v != getattr(settings, k)]
    if changed:
        raise ValueError(f"train variant {flags}: may only change {LPL_FLAGS}, but changes {changed}")
    return variant


def benchmark_train(settings, variant_flags=((),), log=print):
    """Runs: no LPL, then LPL for each variant (extra flags over `settings`), each a fresh train.py Trainer (the
    same seed: the same initial weights) fed the same pre-drawn batches (data, t, noise). Returns the report."""
    device, report = start_report("train", settings)
    figures, latent_shape = report["figures"], latent_shape_of(settings)
    variants, runs, batches = [variant_settings(settings, flags) for flags in variant_flags], [], None
    with tempfile.TemporaryDirectory(prefix="lpl-bench-") as tmp:
        dataset = write_synthetic_dataset(Path(tmp) / "data", 4 * settings.batch_size, latent_shape, settings.seed)
        vae = save_random_decoder(Path(tmp) / "vae.safetensors", settings.vae_arch, settings.vae_ch, settings.seed)
        for variant in [None, *variants]:
            trainer = build_trainer(variant or settings, dataset, vae, Path(tmp) / "run", lpl=variant is not None)
            if batches is None:  # drawn once, by the baseline's Trainer: every run sees the same steps
                batches = [trainer.next_batches() for _ in range(settings.warmup + settings.steps)]
                figures.update(flash_attention=flash_attention_check(trainer, latent_shape, settings.dtype),
                               mmdit_forward_flops=trainer.model.flops_per_forward(settings.batch_size),
                               decoder_weights_gib=sum(p.numel() * p.element_size()
                                                       for p in trainer.ae.parameters()) / 2 ** 30)
            runs.append(measure_run(trainer, batches, settings, variant, log))
            if variant is None:
                figures["syncs_per_step_without_lpl"] = syncs_per_step(trainer, batches[-1])
            elif variant is variants[0] and "error" not in runs[-1]:
                figures["syncs_per_step_with_lpl"] = syncs_per_step(trainer, batches[-1])
            del trainer
            free_memory(device)
    summarize_train(report, settings, variants, runs)
    return report


def lpl_label(variant):
    parts = [f"LPL {variant.lpl_blocks} blocks", f"tau {variant.lpl_threshold:g}"]
    parts += [f"max {variant.lpl_max_samples} samples"] if variant.lpl_max_samples is not None else []
    parts += ["decoder checkpointed"] * variant.lpl_checkpointing + ["decoder compiled"] * variant.lpl_compile
    return ", ".join(parts)


def summarize_train(report, settings, variants, runs):
    """FLOP counts, throughput, MFU, the LPL ratios and the targets, as figures and printable rows."""
    figures, batch = report["figures"], settings.batch_size
    peak = peak_flops(default_device(), settings.dtype, settings.peak_tflops)
    model_step = 3 * figures["mmdit_forward_flops"]  # forward + backward (2x); recomputation is not counted
    figures.update(mmdit_step_flops=model_step, peak_flops=peak, runs=runs, variants=[])
    add_row(report, "MMDiT FLOPs", f"{gflops(figures['mmdit_forward_flops'] / batch)} forward per image "
                                   f"(model.flops_per_forward); step = 3 x forward")
    baseline = runs[0]
    add_throughput(baseline, model_step, batch, peak)
    add_run_row(report, baseline)
    for variant, run in zip(variants, runs[1:]):
        figures["variants"].append(summarize_variant(report, settings, variant, run, baseline, model_step, peak))
    goal = TARGET_MFU["compiled" if settings.compile else "eager"]
    mfu = 100 * baseline["mfu"] if baseline["mfu"] is not None else None
    report["targets"].insert(0, target(f"MMDiT without LPL: MFU{' (--compile)' if settings.compile else ''}", mfu,
                                       100 * goal, True, unit="%",
                                       why_not="needs a GPU of the peak table, bf16, or --peak-tflops"))
    add_row(report, "decoder weights", f"{figures['decoder_weights_gib'] * 1024:.0f} MiB, held in every run")
    add_row(report, "MMDiT attention on flash", figures["flash_attention"])
    syncs = (figures["syncs_per_step_without_lpl"], figures.get("syncs_per_step_with_lpl"))
    add_row(report, "host-device syncs per step", "n/a (CPU)" if syncs[0] is None else
            f"{syncs[0]} without LPL, {syncs[1]} with it (torch.cuda.set_sync_debug_mode)")


def add_throughput(run, flops, batch, peak):
    """images/s, achieved FLOP/s and MFU of a run whose step does `flops` model FLOPs."""
    run.update(flops=flops, images_per_s=batch / run["step_s"], achieved_flops=flops / run["step_s"])
    run["mfu"] = run["achieved_flops"] / peak if peak else None


def add_run_row(report, run):
    memory = f"{run['peak_gib']:.2f} GiB" if run["peak_gib"] is not None else "n/a (CPU)"
    mfu = f"{100 * run['mfu']:.1f}%" if run["mfu"] is not None else "n/a"
    add_row(report, run["name"], f"{run['step_s'] * 1000:.1f} ms/step (std {run['step_s_std'] * 1000:.1f}), "
                                 f"{run['images_per_s']:.1f} img/s, peak memory {memory}, "
                                 f"{run['achieved_flops'] / 1e12:.3f} TFLOP/s, MFU {mfu}")


def summarize_variant(report, settings, variant, run, baseline, model_step, peak):
    """One LPL run: its decoder FLOPs, the rate at which the LPL part of the step (LPL step minus no-LPL step) runs
    them, and its peak memory against the no-LPL step's."""
    if "error" in run:
        add_row(report, run["name"], run["error"])
        report["targets"].append(dict(name=f"{run['name']}: runs", value=None, goal=None, status="MISS",
                                      text=f"[MISS] {run['name']}: {run['error']}"))
        return dict(name=run["name"], error=run["error"])
    forward, backward = decoder_flops(settings.vae_arch, settings.vae_ch, latent_shape_of(settings),
                                      variant.lpl_blocks)
    backbone = MODELS[settings.model].get("backbone")  # a DiT / SiT / REPA size trains on its own process
    diffusion = backbone_diffusion(backbone) if backbone else Diffusion("eps")
    fraction = expected_gated_fraction(diffusion, variant.lpl_threshold * settings.resolution / 256)
    expected = expected_decoded(settings.batch_size, fraction, variant.lpl_max_samples)
    lpl_model, lpl_hardware = lpl_flops(run["decoded_per_step"], forward, backward, variant.lpl_checkpointing)
    lpl_seconds = run["step_s"] - baseline["step_s"]
    utilisation = lpl_hardware / lpl_seconds / peak if peak and lpl_seconds > 0 else None
    memory_ratio = run["peak_gib"] / baseline["peak_gib"] if run["peak_gib"] is not None else None
    add_throughput(run, model_step + lpl_model, settings.batch_size, peak)
    add_row(report, f"decoder FLOPs, {variant.lpl_blocks} blocks",
            f"{gflops(forward)} forward, {gflops(backward)} backward to the input, per latent (FlopCounterMode); "
            f"per decoded sample: 2 x forward + backward" + (" + 1 forward recomputed" * variant.lpl_checkpointing))
    add_row(report, "  decoded per step", f"{run['decoded_per_step']:.2f} measured, {expected:.2f} expected (gated "
                                          f"fraction {fraction:.3f}); LPL = {gflops(lpl_hardware)} per step")
    add_row(report, "  command", run["command"])
    add_run_row(report, run)
    add_row(report, "  LPL part", f"{lpl_seconds * 1000:.1f} ms/step ({run['step_s'] / baseline['step_s']:.2f}x the "
                                  "no-LPL step); decoder FLOPs at "
                                  + (f"{100 * utilisation:.1f}% of peak" if utilisation is not None else "n/a")
                                  + (f"; peak memory {memory_ratio:.2f}x" if memory_ratio else ""))
    report["targets"].append(target(f"{run['name']}: LPL part's decoder FLOP/s, % of peak",
                                    None if utilisation is None else 100 * utilisation,
                                    100 * TARGET_LPL_DECODER_UTILISATION, True, unit="%",
                                    why_not="needs a GPU of the peak table, bf16, or --peak-tflops"))
    goal = TARGET_LPL_MEMORY_RATIO["checkpointed" if variant.lpl_checkpointing else "plain"]
    report["targets"].append(target(f"{run['name']}: peak memory / no LPL", memory_ratio, goal, False,
                                    why_not="CPU: no peak memory"))
    return dict(name=run["name"], decoder_forward_flops=forward, decoder_backward_flops=backward,
                expected_gated_fraction=fraction, expected_decoded=expected, lpl_model_flops=lpl_model,
                lpl_hardware_flops=lpl_hardware, lpl_seconds=lpl_seconds, decoder_utilisation=utilisation,
                time_ratio=run["step_s"] / baseline["step_s"], memory_ratio=memory_ratio)


# ----------------------------------------------------------------------------------------------------------------
# fid: fid.py's Frechet distance against the scipy sqrtm path; Inception feature throughput
# ----------------------------------------------------------------------------------------------------------------

def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2):
    """The classic path (pytorch-fid): tr((S1 S2)^1/2) from scipy.linalg.sqrtm of the non-symmetric product."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def synthetic_statistics(dim, seed=0):
    """Two full-rank Gaussians (2 * dim samples each, the second with correlated features): (mu1, s1, mu2, s2)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2 * dim, dim))
    b = rng.standard_normal((2 * dim, dim)) @ (np.eye(dim) + 0.1 * rng.standard_normal((dim, dim))) + 0.1
    return a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)


def best_time(fn, repeats):
    """(fastest wall-clock seconds of `repeats` calls, the last result)."""
    results = []
    times = lap_times(lambda: results.append(fn()), repeats, torch.device("cpu"))
    return min(times), results[-1]


def benchmark_fid(settings):
    device = default_device()
    report = new_report("fid", settings.argv, device, settings_dict(settings))
    figures = report["figures"]
    stats = synthetic_statistics(settings.dim, settings.seed)
    ours_s, ours = best_time(lambda: fid.frechet_distance(*stats), settings.repeats)
    sqrtm_s, reference = best_time(lambda: frechet_distance_sqrtm(*stats), settings.repeats)
    speedup, difference = sqrtm_s / ours_s, abs(ours - reference) / abs(reference)
    figures.update(dim=settings.dim, frechet_s=ours_s, sqrtm_s=sqrtm_s, speedup=speedup, fd=ours, fd_sqrtm=reference,
                   relative_difference=difference)
    add_row(report, f"Frechet distance {settings.dim}-d",
            f"fid.frechet_distance {ours_s:.3f} s, scipy sqrtm path {sqrtm_s:.3f} s (best of {settings.repeats}): "
            f"{speedup:.1f}x; values {ours:.6g} vs {reference:.6g}, relative difference {difference:.1e}")
    report["targets"].append(target(f"Frechet distance speed-up over sqrtm at {settings.dim}-d",
                                    speedup if settings.dim >= fid.FEATURE_DIM else None, TARGET_FID_SPEEDUP, True,
                                    why_not=f"the goal is set at {fid.FEATURE_DIM}-d"))
    report["targets"].append(target("Frechet distance relative difference to sqrtm", difference,
                                     TARGET_FID_RELATIVE_DIFFERENCE, False, unit=""))

    torch.manual_seed(settings.seed)
    model = fid.InceptionV3().eval().requires_grad_(False).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    images = list(torch.randint(0, 256, (settings.inception_batch, 3, 256, 256), dtype=torch.uint8,
                                generator=generator))
    fid.inception_features(model, images, device)  # warm-up
    times = lap_times(lambda: fid.inception_features(model, images, device), settings.inception_iters, device)
    throughput = settings.inception_batch / float(np.mean(times))
    figures.update(inception_images_per_s=throughput)
    add_row(report, "Inception features", f"{throughput:.1f} img/s (256 px uint8 -> 299 px -> 2048-d, float32, "
                                          f"batch {settings.inception_batch}; random weights: the speed does not "
                                          "depend on them)")
    return report


# ----------------------------------------------------------------------------------------------------------------
# sample: DDIM with guidance, model only and decoded
# ----------------------------------------------------------------------------------------------------------------

def benchmark_sample(settings):
    device, report = start_report("sample", settings)
    figures, batch = report["figures"], settings.batch_size
    latent_shape = latent_shape_of(settings)
    torch.manual_seed(settings.seed)
    with torch.device(device):  # initialised on the device: no minutes of CPU init for the large sizes
        model = build_model(settings.model, input_size=latent_shape[-1], in_channels=latent_shape[0],
                            num_classes=IMAGENET_CLASSES).eval().requires_grad_(False)
    diffusion, model_fn = Diffusion("eps"), mmdit_model_fn(model)
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn((batch, *latent_shape), generator=generator).to(device)
    labels = (torch.arange(batch) % IMAGENET_CLASSES).to(device)
    null = null_condition(model, labels)

    def run(steps):
        with autocast(device, settings.dtype):
            return sample(model_fn, diffusion, noise, steps=steps, cfg_scale=settings.cfg, cond=labels,
                          null_cond=null)

    run(SAMPLE_WARMUP_STEPS)
    model_s = float(np.median(lap_times(lambda: run(settings.steps), SAMPLE_REPEATS, device)))
    rows = batch * (2 if settings.cfg != 1.0 else 1)  # guidance: conditional and null rows in one forward
    flops = settings.steps * model.flops_per_forward(rows)
    peak = peak_flops(device, settings.dtype, settings.peak_tflops)
    figures.update(model_s=model_s, model_images_per_s=batch / model_s, flops=flops, achieved_flops=flops / model_s,
                   mfu=flops / model_s / peak if peak else None)
    mfu = f"{100 * figures['mfu']:.1f}%" if peak else "n/a"
    add_row(report, "DDIM, model only", f"{batch / model_s:.2f} img/s ({model_s:.2f} s for {batch} images, "
                                        f"{settings.steps} steps, guidance {settings.cfg:g}: {rows // batch} network "
                                        f"rows per image per step); {flops / model_s / 1e12:.3f} TFLOP/s, MFU {mfu}")
    if settings.decode:
        decode_benchmark(report, settings, model_fn, model, diffusion, latent_shape, device)
    return report


def decode_benchmark(report, settings, model_fn, model, diffusion, latent_shape, device):
    """sample.py's own path, sample_share: noise per sample, DDIM, decode, uint8."""
    ae, precision = random_autoencoder(settings, device), torch_dtype(settings.dtype)
    conditions = np.arange(settings.batch_size) % IMAGENET_CLASSES

    def run(steps, count):
        return sample_share(model_fn, diffusion, lambda z: ae.decode(z.to(precision)), latent_shape, range(count),
                            settings.seed, conditions, lambda cond: null_condition(model, cond), settings.batch_size,
                            steps, None, settings.cfg, 0.0, device,
                            autocast_dtype=precision if settings.dtype == "bf16" else None)

    run(SAMPLE_WARMUP_STEPS, settings.batch_size)
    seconds = float(np.median(lap_times(lambda: run(settings.steps, settings.batch_size), SAMPLE_REPEATS, device)))
    report["figures"].update(decoded_s=seconds, decoded_images_per_s=settings.batch_size / seconds)
    add_row(report, "DDIM + decode", f"{settings.batch_size / seconds:.2f} img/s end to end (sample.sample_share: "
                                     f"noise, sampling, {settings.vae_arch} decoder ch {settings.vae_ch}, uint8)")


# ----------------------------------------------------------------------------------------------------------------
# lpl-subbatch: the cost and the noise of LPL on a random k of the gated samples (unbiased, reweighted)
# ----------------------------------------------------------------------------------------------------------------

def subbatch_inputs(settings, ae, device):
    """A fixed batch: z0 ~ N(0, 1), t from train.py's distribution, and the z0_hat of a stand-in network whose eps
    prediction is off by PREDICTION_ERROR * N(0, 1) (Table 1's x0_from_pred)."""
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch_size, ae.latent_channels, settings.resolution // 8, settings.resolution // 8)
    diffusion = Diffusion("eps")
    z0, noise, error = (torch.randn(shape, generator=generator) for _ in range(3))
    t = diffusion.sample_t(settings.batch_size, generator=generator)  # (B,) on the CPU: the gate needs no sync
    zt = diffusion.add_noise(z0, noise, t)
    z0_hat = diffusion.x0_from_pred(zt, noise + PREDICTION_ERROR * error, t)
    return z0_hat.to(device), z0.to(device), diffusion.sigma_ratio(t)


def lpl_value_and_gradient(lpl, z0_hat, z0, ratio, dtype, generator=None):
    """(loss, d loss / d z0_hat): what the loss hands back to the network."""
    z0_hat = z0_hat.clone().requires_grad_(True)
    with autocast(z0.device, dtype):
        loss, _ = lpl(z0_hat, z0, ratio, generator=generator)
    loss.backward()
    return loss.detach().float(), z0_hat.grad.float()


def benchmark_lpl_subbatch(settings):
    device, report = start_report("lpl-subbatch", settings)
    ae = random_autoencoder(settings, device)
    z0_hat, z0, ratio = subbatch_inputs(settings, ae, device)

    def lpl_of(max_samples):
        return LatentPerceptualLoss(ae, n_blocks=settings.lpl_blocks, threshold=settings.lpl_threshold,
                                    max_samples=max_samples)

    full = lpl_of(None)
    gated = len(full.gate(ratio, settings.resolution)[0])
    if gated == 0:
        raise UserError(f"no sample of the batch passes the gate (tau {full.tau(settings.resolution):g}); raise "
                        "--batch-size or --lpl-threshold, or change --seed")
    lpl_value_and_gradient(full, z0_hat, z0, ratio, settings.dtype)  # warm-up
    results = {}
    full_s = float(np.mean(lap_times(lambda: results.update(full=lpl_value_and_gradient(
        full, z0_hat, z0, ratio, settings.dtype)), settings.repeats, device)))
    full_loss, full_grad = results["full"]
    full_loss, full_norm = full_loss.item(), full_grad.norm().item()
    add_row(report, "full batch", f"{gated} of {settings.batch_size} samples gated; LPL {full_loss:.4g}, "
                                  f"|grad| {full_norm:.4g}; LPL forward + backward {full_s * 1000:.1f} ms")
    rows = []
    for k in settings.max_samples:
        lpl, generator, draws = lpl_of(k), torch.Generator().manual_seed(settings.seed), []
        seconds = float(np.mean(lap_times(lambda: draws.append(lpl_value_and_gradient(
            lpl, z0_hat, z0, ratio, settings.dtype, generator)), settings.repeats, device)))
        # float64: numpy's float32 std of identical losses (k >= gated: the full batch every draw) is not 0
        losses = torch.stack([loss for loss, _ in draws]).double().cpu().numpy()
        norms = np.array([grad.norm().item() for _, grad in draws])
        errors = np.array([(grad - full_grad).norm().item() for _, grad in draws])
        row = dict(max_samples=k, decoded=min(k, gated), seconds=seconds, time_ratio=seconds / full_s,
                   loss_mean_ratio=float(losses.mean() / full_loss), loss_std_ratio=float(losses.std() / full_loss),
                   grad_norm_std_ratio=float(norms.std() / full_norm),
                   grad_error_ratio=float(errors.mean() / full_norm))
        rows.append(row)
        add_row(report, f"k = {k}", f"{row['decoded']} decoded, {seconds * 1000:.1f} ms ({row['time_ratio']:.2f}x); "
                                    f"over {settings.repeats} subsets: loss mean {row['loss_mean_ratio']:.3f}x, std "
                                    f"{row['loss_std_ratio']:.3f}x the full loss; |grad| std "
                                    f"{row['grad_norm_std_ratio']:.3f}x, mean |grad - full grad| "
                                    f"{row['grad_error_ratio']:.3f}x the full |grad|")
    report["figures"].update(gated=gated, full_loss=full_loss, full_grad_norm=full_norm, full_s=full_s, subsets=rows)
    return report


# ----------------------------------------------------------------------------------------------------------------
# lpl: LPL's forward and backward alone, part by part, and what its terms keep for the backward pass
# ----------------------------------------------------------------------------------------------------------------

LPL_PARTS = ("decoder forward, both branches", "outlier masks", "normalisation and terms", "backward")


def lpl_parts(lpl, z0_hat, z0, dtype):
    """One LPL forward + backward on already-gated latents, as lpl.forward runs it, with a mark after each part."""
    device = z0.device
    z0_hat = z0_hat.clone().requires_grad_(True)
    marks = [mark(device)]
    with autocast(device, dtype):
        phi, phi_hat = lpl.features(z0_hat, z0)
        marks.append(mark(device))
        masks = lpl.masks(phi, phi_hat)
        marks.append(mark(device))
        loss = torch.stack(lpl.layer_terms(phi, phi_hat, masks)).sum() / len(z0)
        marks.append(mark(device))
    loss.backward()
    marks.append(mark(device))
    return marks


def saved_bytes(fn):
    """Bytes autograd saves for the backward pass while fn() runs (torch.autograd.graph.saved_tensors_hooks), each
    tensor counted once."""
    saved = {}

    def pack(tensor):
        saved[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)] = \
            tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values())


def lpl_saved_bytes(lpl, z0_hat, z0, dtype):
    """Saved-for-backward bytes of each layer's term (normalisation, mask product, distance), and of the decoder's
    prediction branch, at these latents."""
    z0_hat = z0_hat.clone().requires_grad_(True)
    with autocast(z0.device, dtype):
        decoder = saved_bytes(lambda: lpl.features(z0_hat, z0))
        phi, phi_hat = lpl.features(z0_hat, z0)
        masks = lpl.masks(phi, phi_hat)
        layers = [saved_bytes(lambda: lpl.layer_terms([phi[l]], [phi_hat[l]], [masks[l]])) for l in range(len(phi))]
    return decoder, layers, [tuple(p.shape[1:]) for p in phi]


def benchmark_lpl(settings):
    """LPL on `gated` samples that all pass the gate: the median time of each part over the timed repeats (marks
    between parts: CUDA events on a GPU, so the parts queue as in training), the whole step timed without marks,
    peak memory, and the bytes each layer's term keeps for the backward pass. Medians: a shared CPU has outliers."""
    device, report = start_report("lpl", settings)
    figures, ae = report["figures"], random_autoencoder(settings, device)
    exact = dict(quantile_samples=None) if settings.exact_quantiles else {}  # else lpl.py's default
    lpl = LatentPerceptualLoss(ae, n_blocks=settings.lpl_blocks, norm=settings.norm, mask_from=settings.mask_from,
                               checkpointing=settings.checkpointing, compile=settings.compile, **exact)
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.gated, ae.latent_channels, settings.resolution // 8, settings.resolution // 8)
    z0 = torch.randn(shape, generator=generator).to(device)
    z0_hat = z0 + PREDICTION_ERROR * torch.randn(shape, generator=generator).to(device)
    ratio = torch.zeros(settings.gated)  # sigma/alpha = 0: every sample passes the gate
    step = functools.partial(lpl_value_and_gradient, lpl, z0_hat, z0, ratio, settings.dtype)
    for _ in range(settings.warmup):  # with --compile, the first call compiles
        step()
    free_memory(device)
    reset_peak_memory(device)
    step_s = float(np.median(lap_times(step, settings.repeats, device)))
    peak = peak_memory_gib(device)
    runs = [lpl_parts(lpl, z0_hat, z0, settings.dtype) for _ in range(settings.repeats)]
    synchronize(device)
    parts = {name: float(np.median([seconds_between(marks[i], marks[i + 1]) for marks in runs]))
             for i, name in enumerate(LPL_PARTS)}
    decoder, layers, shapes = lpl_saved_bytes(lpl, z0_hat, z0, settings.dtype)
    forward, backward = decoder_flops(settings.vae_arch, settings.vae_ch, shape[1:], settings.lpl_blocks)
    figures.update(step_s=step_s, parts_s=parts, peak_gib=peak, decoder_saved_bytes=decoder,
                   layer_saved_bytes=layers, layer_shapes=shapes, decoder_forward_flops=forward,
                   decoder_backward_flops=backward)
    quantiles = f"quantiles of {lpl.quantile_samples} pixels per map"
    if settings.exact_quantiles:
        quantiles = "exact quantiles"
    options = [settings.dtype, f"norm {settings.norm}", f"mask from {settings.mask_from}", quantiles]
    options += [name for name in ("checkpointing", "compile") if getattr(settings, name)]
    add_row(report, "setting", f"{settings.vae_arch} decoder ch {settings.vae_ch} (random weights), "
                               f"{settings.resolution} px, {settings.gated} gated samples, {settings.lpl_blocks} "
                               f"blocks; {', '.join(options)}")
    memory = f"{peak:.2f} GiB" if peak is not None else "n/a (CPU)"
    add_row(report, "LPL forward + backward", f"{step_s * 1000:.1f} ms (median of {settings.repeats}, no marks), "
                                              f"peak memory {memory}")
    total = sum(parts.values())
    for name, seconds in parts.items():
        add_row(report, f"  {name}", f"{seconds * 1000:.1f} ms ({100 * seconds / total:.0f}%)")
    decoder_s = parts[LPL_PARTS[0]]
    add_row(report, "  decoder FLOP/s", f"{settings.gated * 2 * forward / decoder_s / 1e12:.3f} TFLOP/s in the "
                                        f"forward part ({gflops(forward)} per latent and branch, FlopCounterMode)")
    for l, (size, shape_l) in enumerate(zip(layers, shapes)):
        elements = settings.gated * math.prod(shape_l)
        add_row(report, f"saved for backward, layer {l}", f"{size / 2 ** 20:.2f} MiB ({size / elements:.2f} B per "
                                                          f"element of the {'x'.join(map(str, shape_l))} map)")
    unseen = ", plus the stage inputs the checkpoints hold, unseen by the hooks" if settings.checkpointing else ""
    add_row(report, "saved for backward, all terms", f"{sum(layers) / 2 ** 20:.2f} MiB (decoder's prediction "
                                                     f"branch: {decoder / 2 ** 20:.2f} MiB{unseen})")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def add_common(parser, dtype=True):
    if dtype:
        parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                            help="autocast precision and decoder dtype (default bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def add_model_flags(parser):
    parser.add_argument("--model", choices=list(MODELS), default="XL/2", help="MMDiT size")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents: / 8)")
    parser.add_argument("--batch-size", type=int, default=32, help="per GPU (the paper's 32)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak FLOP/s for MFU, in TFLOP/s (default: the bf16 table, by GPU name)")


def add_vae_flags(parser, blocks=True):
    parser.add_argument("--vae-arch", choices=list(KL_ARCHS), default="sdxl",
                        help="KL decoder layout (random weights): sdxl is the paper's ablation autoencoder")
    parser.add_argument("--vae-ch", type=int, default=None, help="decoder base width (default: the arch's, 128)")
    if blocks:
        parser.add_argument("--lpl-blocks", type=int, default=5, help="decoder taps (Fig. 7)")
        parser.add_argument("--lpl-threshold", type=float, default=4.0, help="tau at 256 px (Fig. 6)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train.py's step without and with LPL: time, memory, FLOPs, MFU")
    add_model_flags(p)
    add_vae_flags(p)
    p.add_argument("--lpl-max-samples", type=int, default=None, help="LPL on a random k of the gated samples")
    p.add_argument("--lpl-checkpointing", action="store_true", help="checkpoint the decoder (recomputed backward)")
    p.add_argument("--lpl-compile", action="store_true", help="torch.compile the decoder (train.py --lpl-compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile the MMDiT (train.py --compile)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the MMDiT blocks")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each run")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    add_common(p)

    p = commands.add_parser("fid", help="Frechet distance vs scipy sqrtm; Inception feature throughput")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension of the Frechet distance")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each Frechet path (the best is kept)")
    p.add_argument("--inception-batch", type=int, default=50, help="images per Inception batch")
    p.add_argument("--inception-iters", type=int, default=3, help="timed Inception batches")
    add_common(p, dtype=False)

    p = commands.add_parser("sample", help="DDIM with guidance: images/s, model only and decoded")
    add_model_flags(p)
    add_vae_flags(p, blocks=False)
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance scale (1: no guidance, one forward per step)")
    p.add_argument("--decode", action="store_true", help="also time sample.py's sample-and-decode path")
    add_common(p)

    p = commands.add_parser("lpl-subbatch", help="LPL on a random k of the gated samples: time vs noise")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    add_vae_flags(p)
    p.add_argument("--max-samples", type=int, nargs="+", default=[4, 8, 16], help="the sub-batch sizes k")
    p.add_argument("--repeats", type=int, default=16, help="random subsets R per k")
    add_common(p)

    p = commands.add_parser("lpl", help="LPL forward + backward alone: time per part, saved-for-backward bytes")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--gated", type=int, default=24, help="samples that pass the gate (24 of 32 at tau 4)")
    add_vae_flags(p, blocks=False)
    p.add_argument("--lpl-blocks", type=int, default=5, help="decoder taps (Fig. 7)")
    p.add_argument("--norm", choices=NORMS, default="shared", help="lpl.py's norm")
    p.add_argument("--mask-from", choices=MASK_SOURCES, default="prediction", help="lpl.py's mask_from")
    p.add_argument("--exact-quantiles", action="store_true",
                   help="outlier-mask quantiles by kthvalue over every pixel")
    p.add_argument("--checkpointing", action="store_true", help="checkpoint the decoder (recomputed backward)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (LatentPerceptualLoss compile)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls (compilation happens here)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls")
    add_common(p)
    return parser


def check_settings(parser, settings):
    """Bad values as a clear error naming the flag."""
    for name in ("batch_size", "steps", "repeats", "dim", "inception_batch", "inception_iters", "gated"):
        if getattr(settings, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if getattr(settings, "warmup", 0) < 0:
        parser.error(f"--warmup must be non-negative, got {settings.warmup}")
    if getattr(settings, "peak_tflops", None) is not None and settings.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {settings.peak_tflops}")
    if hasattr(settings, "resolution"):
        patch = MODELS[settings.model]["patch_size"] if hasattr(settings, "model") else 1
        if settings.resolution < 8 * patch or settings.resolution % (8 * patch):
            parser.error(f"--resolution {settings.resolution}: must be a positive multiple of {8 * patch} "
                         f"(8x down-sampling, then patches of {patch})")
    if hasattr(settings, "vae_arch"):
        settings.vae_ch = settings.vae_ch if settings.vae_ch is not None else KL_ARCHS[settings.vae_arch]["ch"]
        if settings.vae_ch < 32 or settings.vae_ch % 32:
            parser.error(f"--vae-ch {settings.vae_ch}: must be a positive multiple of 32 (GroupNorm of 32 groups)")
    if hasattr(settings, "lpl_blocks"):
        taps = len(KL_ARCHS[settings.vae_arch]["ch_mult"]) + 1  # the mid block + each up block
        if not 1 <= settings.lpl_blocks <= taps:
            parser.error(f"--lpl-blocks {settings.lpl_blocks}: the {settings.vae_arch} decoder has taps 1..{taps}")
    for k in [getattr(settings, "lpl_max_samples", None)] + list(getattr(settings, "max_samples", None) or []):
        if k is not None and k < 1:
            parser.error(f"--lpl-max-samples / --max-samples must be at least 1, got {k}")


def parse_args(argv):
    """argv -> settings, with defaults filled and argv kept (every report cites its exact command)."""
    parser = build_parser()
    settings = parser.parse_args(argv)
    check_settings(parser, settings)
    if hasattr(settings, "dtype") and settings.dtype is None:
        settings.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    settings.argv = list(argv)
    return settings


def settings_dict(settings):
    return {k: v for k, v in vars(settings).items() if k != "argv"}


BENCHMARKS = {"train": benchmark_train, "fid": benchmark_fid, "sample": benchmark_sample,
              "lpl-subbatch": benchmark_lpl_subbatch, "lpl": benchmark_lpl}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_args(argv)
    with one_line_errors(f"bench.py {settings.command}: "):  # bad inputs: one line, no traceback
        report = BENCHMARKS[settings.command](settings)
    print(format_report(report))
    if settings.json:
        write_text(settings.json, json.dumps(json_ready(report), indent=1))
        print(f"wrote {settings.json}")
    return report


if __name__ == "__main__":
    main()
