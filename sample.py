"""Sampling: DDIM, Euler, DiT's ancestral DDPM and the flow models' SDE, with classifier-free guidance, and the CLI
that writes samples.npz for fid.py.

    python sample.py --ckpt run/checkpoints/last.pt --ema --num-samples 64 --out preview.npz --grid grid.png
    torchrun --nproc_per_node=8 sample.py --ckpt run/checkpoints/last.pt --ema --num-samples 50000 --out samples.npz
    # killed? the same command continues from the shards in samples.npz.parts/ (any --batch-size, any number of ranks)
    python sample.py --ckpt text.pt --context prompts.npy --num-samples 1000 --cfg 2.0 --out text.npz
    python sample.py --ckpt DiT-XL-2-256x256.pt --backbone dit --vae sd-vae-ft-ema.safetensors \
        --sampler ddpm --steps 250 --cfg 1.5 --cfg-channels 3 --out dit.npz                   # DiT's sampler
    python sample.py --ckpt SiT-XL-2-256x256.pt --backbone sit --vae sd-vae-ft-ema.safetensors \
        --sampler sde --steps 250 --cfg 1.5 --cfg-channels 3 --out sit.npz                    # SiT's
    python sample.py --ckpt last.pt --backbone repa --vae sd-vae-ft-ema.safetensors \
        --sampler sde --steps 250 --cfg 1.8 --guidance-interval 0 0.7 --out repa.npz         # REPA's

One time convention for every objective (schedules.py): x_t = alpha_t x_0 + sigma_t eps, t in [0, 1], t = 1 noise.
The network's prediction D gives both estimates of the pair, z0_hat = x0_from_pred and eps_hat = noise_from_pred
(Table 1), so the first two samplers run every objective:

    ddim   x_s = alpha_s z0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c n,  n ~ N(0, I)   (Song et al. 2021, Eq. 12)
           c = 0 (eta = 0) is deterministic DDIM; eta > 0 the stochastic family, eta = 1 ancestral DDPM.
           The update holds for any alpha / sigma path, flow's included.
    euler  x_s = x_t + (s - t) (alpha'_t z0_hat + sigma'_t eps_hat): an Euler step of the probability-flow ODE
           dx/dt = E[alpha' x_0 + sigma' eps | x_t]. For flow this is x_t + (s - t) v, the paper's Euler solver;
           on flow's straight path it is the same update as DDIM with eta = 0.
    ddpm   DDPM objectives: DiT's ancestral sampler (p_sample_loop) on its respaced grid, the learned variance of a
           network that predicts one (DiT's 4 extra channels), else beta_{t|s}            (ddpm_step)
    sde    flow: Euler-Maruyama on the reverse SDE of SiT and REPA, their grid and last deterministic step (sde_step)

The last step returns z0_hat at the last time above 0 (what DDIM and DDPM land on at s = 0: alpha = 1, sigma = 0);
the SDE's last step returns its mean, as SiT's and REPA's do.

Time grids (`sampling_times`): flow uses `steps` even intervals of [0, 1], moved by the resolution shift
diffusion.shift (SD3). DDPM uses a "trailing" subset of its 1000 training steps, k = 999, 979, ..., 19 for 50 steps
(diffusers' "trailing" spacing): evenly spaced, it includes t = 1, where sampling starts from pure noise, as Lin et al.
2024 (Sec. 3.3) require with zero terminal SNR; the older "leading" spacing starts at k = 981 and never shows the
network the noise level it is handed. With zero terminal SNR, alpha_1 = 0: v recovers z0_hat = -v there, but eps
cannot ((x - sigma eps) / alpha), and the Euler slope alpha' is infinite (alpha ~ sqrt(1 - t)). In those two cases
the grid starts at the first training step below t = 1 (k = 998), with the noise taken as x_t there. The ddpm and
sde samplers walk their authors' grids instead (respaced_steps; linspace(1, 0.04, steps) then 0).

Guidance (guided_prediction): on the first cfg_channels channels of the prediction (DiT and SiT's published numbers
guide 3 of 4), and only at times inside guidance_interval (REPA: [0, 0.7]); outside it the network runs on the
conditional rows alone.

Reproducibility: sample i draws its initial noise (and the noise of the stochastic samplers) from its own numpy
generator, the i-th child of numpy.random.SeedSequence(seed): an independent stream for every (seed, i). (Not
torch.Generator seeded with seed * 2**32 + i: torch's CPU generator keeps only the low 32 bits of a seed, so every
--seed would give the same images.) Random class labels come from numpy.random.default_rng(seed). The images
therefore do not depend on the batch size, the number of ranks or the device, up to the floating-point differences
between kernels (on the CPU the npz comes out byte-identical, as the tests check; GPU kernels chosen by batch size
may differ by rounding).

Writing at scale (run, finished_shards, write_samples): before anything loads, --out and --grid are checked (not a
folder, a folder that exists or can be made, writable). Samples k S .. (k + 1) S - 1 (S = --shard-size) form shard k;
ranks take the unfinished shards in turn and write each whole (atomically) into the work folder OUT.parts/ as soon
as it is sampled, beside settings.json: everything the images depend on (meta, --labels, --context, the
checkpoint's size and step) and S. A killed run, rerun with the same command, samples only the missing shards,
with any --batch-size and number of ranks, and gives the same npz bytes as an uninterrupted run; a rerun with other
settings is refused in one line, naming what differs (remove OUT.parts/ to start over). Rank 0 then streams the
shards, 16 MiB at a time, into the npz's arr_0 member and removes OUT.parts/: no process holds more than a shard
of images (twice, while it is concatenated), whatever --num-samples. OUT.parts/ must be on a file system every rank
sees. A shard with NaN / Inf images stops the run, and no npz is written.
"""

import argparse
import json
import math
import shutil
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from autoencoder import load_autoencoder
from model import FILE_FORMATS, build_from_config, load_backbone
from runtime import (UserError, atomic_output, check_output_file, load_checkpoint, one_line_errors,
                     remove_stale_temporaries, setup_distributed, write_json, write_npy)
from schedules import Diffusion, resolution_shift, split_variance

