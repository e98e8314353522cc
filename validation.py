"""Validation in latent and in decoded space: what LPL is meant to move, measured at fixed noise levels with fixed
noise, so that two checkpoints (or two runs) are compared on the same inputs.

For each sigma/alpha in VAL_LEVELS (tau of LPL is 4 at 256 px) and the first rows of a validation set: the diffusion
loss, the latent MSE of z0_hat, and with an autoencoder the decoded z0_hat against the decoded z0: PSNR and the upper
octave of their radial power spectra (fid.upper_octave_log_ratio). train.py runs it on the EMA and the raw weights
(`--val-data`, `--eval-every`); replicate.py compares two arms row by row with it.
"""

import math

import torch

from fid import upper_octave_log_ratio
from sample import mmdit_model_fn, null_condition
from schedules import split_variance

VAL_LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0)  # sigma/alpha of the validation grid; tau is 4 at 256 px


@torch.no_grad()
def evaluate(model, diffusion, val, ae=None, lpl=None, levels=VAL_LEVELS, count=64, draws=1, batch_size=32,
             seed=0, device="cpu", autocast_dtype=None, keep_rows=False):
    """For each sigma/alpha in `levels` and the first `count` rows of `val` (no flips, null condition), with noise
    from its own generator (seed, draw): the diffusion loss, the latent MSE of z0_hat and, with an autoencoder,
    decoded z0_hat against decoded z0: PSNR (dB, peak-to-peak 2), and the upper octave of the radial power spectrum
    as log10 P(x0_hat) / P(x0) (fid.upper_octave_log_ratio), its mean ("hf_log_ratio": < 0 is missing detail) and
    its mean absolute value ("hf_error"); with LPL, its value at the levels its gate admits (None at the others). Each
    figure is a mean over rows of the per-row mean over draws; "<name>_se" is its standard error over rows;
    keep_rows: also the per-row means, record["rows_of"][name][level] (for paired comparisons)."""
    model_fn, rows, device = mmdit_model_fn(model), list(range(min(count, val.count))), torch.device(device)
    z0_all, cond_all = val.get(rows)
    if cond_all is not None:
        cond_all = null_condition(model, cond_all)
    per_row = {}  # name -> (levels, rows) sums over draws
    for draw in range(draws):
        noise_all = torch.randn(z0_all.shape, generator=torch.Generator().manual_seed(seed * 1000 + draw))
        for start in range(0, len(rows), batch_size):
            z0, noise = (x[start: start + batch_size].to(device) for x in (z0_all, noise_all))
            cond = None if cond_all is None else cond_all[start: start + batch_size].to(device)
            x0 = ae.decode(z0.to(ae.dtype)).float() if ae is not None else None
            for i, level in enumerate(levels):
                t = diffusion.t_from_sigma_ratio(torch.full((len(z0),), level)).float().to(device)
                zt = diffusion.add_noise(z0, noise, t)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    pred = split_variance(model_fn(zt, t, cond).float(), z0.shape[1])[0]
                z0_hat = diffusion.x0_from_pred(zt, pred, t)
                figures = dict(diffusion=(pred - diffusion.target(z0, noise, t)).square().mean((1, 2, 3)),
                               latent_mse=(z0_hat - z0).square().mean((1, 2, 3)))
                if ae is not None:
                    x0_hat = ae.decode(z0_hat.to(ae.dtype)).float()
                    figures["psnr"] = 10 * torch.log10(4 / (x0_hat.clamp(-1, 1) - x0).square().mean((1, 2, 3)))
                    log_ratio = upper_octave_log_ratio(x0_hat.clamp(-1, 1), x0.clamp(-1, 1))
                    figures.update(hf_log_ratio=log_ratio.mean(1), hf_error=log_ratio.abs().mean(1))
                if lpl is not None and level <= lpl.tau(val.resolution):  # per row, where the gate lets LPL act
                    figures["lpl"] = lpl.per_sample(z0_hat, z0)[0]
                for name, value in figures.items():
                    total = per_row.setdefault(name, torch.zeros(len(levels), len(rows), dtype=torch.float64))
                    total[i, start: start + len(z0)] += value.double().cpu()
    record = dict(sigma_ratio=list(levels), rows=len(rows), draws=draws)
    for name, total in per_row.items():
        mean = total / draws  # (levels, rows)
        se = mean.std(1) / math.sqrt(len(rows)) if len(rows) > 1 else torch.zeros(len(levels))
        acts = [name != "lpl" or level <= lpl.tau(val.resolution) for level in levels]  # None where LPL does not
        record[name] = [m if a else None for m, a in zip(mean.mean(1).tolist(), acts)]
        record[f"{name}_se"] = [s if a else None for s, a in zip(se.tolist(), acts)]
    if keep_rows:
        record["rows_of"] = {name: (total / draws).tolist() for name, total in per_row.items()}
    return record