SAMPLERS = ("ddim", "euler", "ddpm", "sde")
STOCHASTIC_SAMPLERS = ("ddpm", "sde")  # they draw noise at every step; ddim does with eta > 0
SDE_LAST_STEP = 0.04  # SiT's last_step_size and REPA's last grid time: the SDE's deterministic last step, 0.04 -> 0
GRID_MAX_IMAGES = 64
COPY_BYTES = 2**24  # how much of a shard the assembly of the npz holds at a time (16 MiB)


def default_cfg_scale(resolution):
    """The paper's guidance scales (Sec. 4.1, following DiT and LDM): 1.5 at 256, 2.0 at 512. Other resolutions take
    1.5 below 512 and 2.0 from 512 up."""
    return 1.5 if resolution < 512 else 2.0


# ----------------------------------------------------------------------------------------------------------------
# Time grids
# ----------------------------------------------------------------------------------------------------------------

def starts_below_one(diffusion, sampler):
    """True where t = 1 cannot be sampled from: a DDPM path with zero terminal SNR (alpha_1 = 0) under an eps
    network (z0_hat = (x - sigma eps) / alpha divides by zero) or under Euler (alpha' ~ 1 / sqrt(1 - t) blows up)."""
    ztsnr = not diffusion.is_flow and diffusion.zero_terminal_snr
    return ztsnr and (diffusion.objective == "eps" or sampler == "euler")


def respaced_steps(num_steps, steps):
    """The training steps k (ascending) that DiT's respace.space_timesteps(num_steps, str(steps)) keeps: k_i =
    round(c_i), c_0 = 0, c_{i+1} = c_i + (num_steps - 1) / (steps - 1), the sum accumulated in float64 and rounded
    half to even, as DiT does (for 283 of the counts 1..1000 that differs from round(i * stride) by one step)."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps={steps}: DiT's respacing keeps 1..{num_steps} of the {num_steps} training steps")
    stride = (num_steps - 1) / (steps - 1) if steps > 1 else 1
    position, kept = 0.0, []
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return kept


def sampling_times(diffusion, steps, sampler):
    """The steps + 1 times t_0 > t_1 > ... > t_steps = 0 the sampler visits, as Python floats.

    ddpm: DiT's respaced grid, t = (k + 1) / num_steps for k in respaced_steps, then 0.
    sde: SiT's and REPA's grid, linspace(1, 0.04, steps) then 0 (SiT's linspace(0, 1 - 0.04, steps) in its time),
    moved by diffusion.shift as the flow grid below (the identity at shift 1, SiT's and REPA's).
    flow: resolution_shift(linspace(1, 0, steps + 1), diffusion.shift).
    DDPM: the trailing spacing over the training grid t = n / num_steps (n = k + 1): n_i = round(top (1 - i / steps)),
    top = num_steps (t = 1) or num_steps - 1 (see starts_below_one), then 0.
    """
    if sampler == "ddpm":
        kept = respaced_steps(diffusion.num_steps, steps)
        return [(k + 1) / diffusion.num_steps for k in reversed(kept)] + [0.0]
    if sampler == "sde":
        grid = torch.linspace(1.0, SDE_LAST_STEP, steps, dtype=torch.float64)
        return resolution_shift(grid, diffusion.shift).tolist() + [0.0]
    if diffusion.is_flow:
        return resolution_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), diffusion.shift).tolist()
    top = diffusion.num_steps - 1 if starts_below_one(diffusion, sampler) else diffusion.num_steps
    if steps > top:
        raise ValueError(f"steps={steps} is more than the {top} training steps this DDPM schedule can sample from")
    fractions = 1.0 - torch.arange(steps, dtype=torch.float64) / steps
    grid_points = torch.round(top * fractions)  # distinct: they are at least top / steps >= 1 apart
    return (grid_points / diffusion.num_steps).tolist() + [0.0]


def path_coefficients(diffusion, t):
    """(alpha_t, sigma_t) at one time, as Python floats (computed in float64 on the CPU: no device sync)."""
    alpha, sigma = diffusion.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    return alpha.item(), sigma.item()


def path_slopes(diffusion, t, h=1e-7):
    """(d alpha / dt, d sigma / dt) just below t, the direction sampling moves: a one-sided difference in float64.
    Exact for flow's straight path; DDPM's abar is piecewise linear in t, so this is the slope of the step below t."""
    alpha, sigma = path_coefficients(diffusion, t)
    alpha_below, sigma_below = path_coefficients(diffusion, t - h)
    return (alpha - alpha_below) / h, (sigma - sigma_below) / h


# ----------------------------------------------------------------------------------------------------------------
# One step of each sampler
# ----------------------------------------------------------------------------------------------------------------

def ddim_step(diffusion, z0_hat, eps_hat, t, s, eta, noise_like):
    """Song et al. 2021, Eq. 12 for a general path: x_s = alpha_s z0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c n with
    c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2), the std of q(x_s | x_t, x_0) times eta
    (Eq. 16 when alpha^2 + sigma^2 = 1). noise_like(x) draws n."""
    alpha_t, sigma_t = path_coefficients(diffusion, t)
    alpha_s, sigma_s = path_coefficients(diffusion, s)
    x = alpha_s * z0_hat
    if eta == 0:
        return x + sigma_s * eps_hat
    snr_ratio = (alpha_t * sigma_s / (alpha_s * sigma_t)) ** 2  # SNR_t / SNR_s, in [0, 1] for s < t
    c = eta * sigma_s * math.sqrt(max(1.0 - snr_ratio, 0.0))
    return x + math.sqrt(max(sigma_s**2 - c**2, 0.0)) * eps_hat + c * noise_like(x)


def euler_step(diffusion, x, z0_hat, eps_hat, t, s):
    """x_s = x_t + (s - t) dx/dt with the probability-flow velocity dx/dt = alpha'_t z0_hat + sigma'_t eps_hat
    (for flow: -z0_hat + eps_hat = the predicted velocity v)."""
    alpha_slope, sigma_slope = path_slopes(diffusion, t)
    return x + (s - t) * (alpha_slope * z0_hat + sigma_slope * eps_hat)


def ddpm_step(diffusion, x, z0_hat, variance_values, t, s, noise_like):
    """DiT's ancestral step (p_sample, Ho et al. 2020 Alg. 2) from grid time t down to the respaced grid's previous
    time s > 0: x_s = mean + exp(log_variance / 2) n, with
        mean          the posterior mean of q(x_s | x_t, x_0 = z0_hat) (Eq. 7; z0_hat not clipped: DiT's
                      clip_denoised=False), Diffusion.posterior;
        log_variance  the learned range of the network's variance channels (Nichol & Dhariwal 2021, Eq. 15),
                      Diffusion.learned_log_variance; without them (variance_values None), log beta_{t|s} =
                      log(1 - abar_t / abar_s), DiT's FIXED_LARGE (frac = 1 in the same formula).
    t: (B,) times. At s = 0 the mean is z0_hat and DiT adds no noise: sample() returns z0_hat, so ADM's first-step
    variance rule (Diffusion.posterior's second_t) never enters a sample."""
    mean, _, _ = diffusion.posterior(z0_hat, x, t, s)
    if variance_values is None:
        variance_values = torch.ones_like(x)
    log_variance = diffusion.learned_log_variance(variance_values, t, s)
    return mean + torch.exp(0.5 * log_variance) * noise_like(x)


def sde_step(x, velocity, eps_hat, t, s, noise_like):
    """One Euler-Maruyama step of the reverse-time SDE of a flow model (REPA's euler_maruyama_sampler; SiT's
    Sampler.sample_sde with its integrators.sde, in this repository's time), from t down to s < t:
        dx = [v - g(t) / 2 score] dt + sqrt(g(t)) dw,     score = -eps_hat / sigma_t = (-(1 - t) v - x) / t
        x_s = x_t + (s - t) [v - g(t) / 2 score] + sqrt(g(t) (t - s)) n,        g(t) = 2 t
    v is the network's velocity (flow's prediction eps - x_0). The diffusion g = 2 t is REPA's compute_diffusion
    (their time is ours) and equally SiT's `--diffusion-form sigma --diffusion-norm 1`, the defaults of its sample.py
    and sample_ddp.py (g = 2 w, w = 1 - t_SiT = t): on Flow-OT's straight path they are one SDE. (SiT's
    Sampler.sample_sde default, SBDM, is infinite at the t0 = 0 of a velocity model and samples NaN.) noise_like
    None: the step's mean, without noise: SiT's "Mean" and REPA's last step (t = 0.04 -> 0)."""
    g = 2.0 * t
    score = -eps_hat / t
    mean = x + (s - t) * (velocity - 0.5 * g * score)
    if noise_like is None:
        return mean
    return mean + math.sqrt(g * (t - s)) * noise_like(x)


def standard_normal(shape, generator, dtype=torch.float32):
    """N(0, I) noise of `shape` from a torch.Generator (on its device) or a numpy.random.Generator (on the CPU)."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.standard_normal(shape, dtype=np.float32)).to(dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)


def row_noise(generator):
    """noise_like(x) for the stochastic DDIM: from one torch.Generator for the batch, from a list of one generator
    per row (torch or numpy: a row's noise then does not depend on the batch it is in), or the global RNG (None)."""
    def noise_like(x):
        if isinstance(generator, (list, tuple)):
            return torch.stack([standard_normal(x.shape[1:], g, x.dtype) for g in generator]).to(x.device)
        if generator is None:
            return torch.randn_like(x)
        return standard_normal(x.shape, generator, x.dtype).to(x.device)
    return noise_like


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance and the sampler
# ----------------------------------------------------------------------------------------------------------------

def guided_prediction(model_fn, x, t, cond, null_cond, cfg_scale, cfg_channels=None):
    """Ho & Salimans 2021: pred = null + w (cond - null), both halves in ONE forward of batch 2B (conditional rows
    first). w = 1 is the conditional prediction: one forward of batch B, the null half is never computed.

    cfg_channels: guide only the first c channels of the prediction; the rest come from the conditional half (DiT's
    and SiT's forward_with_cfg guide 3 of their 4 latent channels "for exact reproducibility", and so do their
    published numbers). None: all x.shape[1] channels. Channels after the prediction (DiT's variance channels)
    always come from the conditional half, as in DiT."""
    if cfg_scale == 1.0:
        return model_fn(x, t, cond).to(x.dtype)
    both = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond])).to(x.dtype)  # (2B, ...)
    pred_cond, pred_null = both.chunk(2)
    guided = x.shape[1] if cfg_channels is None else cfg_channels
    mixed = pred_null[:, :guided] + cfg_scale * (pred_cond[:, :guided] - pred_null[:, :guided])
    if guided == both.shape[1]:
        return mixed
    return torch.cat([mixed, pred_cond[:, guided:]], dim=1)


def check_sampler(sampler, eta, diffusion=None):
    """The one check of the sampler and its settings (sample() and the CLI both call it); with `diffusion`, also
    that the sampler fits its objective."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} or None, got {sampler!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta > 0 and sampler != "ddim":
        raise ValueError(f"eta={eta} is the stochastic DDIM: it needs sampler='ddim', got {sampler!r}")
    if diffusion is None:
        return
    if sampler == "ddpm" and diffusion.is_flow:
        raise ValueError("sampler 'ddpm' is DiT's ancestral sampler for DDPM objectives; this model is flow: use "
                         "sde, euler or ddim")
    if sampler == "ddpm" and starts_below_one(diffusion, sampler):
        raise ValueError("sampler 'ddpm' starts at t = 1 (DiT's grid), where an eps network with zero terminal SNR "
                         "cannot give z0 (alpha_1 = 0): use ddim")
    if sampler == "sde" and not diffusion.is_flow:
        raise ValueError(f"sampler 'sde' is the flow models' SDE (SiT, REPA); this model is DDPM-"
                         f"{diffusion.objective}: use ddpm or ddim")


def check_guidance(cfg_channels, guidance_interval, channels):
    """cfg_channels in 1..channels (or None: all), guidance_interval (low, high) with 0 <= low <= high <= 1."""
    if cfg_channels is not None and (isinstance(cfg_channels, bool) or not isinstance(cfg_channels, int)
                                     or not 1 <= cfg_channels <= channels):
        raise ValueError(f"cfg_channels must be an integer in 1..{channels} (the prediction's channels) or None, "
                         f"got {cfg_channels!r}")
    if len(guidance_interval) != 2 or not 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0:
        raise ValueError(f"guidance_interval must be (low, high) with 0 <= low <= high <= 1, got {guidance_interval}")


def check_sample_arguments(noise, steps, sampler, cfg_scale, cond, null_cond, eta, generator):
    """Every bad argument of sample() as one clear error, before any network call."""
    if noise.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"noise must be float32 or float64 (the sampler's state), got {noise.dtype}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if generator is not None and eta == 0 and sampler not in STOCHASTIC_SAMPLERS:
        raise ValueError(f"a generator is only used by the stochastic samplers (ddim with eta > 0, ddpm, sde); "
                         f"eta is 0 and the sampler {sampler!r}")
    if isinstance(generator, (list, tuple)) and len(generator) != len(noise):
        raise ValueError(f"generator is a list of {len(generator)}, expected one per row of noise ({len(noise)})")
    for name, value in (("cond", cond), ("null_cond", null_cond)):
        if torch.is_tensor(value) and value.shape[0] != noise.shape[0]:
            raise ValueError(f"{name} has {value.shape[0]} rows, noise has {noise.shape[0]}")
    if cfg_scale != 1.0:
        if cond is None or null_cond is None:
            raise ValueError(f"cfg_scale={cfg_scale} needs both cond and null_cond (guidance mixes the two)")
        if cond.shape != null_cond.shape:
            raise ValueError(f"cond {tuple(cond.shape)} and null_cond {tuple(null_cond.shape)} must have one shape")


@torch.no_grad()
def sample(model_fn, diffusion, noise, steps=50, sampler=None, cfg_scale=1.0, cond=None, null_cond=None, eta=0.0,
           generator=None, *, cfg_channels=None, guidance_interval=(0.0, 1.0)):
    """Integrate from `noise` (taken as x at the first time of the grid) down to the clean latent z0.

    model_fn(x, t, cond) -> the network's prediction (eps, v or velocity), t a (B,) float tensor in [0, 1]; a
        prediction of 2C channels for C latent channels carries DiT's variance channels after it (ddpm uses them).
    sampler: "ddim" | "euler" | "ddpm" (DDPM objectives) | "sde" (flow) | None (ddim for eps / v, euler for flow, as
        in the paper, Sec. 4.1).
    cfg_scale, cond, null_cond: classifier-free guidance, see guided_prediction; cond / null_cond are whatever
        model_fn takes ((B,) labels, (B, L, D) contexts), with B rows. null_cond is unused when cfg_scale == 1.
    cfg_channels: guide the first cfg_channels channels only (None: all); guidance_interval (low, high): guide only
        at steps whose t lies in [low, high] (REPA), elsewhere one forward of the conditional rows.
    eta, generator: stochastic DDIM (eta in (0, 1]); generator (also the noise of ddpm and sde) is a torch.Generator,
        a list of one generator per row (torch.Generator or numpy.random.Generator), or None for the global RNG.
    Returns z0_hat at the last step (sde: the last step's mean), in the noise's dtype (float32 or float64) whatever
    autocast the model runs in.
    """
    sampler = sampler if sampler is not None else ("euler" if diffusion.is_flow else "ddim")
    check_sampler(sampler, eta, diffusion)
    check_guidance(cfg_channels, guidance_interval, noise.shape[1])
    check_sample_arguments(noise, steps, sampler, cfg_scale, cond, null_cond, eta, generator)
    times = sampling_times(diffusion, steps, sampler)
    noise_like = row_noise(generator)
    low, high = guidance_interval
    x = noise
    for t, s in zip(times[:-1], times[1:]):
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
        scale = cfg_scale if low <= t <= high else 1.0
        output = guided_prediction(model_fn, x, t_batch, cond, null_cond, scale, cfg_channels)
        pred, variance_values = split_variance(output, x.shape[1])
        if sampler == "sde":
            eps_hat = diffusion.noise_from_pred(x, pred, t_batch)
            x = sde_step(x, pred, eps_hat, t, s, noise_like if s > 0 else None)
            continue
        z0_hat = diffusion.x0_from_pred(x, pred, t_batch)
        if s == 0.0:
            return z0_hat
        if sampler == "ddpm":
            x = ddpm_step(diffusion, x, z0_hat, variance_values, t_batch, s, noise_like)
            continue
        eps_hat = diffusion.noise_from_pred(x, pred, t_batch)
        if sampler == "ddim":
            x = ddim_step(diffusion, z0_hat, eps_hat, t, s, eta, noise_like)
        else:
            x = euler_step(diffusion, x, z0_hat, eps_hat, t, s)
    return x  # sde: the mean of its last step, t = 0.04 -> 0


# ----------------------------------------------------------------------------------------------------------------
# MMDiT adapter: cond -> y= or context=
# ----------------------------------------------------------------------------------------------------------------

def mmdit_model_fn(model, forward=None):
    """model_fn(x, t, cond) for an MMDiT `model(x, t, y=None, context=None)`: cond is passed as y= (class labels)
    when the model has num_classes, as context= (text embeddings) when it has context_dim, and must be None when
    it has neither. forward: the module that runs it, when that is not `model` itself (train.py passes the
    compiled or DDP-wrapped model, which hides the attributes read here)."""
    forward = model if forward is None else forward
    if model.num_classes and model.context_dim:
        raise ValueError("this sampler takes one condition per model: labels or context, not both")
    if model.num_classes:
        return lambda x, t, cond: forward(x, t, y=cond)
    if model.context_dim:
        return lambda x, t, cond: forward(x, t, context=cond)

    def unconditional(x, t, cond):
        if cond is not None:
            raise ValueError("this MMDiT has neither num_classes nor context_dim: cond must be None")
        return forward(x, t)
    return unconditional


def null_condition(model, cond):
    """The "no condition" input of classifier-free guidance: the extra label row model.num_classes for class models,
    an all-zero context for text models."""
    if model.num_classes:
        return torch.full_like(cond, model.num_classes)
    return torch.zeros_like(cond)


# ----------------------------------------------------------------------------------------------------------------
# Images: [-1, 1] floats -> uint8, grids, atomic files
# ----------------------------------------------------------------------------------------------------------------

def nonfinite_images(images):
    """(B,) bool: which images hold a NaN or an Inf."""
    return ~torch.isfinite(images).flatten(1).all(dim=1)


def latents_to_uint8(images):
    """Decoded images in [-1, 1], (B, 3, H, W) tensor -> uint8 (B, H, W, 3) numpy (the ADM evaluator's layout):
    round((x + 1) * 127.5), clipped to [0, 255]. Raises on NaN / Inf, which have no uint8 value."""
    bad = int(nonfinite_images(images).sum())
    if bad:
        raise ValueError(f"{bad} of {len(images)} images hold NaN/Inf values: no uint8 image for them")
    pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def save_grid(images, path, ncols=None):
    """uint8 (N, H, W, 3) numpy images -> one PNG, row by row, ncols wide (default ceil(sqrt(N))); black fills
    the last row."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"save_grid expects uint8 (N, H, W, 3) numpy images, got "
                         f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}")
    n, height, width, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * ncols, height, width, 3), dtype=np.uint8)
    grid[:n] = images
    grid = grid.reshape(nrows, ncols, height, width, 3).transpose(0, 2, 1, 3, 4)  # (rows, H, cols, W, 3)
    picture = Image.fromarray(grid.reshape(nrows * height, ncols * width, 3))
    with atomic_output(path) as temporary:
        picture.save(temporary, format="PNG")


@torch.no_grad()
def preview_images(model, diffusion, ae, latent_shape, conditions, seed, device):
    """A few samples to look at during training: noise from `seed`, 50 steps of the default sampler, the paper's
    guidance scale when `conditions` (one per image) are given -> uint8 (N, H, W, 3)."""
    count = 16 if conditions is None else len(conditions)
    noise = torch.randn((count, *latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    cond = null = None
    cfg_scale = 1.0
    if conditions is not None:
        cond = conditions.to(device)
        null = null_condition(model, cond)
        cfg_scale = default_cfg_scale(latent_shape[-1] * ae.downsample)
    z0 = sample(mmdit_model_fn(model), diffusion, noise, steps=50, cond=cond, null_cond=null, cfg_scale=cfg_scale)
    return latents_to_uint8(ae.decode(z0.to(ae.dtype)).float())


def npz_member(archive, key):
    """The member KEY.npy of an npz being written, as np.savez opens it: stored, zip64, zipfile's fixed 1980 date."""
    return archive.open(f"{key}.npy", "w", force_zip64=True)


def write_samples(path, images, labels, meta):
    """samples.npz: arr_0 uint8 (N, H, W, 3) (what the ADM evaluator reads), labels (N,) int64 (the class, the
    --context row, or -1 for an unconditional model: meta["labels"] says which), meta a JSON string.

    images: a uint8 array, or (shape, pieces): its shape and its bytes in C order, any iterable of bytes-like
    pieces, streamed into the member after its .npy header (no process need hold all images). Either way the file
    is byte for byte what np.savez writes of the whole array; written atomically."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"write_samples({path}): images must be uint8, got {images.dtype}")
        images = images.shape, [np.ascontiguousarray(images).reshape(-1)]
    shape, pieces = tuple(images[0]), images[1]
    header = dict(descr=np.lib.format.dtype_to_descr(np.dtype(np.uint8)), fortran_order=False, shape=shape)
    with atomic_output(path) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
        with npz_member(archive, "arr_0") as stream:
            np.lib.format.write_array_header_1_0(stream, header)
            written = sum(stream.write(piece) for piece in pieces)
        if written != math.prod(shape):
            raise ValueError(f"write_samples({path}): {written} bytes of images, expected {math.prod(shape)} for "
                             f"shape {shape}")
        for key, value in (("labels", np.asarray(labels)), ("meta", np.array(json.dumps(meta)))):
            with npz_member(archive, key) as stream:
                np.lib.format.write_array(stream, value, allow_pickle=False)


# ----------------------------------------------------------------------------------------------------------------
# Sampling one rank's share
# ----------------------------------------------------------------------------------------------------------------

def sample_generator(seed, index):
    """Sample `index`'s own generator, the index-th child of SeedSequence(seed): its noise does not depend on the
    batch, the rank or the device, and no two (seed, index) pairs share a stream."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def sample_share(model_fn, diffusion, decode, latent_shape, indices, seed, conditions=None, null_fn=None,
                 batch_size=32, steps=50, sampler=None, cfg_scale=1.0, eta=0.0, device="cpu", autocast_dtype=None,
                 progress=False, *, cfg_channels=None, guidance_interval=(0.0, 1.0)):
    """Sample, decode and convert the images of `indices` (sample numbers in the whole run).

    conditions: None or an array indexed by sample number ((num,) labels, (num, L, D) contexts: a numpy memmap is
        fine, rows are read batch by batch); null_fn(cond) -> the null condition (needed when cfg_scale != 1).
    decode(latents) -> images in [-1, 1]. autocast_dtype: torch.bfloat16 to run the network under autocast.
    cfg_channels, guidance_interval: see sample(). The stochastic samplers draw from each sample's own
        generator, as the initial noise does.
    Returns (uint8 (len(indices), H, W, 3), the number of decoded images that held NaN / Inf: those come back black).
    """
    device = torch.device(device)
    batches, nonfinite = [], 0
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress):
        batch = list(indices[start:start + batch_size])
        generators = [sample_generator(seed, i) for i in batch]
        noise = torch.stack([standard_normal(latent_shape, g) for g in generators]).to(device)  # (b, C, h, w)
        cond = null_cond = None
        if conditions is not None:
            cond = torch.from_numpy(np.ascontiguousarray(conditions[batch])).to(device)
            cond = cond.float() if cond.is_floating_point() else cond
            null_cond = null_fn(cond) if cfg_scale != 1.0 else None
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with autocast:
            stochastic = eta > 0 or sampler in STOCHASTIC_SAMPLERS
            z0 = sample(model_fn, diffusion, noise, steps, sampler, cfg_scale, cond, null_cond, eta,
                        generators if stochastic else None, cfg_channels=cfg_channels,
                        guidance_interval=guidance_interval)
        with torch.no_grad():
            images = decode(z0).float()  # (b, 3, H, W) in [-1, 1]
        bad = nonfinite_images(images)
        nonfinite += int(bad.sum())
        # a batch with NaN images is still counted to the end of the share; the caller refuses to write it
        batches.append(latents_to_uint8(images.masked_fill(bad[:, None, None, None], -1.0)))
    return np.concatenate(batches), nonfinite


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint, labels, distributed gather
# ----------------------------------------------------------------------------------------------------------------

def model_from_checkpoint(checkpoint, ema, path):
    """(model with the "ema" or "model" weights, Diffusion) of a train.py checkpoint: an MMDiT, or the DiT / SiT /
    REPA model its model_config names (model.build_from_config)."""
    weights = "ema" if ema else "model"
    model = build_from_config(checkpoint["model_config"])
    try:
        model.load_state_dict(checkpoint[weights])  # strict: its error lists every missing / unexpected key
    except RuntimeError as error:
        raise ValueError(f"{path}: ['{weights}'] does not fit its model_config: {error}") from error
    return model.eval().requires_grad_(False), Diffusion(**checkpoint["diffusion"])


def class_labels(args, num_classes, parser):
    """(num,) int64 labels: --labels cycled over the samples, --labels-per-class i mod num_classes (equal counts),
    else uniform draws from numpy.random.default_rng(seed)."""
    if args.labels is not None:
        try:
            chosen = [int(label) for label in args.labels.split(",")]
        except ValueError:
            parser.error(f"--labels must be comma-separated integers, got {args.labels!r}")
        outside = [label for label in chosen if not 0 <= label < num_classes]
        if outside:
            parser.error(f"--labels {outside} outside the model's classes 0..{num_classes - 1}")
        return np.resize(np.array(chosen, dtype=np.int64), args.num_samples)
    if args.labels_per_class:
        if args.num_samples % num_classes:
            parser.error(f"--labels-per-class needs --num-samples to be a multiple of the {num_classes} classes, "
                         f"got {args.num_samples}")
        return np.arange(args.num_samples, dtype=np.int64) % num_classes
    return np.random.default_rng(args.seed).integers(0, num_classes, args.num_samples, dtype=np.int64)


def text_contexts(args, context_dim, parser):
    """--context FILE.npy: one (L, D) embedding per sample, memory-mapped."""
    if args.context is None:
        parser.error(f"{args.ckpt} is a text-conditioned model (context_dim {context_dim}): give --context FILE.npy")
    contexts = np.load(args.context, mmap_mode="r")
    if contexts.ndim != 3 or contexts.shape[0] != args.num_samples or contexts.shape[2] != context_dim:
        parser.error(f"--context {args.context} has shape {contexts.shape}, expected ({args.num_samples}, L, "
                     f"{context_dim}): one embedding per sample (--num-samples) of the model's context_dim")
    return contexts


# ----------------------------------------------------------------------------------------------------------------
# Shards: each rank's images on disk as it goes, a killed run continued from them, the npz streamed from them
# ----------------------------------------------------------------------------------------------------------------

def work_folder(out):
    """OUT.parts/, beside --out: the shards of a run in progress and settings.json, what produced them."""
    return out.with_name(f"{out.name}.parts")


def shard_path(folder, index):
    return folder / f"shard-{index:06d}.npy"


def shard_ranges(num_samples, shard_size):
    """Shard k holds samples k S, ..., min((k + 1) S, num) - 1: runs of sample indices, so the npz is the shards
    one after the other, whichever rank sampled them."""
    return [range(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def finished_shards(out, settings, count, rank):
    """The indices of the shards of --out already sampled for `settings` (JSON values): a shard file that exists is
    whole (write_npy renames it into place). A work folder started with other settings is refused, never mixed in.
    Rank 0 records the settings of a new folder and removes the temporary files of writers a kill stopped. Every
    rank calls it before any rank writes a shard (a barrier after it), so all list the same shards."""
    folder, settings = work_folder(out), json.loads(json.dumps(settings))  # as settings.json gives them back
    record = folder / "settings.json"
    if record.is_file():
        started = json.loads(record.read_text())
        changed = sorted(key for key in settings.keys() | started.keys() if settings.get(key) != started.get(key))
        if changed:
            was = "; ".join(f"{key} {started.get(key)!r} there, {settings.get(key)!r} now" for key in changed)
            raise UserError(f"--out {out}: its work folder {folder} holds the shards of other settings ({was}): "
                            f"rerun the command that started it, or remove the folder to start over")
    elif folder.is_dir() and any(folder.glob("shard-*.npy")):
        raise UserError(f"--out {out}: its work folder {folder} holds shards but no settings.json: remove it")
    done = [k for k in range(count) if shard_path(folder, k).is_file()]
    if rank == 0:
        remove_stale_temporaries(folder)
        if not record.is_file():
            write_json(record, settings)
    return done


def sample_shards(out, todo, ranges, sample_range, progress):
    """Samples this rank's shards `todo`, writing each whole as soon as it is done."""
    folder = work_folder(out)
    with tqdm(total=sum(len(ranges[k]) for k in todo), unit="img", desc="sampling", disable=not progress) as bar:
        for k in todo:
            write_npy(shard_path(folder, k), sample_range(ranges[k]))
            bar.update(len(ranges[k]))


def read_npy_header(stream):
    """(shape, fortran_order, dtype) of the .npy file open in `stream`, leaving it at the start of the data."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)


def shard_bytes(folder, ranges, image_shape):
    """The images of all shards as raw bytes in sample-index order, COPY_BYTES at a time (never a whole shard)."""
    for k, indices in enumerate(ranges):
        with open(shard_path(folder, k), "rb") as shard:
            found, expected = read_npy_header(shard), ((len(indices), *image_shape), False, np.dtype(np.uint8))
            if found != expected:
                raise UserError(f"{shard.name} holds {found}, expected {expected}: remove {folder} to start over")
            while piece := shard.read(COPY_BYTES):
                yield piece


def first_images(folder, ranges, count):
    """The first `count` images of the run, read from its first shards (for the grid)."""
    taken = []
    for k in range(len(ranges)):
        missing = count - sum(len(images) for images in taken)
        if missing <= 0:
            break
        taken.append(np.array(np.load(shard_path(folder, k), mmap_mode="r")[:missing]))
    return np.concatenate(taken)


def assemble(out, grid, ranges, labels, meta):
    """Rank 0, once every shard is written: the npz streamed from the shards, the grid, then OUT.parts/ removed."""
    folder, image_shape = work_folder(out), (meta["resolution"], meta["resolution"], 3)
    shape = (ranges[-1].stop, *image_shape)
    write_samples(out, (shape, shard_bytes(folder, ranges, image_shape)), labels, meta)
    print(f"wrote {out}: {shape} uint8, {meta}")
    if grid:
        save_grid(first_images(folder, ranges, GRID_MAX_IMAGES), grid)
        print(f"wrote {grid}")
    shutil.rmtree(folder)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description="Sample a train.py checkpoint, or a released DiT / SiT / REPA "
                                                 "checkpoint (--backbone), into samples.npz (+ a PNG grid).")
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint written by train.py; with --backbone, a released DiT / SiT / REPA file")
    parser.add_argument("--backbone", choices=FILE_FORMATS, default=None,
                        help="--ckpt is a released file of this family (model.load_backbone); needs --vae, and "
                             "decodes with the autoencoder's own latent scaling (SD's 0.18215 for sd-vae-ft-*)")
    parser.add_argument("--ema", action="store_true", help="sample with the EMA weights instead of the raw ones")
    parser.add_argument("--vae", default=None, help="autoencoder weights (default: the checkpoint's args['vae'])")
    # not --num: torchrun's own parser takes "--num" for an abbreviation of its --numa-binding and stops
    parser.add_argument("--num-samples", type=int, default=50_000, help="number of images (50k for FID)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (network evaluations)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="guidance scale w >= 0 (default: 1.5 below 512 px, 2.0 from 512; 1 for unconditional "
                             "models); 0 is the unconditional prediction, 0 < w < 1 lies between the two")
    parser.add_argument("--cfg-channels", type=int, default=None,
                        help="guide only the first C latent channels, the rest from the conditional half (DiT's and "
                             "SiT's published numbers: 3); default: all")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="guide only at t in [LOW, HIGH], t = 1 noise (REPA: 0 0.7); default: 0 1, always")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.npz", help="output .npz (arr_0 uint8 NHWC, labels, meta)")
    parser.add_argument("--grid", default=None, help="also write a PNG grid of the first 64 images")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", default=None, help="class labels, e.g. 1,2,3, cycled over the samples")
    labels.add_argument("--labels-per-class", action="store_true",
                        help="equal counts per class: sample i gets class i mod num_classes")
    parser.add_argument("--context", default=None, help="(num, L, D) .npy text embeddings (text models)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward, per rank")
    parser.add_argument("--shard-size", type=int, default=256,
                        help="images per shard file in the work folder OUT.parts/: what a kill loses per rank, and "
                             "what bounds the images a process holds (two shards' worth)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="default: ddim for eps/v, euler for flow; ddpm: DiT's (DDPM models), sde: SiT's and "
                             "REPA's (flow models)")
    parser.add_argument("--eta", type=float, default=0.0, help="stochastic DDIM (Song et al. Eq. 12), in [0, 1]")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="network and decoder precision (default: bf16 on CUDA, fp32 on CPU)")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.steps < 1 or args.shard_size < 1:
        parser.error("--num-samples, --batch-size, --steps and --shard-size must be positive")
    if args.cfg is not None and not args.cfg >= 0:  # also NaN
        parser.error(f"--cfg must be >= 0 (0 is the unconditional prediction, 1 the conditional one; scales in "
                     f"between are legal), got {args.cfg}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative (numpy SeedSequence entropy), got {args.seed}")
    if Path(args.out).suffix != ".npz":
        parser.error(f"--out must end in .npz, got {args.out}")
    if args.cfg_channels is not None and args.cfg_channels < 1:
        parser.error(f"--cfg-channels must be at least 1, got {args.cfg_channels}")
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        parser.error(f"--guidance-interval LOW HIGH needs 0 <= LOW <= HIGH <= 1, got {args.guidance_interval}")
    if args.backbone is not None and args.vae is None:
        parser.error(f"--backbone {args.backbone}: give --vae (a released checkpoint names no autoencoder)")
    if args.backbone is not None and args.ema:
        parser.error("--ema: with --backbone, model.load_backbone takes a training checkpoint's 'ema' weights itself")
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    try:
        with one_line_errors():
            run(parser, args, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_model(args):
    """(model, diffusion, train.py checkpoint or None): --ckpt as a train.py checkpoint, or with --backbone as a
    released DiT / SiT / REPA file (model.load_backbone: the model in this repository's convention, and the process
    it was trained on)."""
    if args.backbone is None:
        checkpoint = load_checkpoint(args.ckpt)
        return (*model_from_checkpoint(checkpoint, args.ema, args.ckpt), checkpoint)
    return (*load_backbone(args.ckpt, args.backbone), None)


def sampler_settings(parser, args, diffusion, channels):
    """The checked sampler settings of the command line: {sampler, cfg_channels, guidance_interval}."""
    sampler = args.sampler or ("euler" if diffusion.is_flow else "ddim")
    try:
        check_sampler(sampler, args.eta, diffusion)
    except ValueError as error:
        parser.error(f"--sampler {sampler} (default: ddim for eps/v, euler for flow), --eta {args.eta}: {error}")
    if args.cfg_channels is not None and args.cfg_channels > channels:
        parser.error(f"--cfg-channels {args.cfg_channels}: the model predicts {channels} latent channels")
    return dict(sampler=sampler, cfg_channels=args.cfg_channels,
                guidance_interval=tuple(args.guidance_interval or (0.0, 1.0)))


def sampling_job(parser, args, rank, device):
    """Everything before the sampling: the model, the autoencoder and the condition of every sample, checked.
    -> (sample_range(indices) -> uint8 (n, H, W, 3) images of those sample indices, labels (num,), meta)."""
    model, diffusion, checkpoint = load_model(args)
    model.to(device)
    settings = sampler_settings(parser, args, diffusion, model.in_channels)
    vae = args.vae or checkpoint["args"].get("vae")
    if not vae:
        parser.error(f"no --vae given and {args.ckpt} has no args['vae'] to default to")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    precision = torch.bfloat16 if dtype == "bf16" else torch.float32  # never fp16: its range overflows in decoders
    # Decode with the latent scaling the training data was encoded with (train.py stores it from meta.json); a
    # released model with its autoencoder family's own (load_autoencoder's default), as DiT, SiT and REPA decode.
    scaling = (checkpoint or {}).get("latent_scaling") or {}
    try:
        autoencoder = load_autoencoder(vae, device=device, dtype=precision, shift_factor=scaling.get("shift_factor"),
                                       scaling_factor=scaling.get("scaling_factor"))  # frozen, in eval mode
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"--vae {vae}: {error}") from None
    if args.backbone is not None and rank == 0:
        print(f"--backbone {args.backbone}: decoding with {vae}'s own latent scaling {autoencoder.scaling_factor:g} "
              f"(shift {autoencoder.shift_factor:g}, family {autoencoder.family}), as DiT, SiT and REPA do")

    if autoencoder.latent_channels != model.in_channels:
        parser.error(f"--vae {vae} has {autoencoder.latent_channels} latent channels, {args.ckpt} expects "
                     f"in_channels={model.in_channels}")
    latent_shape = (model.in_channels, model.input_size, model.input_size)
    resolution = model.input_size * autoencoder.downsample
    trained_at = (checkpoint or {}).get("resolution")
    if trained_at is not None and trained_at != resolution:
        parser.error(f"--vae {vae} decodes {latent_shape} latents to {resolution} px, but {args.ckpt} was trained "
                     f"at {trained_at} px (checkpoint['resolution'])")

    # the condition of every sample, and what goes into the npz's labels
    model_fn = mmdit_model_fn(model)
    if (args.labels is not None or args.labels_per_class) and not model.num_classes:
        parser.error(f"--labels / --labels-per-class need a class-conditional model; {args.ckpt} has no num_classes")
    if args.context is not None and not model.context_dim:
        parser.error(f"--context needs a text-conditioned model; {args.ckpt} has no context_dim")
    if model.num_classes:
        conditions = labels = class_labels(args, model.num_classes, parser)
        label_kind = "list" if args.labels else "per-class" if args.labels_per_class else "random"
    elif model.context_dim:
        conditions = text_contexts(args, model.context_dim, parser)
        labels, label_kind = np.arange(args.num_samples, dtype=np.int64), "context-row"  # the row of --context
    else:
        conditions, labels, label_kind = None, np.full(args.num_samples, -1, dtype=np.int64), "none"
        if args.cfg not in (None, 1.0):
            parser.error(f"--cfg {args.cfg} needs a conditional model; {args.ckpt} is unconditional")
    cfg_scale = args.cfg if args.cfg is not None else default_cfg_scale(resolution) if conditions is not None else 1.0

    meta = dict(sampler=settings["sampler"], steps=args.steps, cfg=cfg_scale,
                cfg_channels=settings["cfg_channels"] or model.in_channels,
                guidance_interval=list(settings["guidance_interval"]), eta=args.eta,
                backbone=getattr(model, "backbone", None), seed=args.seed, checkpoint=str(args.ckpt), ema=args.ema,
                vae=str(vae), step=int(checkpoint["step"]) if checkpoint else None, objective=diffusion.objective,
                num=args.num_samples, dtype=dtype, resolution=resolution, labels=label_kind)

    def sample_range(indices):
        images, nonfinite = sample_share(
            model_fn, diffusion, lambda z: autoencoder.decode(z.to(precision)), latent_shape, indices, args.seed,
            conditions, lambda cond: null_condition(model, cond), args.batch_size, args.steps, settings["sampler"],
            cfg_scale, args.eta, device, autocast_dtype=torch.bfloat16 if dtype == "bf16" else None,
            cfg_channels=settings["cfg_channels"], guidance_interval=settings["guidance_interval"])
        if nonfinite:
            raise RuntimeError(f"{nonfinite} of {len(indices)} decoded images hold NaN/Inf (samples {indices.start} "
                               f"to {indices.stop - 1}): {args.out} not written")
        return images
    return sample_range, labels, meta


def check_output_paths(args):
    """--out, its work folder and --grid, before anything loads (runtime.check_output_file)."""
    out = Path(args.out)
    check_output_file(out, "--out")
    if work_folder(out).exists() and not work_folder(out).is_dir():
        raise UserError(f"--out {out}: its work folder {work_folder(out)} is a file; expected a folder or nothing")
    if args.grid is not None:
        check_output_file(args.grid, "--grid")


def work_settings(args, meta):
    """What the images of a shard depend on (meta, --labels, --context, the checkpoint's size), and the shard size.
    Not --batch-size nor the number of ranks: they change no image (on the CPU; see the module docstring)."""
    ckpt = Path(args.ckpt)
    return dict(meta, labels_given=args.labels, context=args.context, shard_size=args.shard_size,
                checkpoint_bytes=ckpt.stat().st_size if ckpt.is_file() else None)


def barrier(world_size):
    if world_size > 1:
        dist.barrier()


def run(parser, args, rank, world_size, device):
    check_output_paths(args)
    sample_range, labels, meta = sampling_job(parser, args, rank, device)
    out, ranges = Path(args.out), shard_ranges(args.num_samples, args.shard_size)
    done = finished_shards(out, work_settings(args, meta), len(ranges), rank)
    if done and rank == 0:
        print(f"{work_folder(out)}: {len(done)} of {len(ranges)} shards already sampled, sampling the rest")
    barrier(world_size)  # every rank has listed the finished shards before any rank writes one
    todo = sorted(set(range(len(ranges))) - set(done))[rank::world_size]
    sample_shards(out, todo, ranges, sample_range, progress=rank == 0)
    barrier(world_size)
    if rank == 0:
        assemble(out, args.grid, ranges, labels, meta)


if __name__ == "__main__":
    main()
