"""The A/B of LPL post-training on photos, over folds of held-out photos and a sweep of w_LPL and the normalisation:
the paper's recipe (Sec. 4.1, Table 4) and its Fig. 9 trade-off, at toy scale.

    python replicate.py --out runs/ab                     # the README's CPU run (preset cpu)
    python replicate.py --out runs/ab-quick --quick       # a few minutes: the same code, figures not to be claimed
    python replicate.py --out runs/ab-gpu --preset gpu    # 128 px, S/2, three post-training seeds per arm
    python replicate.py --out runs/ab --post-steps 500 --folds 4   # any flag overrides the preset's value
    python replicate.py --preset gpu --estimate           # the preset's FLOPs and estimated GPU minutes, no run

Folds: the photos (assets/photos, or --photos DIR), sorted by name, are cut into K contiguous blocks; fold k holds
block k out. Each fold pre-trains one MMDiT without LPL on random crops of its other photos (encoded by the bundled
taef2), post-trains from that checkpoint one arm without LPL and one per LPL setting (--lpl-weights with the paper's
shared statistics, and --target-l2-weight with the diffusers example's normalisation), same steps, seeds and data
order, and evaluates every arm on its held-out crops (validation.evaluate: the same rows and noise for each arm). A
change is LPL against no LPL, paired over the fold's rows; the tables give each fold's change and the mean over folds
+- its standard error over folds. Each arm's share of the loss, w_LPL L_LPL / L_tot over its post-training, comes
from its log. The samples of every arm are compared by their power spectra with the real held-out crops.

Writes OUT/replicate.md (the fold table of the paper's setting, the sweep table, the spectra), OUT/replicate.json,
OUT/tradeoff.png (in-gate HF error change against latent MSE change, per arm), OUT/spectra.png and OUT/spectra.json.
Finished runs in OUT are reused: after an interruption, rerun the same command.
"""

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import fid
import train
from autoencoder import load_autoencoder
from bench import add_row, counted_flops, default_device, expected_gated_fraction, format_report, json_ready, \
    new_report, settings_dict
from encode import list_images
from lpl import LatentPerceptualLoss
from model import MODELS, build_model
from plot import plot_spectra, plot_tradeoff, read_log
from runtime import UserError, load_checkpoint, one_line_errors, rgb_image, write_json, write_text
from sample import latents_to_uint8, mmdit_model_fn, model_from_checkpoint, sample_share, write_samples
from schedules import Diffusion
from validation import evaluate

# "cpu" is the README's run (<= 60 minutes on 2 cores); "quick" checks the whole path in a few minutes; "gpu" is
# sized by --estimate to stay under 8 minutes of one H100/H200 (it has not run on one yet).
REPLICATE_PRESETS = {
    "cpu": dict(resolution=64, model="demo", batch_size=32, lr=1e-3, pre_steps=1500, post_steps=200, seeds=[0],
                folds=3, lpl_weights=[0.3, 3.0], target_l2_weight=120.0, post_ema_decay=0.99,
                train_crops=64, val_crops=32, val_samples=128, val_draws=2, samples=64),
    "quick": dict(resolution=64, model="demo", batch_size=16, lr=1e-3, pre_steps=150, post_steps=20, seeds=[0],
                  folds=2, lpl_weights=[3.0], target_l2_weight=0.0, post_ema_decay=0.9,
                  train_crops=8, val_crops=4, val_samples=16, val_draws=1, samples=16),
    "gpu": dict(resolution=128, model="S/2", batch_size=128, lr=3e-4, pre_steps=1200, post_steps=400, seeds=[0, 1, 2],
                folds=3, lpl_weights=[3.0], target_l2_weight=0.0, post_ema_decay=0.998,
                train_crops=64, val_crops=32, val_samples=128, val_draws=8, samples=256),
}
PAPER_WEIGHT = 3.0  # w_LPL of the paper's recipe (Fig. 9): its arm gets the fold table
REPLICATE_FIGURES = ("diffusion", "latent_mse", "psnr", "hf_error", "hf_log_ratio", "lpl")
DIFFERENCES = ("hf_log_ratio", "psnr")  # changes of these are differences (log10 units, dB), of the others percent
EVAL_BATCH = 64  # rows (and samples) per batch of the evaluation and the spectra
SAMPLE_STEPS = 50  # DDIM steps of the generated images


def arms_of(settings):
    """Arm name -> the train.py flags of its post-training: no LPL; LPL at each of --lpl-weights with the paper's
    shared statistics; LPL with target-l2 normalisation at --target-l2-weight (none when 0)."""
    arms = {"base": []}
    for weight in settings.lpl_weights:
        arms[f"lpl-w{weight:g}"] = ["--lpl", "--lpl-weight", f"{weight:g}"]
    if settings.target_l2_weight > 0:
        weight = f"{settings.target_l2_weight:g}"
        arms[f"lpl-target-l2-w{weight}"] = ["--lpl", "--lpl-norm", "target-l2", "--lpl-weight", weight]
    return arms


def paper_arm(arms):
    """The arm of the paper's setting (w_LPL 3, shared statistics), else the first LPL arm."""
    return f"lpl-w{PAPER_WEIGHT:g}" if f"lpl-w{PAPER_WEIGHT:g}" in arms else list(arms)[1]


def fold_photos(photos, folds):
    """The held-out photos of each fold: `folds` contiguous blocks of the sorted photos (of the 12 bundled ones in
    3 folds, the last block is kodim09-12, the demo's held-out set)."""
    return [photos[k * len(photos) // folds:(k + 1) * len(photos) // folds] for k in range(folds)]


# ----------------------------------------------------------------------------------------------------------------
# The steps: data, one training run, one evaluation, the spectra
# ----------------------------------------------------------------------------------------------------------------

def replicate_data(out, settings, photos, held_out, log=print):
    """(train, val) flat-file datasets of the photos' crops, held_out for validation, in OUT/data (cached)."""
    return data.build_demo_data(out / "data", resolution=settings.resolution, log=log, photos=photos,
                                held_out=held_out, crops=(settings.train_crops, settings.val_crops))


def replicate_train(out, train_data, settings, seed, steps, extra=()):
    """One train.py run in this process; returns its last checkpoint. A run that finished before is reused: the
    command can be rerun after an interruption."""
    if not (out / "checkpoints" / "last.pt").exists():
        shutil.rmtree(out, ignore_errors=True)
        train.main(["--data", str(train_data), "--out", str(out),
                    "--model", settings.model, "--steps", str(steps), "--global-batch-size", str(settings.batch_size),
                    "--lr", str(settings.lr), "--seed", str(seed), "--vae", str(data.DEMO_VAE),
                    "--ckpt-every", str(steps), "--log-every", str(max(1, steps // 20)), "--sample-every", "0",
                    *map(str, extra)])
    return out / "checkpoints" / "last.pt"


def lpl_share(log_path):
    """w_LPL L_LPL / L_tot over a run: (L_tot - L_diff) / L_tot, each summed over the log lines (equal periods)."""
    training, _ = read_log(log_path)
    total = sum(record["loss"] for record in training)
    return (total - sum(record["diffusion"] for record in training)) / total


def replicate_evaluate(path, val, ae, lpl, settings, device):
    """validation.evaluate on the EMA weights of a checkpoint with the preset's rows and noise draws (seed 0 for every
    arm: the same noise), and `settings.samples` generated images (EMA, 50 DDIM steps, seeds 0..n-1)."""
    model, diffusion = model_from_checkpoint(load_checkpoint(path), True, path)
    model.to(device)
    figures = evaluate(model, diffusion, val, ae, lpl, count=settings.val_samples, draws=settings.val_draws,
                       batch_size=EVAL_BATCH, seed=0, device=device, keep_rows=True)
    images, _ = sample_share(mmdit_model_fn(model), diffusion, ae.decode, val.latent_shape, range(settings.samples),
                             seed=0, batch_size=EVAL_BATCH, steps=SAMPLE_STEPS, device=device)
    return figures, images


def replicate_fold(out, photos, held_out, settings, arms, ae, lpl, device, log=print):
    """One fold: its data, its pre-training, every arm's post-trainings (one per seed) and their evaluations.
    Returns per arm the evaluations and LPL shares (one per seed) and the samples; and the held-out crops (uint8)
    with the autoencoder's reconstructions of them (the ceiling of every arm)."""
    train_data, val_data = replicate_data(out, settings, photos, held_out, log)
    pre = replicate_train(out / "pre", train_data, settings, 0, settings.pre_steps)
    val = data.LatentDataset(val_data, "--val-data")
    post_flags = ["--init-from", pre, "--ema-decay", settings.post_ema_decay]
    fold = dict(held_out=[photo.name for photo in held_out], per_seed={}, shares={}, samples={})
    for arm, extra in arms.items():
        fold["per_seed"][arm], fold["shares"][arm], fold["samples"][arm] = [], [], []
        for seed in settings.seeds:
            run = out / f"{arm}-seed{seed}"
            path = replicate_train(run, train_data, settings, seed, settings.post_steps, post_flags + extra)
            figures, images = replicate_evaluate(path, val, ae, lpl, settings, device)
            fold["per_seed"][arm].append(figures)
            fold["shares"][arm].append(lpl_share(run / "log.jsonl"))
            fold["samples"][arm].append(images)
    crops = sorted((val_data.parent / "images" / "val").glob("*.png"))
    fold["real"] = np.stack([np.asarray(rgb_image(Image.open(path))) for path in crops])
    with torch.no_grad():
        fold["reconstructions"] = latents_to_uint8(ae.decode(val.get(range(val.count))[0].to(device)))
    return fold


def replicate_spectra(sets, plot, json_path, device, log=print):
    """fid.py's power spectra of image sets (folders or .npz), the first the reference, each brought to the size
    of the reference's first image: the comparison (curves, differences, per-octave errors), also written to
    json_path, and its plot."""
    spectra, size = {}, None
    for path in sets:
        images = fid.open_images(path)
        result = fid.measure_images(images, device, EVAL_BATCH, workers=0, spectrum=True, spectrum_size=size)
        spectra[images.path.name], size = result["spectrum"], result["spectrum_size"]
        if result["spectrum_resized"]:
            log(f"{images.path.name}: {result['spectrum_resized']} images resized to {size[0]}x{size[1]}")
    comparison = dict(fid.compare_spectra(spectra), image_size=size)
    plot_spectra(plot, comparison, "Power spectra, reference " + comparison["reference"])
    write_json(json_path, comparison)
    return comparison


# ----------------------------------------------------------------------------------------------------------------
# Changes: paired within a fold, then over folds; the tables
# ----------------------------------------------------------------------------------------------------------------

def combine_seeds(records):
    """Per-seed evaluations -> one: the mean over seeds and, with several seeds, the standard error over seeds
    (with one, the evaluation's own standard error over rows)."""
    if len(records) == 1:
        return records[0]
    combined = dict(sigma_ratio=records[0]["sigma_ratio"])
    for name in REPLICATE_FIGURES:
        columns = list(zip(*[record[name] for record in records])) if name in records[0] else []
        combined[name] = [None if None in c else float(np.mean(c)) for c in columns]
        combined[f"{name}_se"] = [None if None in c else float(np.std(c, ddof=1) / math.sqrt(len(c)))
                                  for c in columns]
    return combined


def paired_change(base_records, lpl_records, name, level):
    """LPL against no LPL for one figure at one level: the relative change of its mean in percent (for the
    DIFFERENCES, the difference) and the standard error of that change. Both arms are evaluated on the same rows with
    the same noise, so with one seed the error is over the per-row differences; with several, over the seeds'."""
    changes, errors = [], []
    for base, lpl in zip(base_records, lpl_records):
        b = np.array(base["rows_of"][name][level])
        d = np.array(lpl["rows_of"][name][level]) - b
        scale = 1.0 if name in DIFFERENCES else abs(b.mean()) / 100  # in percent
        changes.append(d.mean() / scale)
        errors.append(d.std(ddof=1) / math.sqrt(len(d)) / scale)
    if len(changes) == 1:
        return changes[0], errors[0]
    return float(np.mean(changes)), float(np.std(changes, ddof=1) / math.sqrt(len(changes)))


def fold_changes(folds, arm, name, level):
    """(the change of `arm` against no LPL in each fold, their mean, its standard error over folds). None where the
    figure is not defined at this level (the LPL distance above the gate)."""
    if folds[0]["per_seed"]["base"][0].get(name, [None] * (level + 1))[level] is None:
        return None
    changes = [paired_change(fold["per_seed"]["base"], fold["per_seed"][arm], name, level)[0] for fold in folds]
    error = float(np.std(changes, ddof=1) / math.sqrt(len(changes)))
    return changes, float(np.mean(changes)), error


def shown(change, error=None, name="hf_error"):
    """'+1.2%' or '+1.2 +- 0.3%' (for the DIFFERENCES: '+0.012 +- 0.003')."""
    if name in DIFFERENCES:
        return f"{change:+.3f}" + ("" if error is None else f" +- {error:.3f}")
    return f"{change:+.1f}" + ("%" if error is None else f" +- {error:.1f}%")


def fold_table(folds, arm):
    """Markdown: per noise level, the HF error change of `arm` in each fold and their mean +- standard error over
    folds; then the means +- errors over folds of the latent MSE, PSNR and LPL distance changes."""
    headers = [f"HF error, fold {k + 1} ({Path(fold['held_out'][0]).stem}-{Path(fold['held_out'][-1]).stem})"
               for k, fold in enumerate(folds)]
    rows = ["| sigma/alpha | " + " | ".join(headers) + " | HF error, mean over folds | latent MSE | PSNR, dB | "
            "LPL distance |", "|---" * (len(folds) + 5) + "|"]
    for i, level in enumerate(folds[0]["per_seed"]["base"][0]["sigma_ratio"]):
        per_fold, mean, error = fold_changes(folds, arm, "hf_error", i)
        cells = [shown(change) for change in per_fold] + [f"**{shown(mean, error)}**"]
        for name in ("latent_mse", "psnr", "lpl"):
            changes = fold_changes(folds, arm, name, i)
            cells.append("(gate closed)" if changes is None else shown(*changes[1:], name=name))
        rows.append(f"| {level:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep_rows(folds, arms):
    """Per LPL arm: its LPL share of the loss and its changes at sigma/alpha 0.5, 1 (in the gate at 64 px) and 8
    (above it), each (mean, standard error over folds)."""
    levels = folds[0]["per_seed"]["base"][0]["sigma_ratio"]
    rows = []
    for arm in list(arms)[1:]:
        shares = [float(np.mean(fold["shares"][arm])) for fold in folds]
        row = dict(arm=arm, flags=" ".join(map(str, arms[arm])), share=float(np.mean(shares)),
                   share_se=float(np.std(shares, ddof=1) / math.sqrt(len(shares))))
        for name, level in (("hf_error", 0.5), ("hf_error", 1.0), ("latent_mse", 1.0), ("hf_error", 8.0)):
            _, mean, error = fold_changes(folds, arm, name, levels.index(level))
            row[f"{name}@{level:g}"] = (mean, error)
        rows.append(row)
    return rows


def sweep_table(rows):
    """Markdown: a line per LPL arm (sweep_rows), each change the mean +- standard error over folds."""
    lines = ["| arm (post-training flags) | LPL share of L_tot | HF error, sigma/alpha 0.5 | HF error, 1 "
             "| latent MSE, 1 | HF error, 8 (gate closed) |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [shown(*row[key]) for key in ("hf_error@0.5", "hf_error@1", "latent_mse@1", "hf_error@8")]
        lines.append(f"| `{row['flags']}` | {100 * row['share']:.0f} +- {100 * row['share_se']:.0f}% | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def spectra_table(spectra):
    """Markdown: per image set, its mean |log10 difference| to the reference's power spectrum in each octave."""
    bands = len(next(iter(spectra["band_error"].values())))
    lines = ["| set | " + " | ".join(f"octave {i + 1}" for i in range(bands)) + " |", "|---" * (bands + 1) + "|"]
    for name, errors in spectra["band_error"].items():
        lines.append(f"| {name} | " + " | ".join(f"{e['mean_abs_log10_difference']:.3f}" for e in errors) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The whole experiment
# ----------------------------------------------------------------------------------------------------------------

def benchmark_replicate(settings, log=print):
    """Every fold (replicate_fold), then the changes over folds, the tables, the trade-off plot and the spectra of the
    pooled samples against the pooled held-out crops. Returns the report (bench.py's layout)."""
    device, out, started = default_device(), Path(settings.out), time.perf_counter()
    shown_settings = dict(settings_dict(settings), photo_files=[photo.name for photo in settings.photo_files])
    report = new_report("replicate", settings.argv, device, shown_settings, program="replicate.py")
    arms = arms_of(settings)
    ae = load_autoencoder(data.DEMO_VAE, device=device, verbose=False)
    lpl = LatentPerceptualLoss(ae)  # the LPL figure of every arm: the distance of the paper's setting
    folds = []
    for k, held_out in enumerate(fold_photos(settings.photo_files, settings.folds)):
        log(f"fold {k + 1} of {settings.folds}: holding out {', '.join(p.name for p in held_out)}")
        folds.append(replicate_fold(out / f"fold{k + 1}", settings.photo_files, held_out, settings, arms, ae, lpl,
                                    device, log))
    no_labels = np.zeros(0, np.int64)
    for arm in arms:
        images = np.concatenate([image for fold in folds for image in fold["samples"][arm]])
        write_samples(out / f"samples-{arm}.npz", images, no_labels, dict(arm=arm))
    for name in ("real", "reconstructions"):
        write_samples(out / f"held-out-{name}.npz", np.concatenate([fold[name] for fold in folds]), no_labels, {})
    sets = [out / "held-out-real.npz", *[out / f"samples-{arm}.npz" for arm in arms]]
    sets.append(out / "held-out-reconstructions.npz")
    spectra = replicate_spectra(sets, out / "spectra.png", out / "spectra.json", device, log)
    main_arm, sweep = paper_arm(arms), sweep_rows(folds, arms)
    plot_tradeoff(out / "tradeoff.png", [(row["flags"] or row["arm"], *row["latent_mse@1"], *row["hf_error@1"])
                                         for row in sweep],
                  "LPL against no LPL at sigma/alpha 1, mean +- s.e. over folds", "latent MSE change, %",
                  "HF error change, %")
    tables = dict(folds=fold_table(folds, main_arm), sweep=sweep_table(sweep), spectra=spectra_table(spectra))
    minutes = (time.perf_counter() - started) / 60
    report["figures"].update(minutes=minutes, main_arm=main_arm, sweep=sweep, tables=tables,
                             folds=[dict(held_out=f["held_out"], shares=f["shares"],
                                         arms={arm: combine_seeds(r) for arm, r in f["per_seed"].items()})
                                    for f in folds], spectra_band_error=spectra["band_error"])
    add_row(report, "wall time", f"{minutes:.1f} minutes ({settings.folds} folds, {len(arms)} arms, "
                                 f"{len(settings.seeds)} seeds)")
    text = (f"`{report['command']}` ({minutes:.1f} minutes)\n\n### `{' '.join(map(str, arms[main_arm]))}` against "
            f"no LPL, per fold\n\n{tables['folds']}\n\n### Every arm\n\n{tables['sweep']}\n\n### Power spectra "
            f"against the held-out crops (mean abs log10 difference, low to high octaves)\n\n{tables['spectra']}\n")
    write_text(out / "replicate.md", text)
    write_text(out / "replicate.json", json.dumps(json_ready(report), indent=1))
    log(text)
    return report


# ----------------------------------------------------------------------------------------------------------------
# The GPU preset's cost, from FLOP counts
# ----------------------------------------------------------------------------------------------------------------

GPU_EFFECTIVE_TFLOPS = 100  # assumed: ~10% of an H100/H200's bf16 dense peak for a small model (XL/2 measured 22-25%)
GPU_STEP_FLOOR_S = 0.015  # assumed: kernel launches bound a small model's step (eager, no torch.compile)
GPU_RUN_OVERHEAD_S = 10  # assumed: building, checking and saving each train.py run


def estimate(settings):
    """FLOPs of the whole run, counted from shapes (model forward and backward, LPL's decoder on the expected gated
    share, the evaluation's forwards and decodes), and its minutes on one GPU: the FLOPs at GPU_EFFECTIVE_TFLOPS but
    each step at least GPU_STEP_FLOOR_S, plus GPU_RUN_OVERHEAD_S per train.py run."""
    channels, side = 32, settings.resolution // 8  # taef2: 32 channels, / 8
    model = build_model(settings.model, in_channels=channels, input_size=side)
    ae = load_autoencoder(data.DEMO_VAE, verbose=False)
    z = torch.zeros(1, channels, side, side)
    with torch.no_grad():  # one sample, counted on the CPU
        forward = counted_flops(lambda: model(z, torch.zeros(1)))
        decoder = counted_flops(lambda: ae.decoder_features(z, ae.num_feature_blocks))
    gated = expected_gated_fraction(Diffusion(), 4.0 * settings.resolution / 256)
    per_step = dict(base=3 * forward * settings.batch_size,
                    lpl=(3 * forward + 4 * decoder * gated) * settings.batch_size)  # decoder: 2 forwards + backward
    lpl_arms, seeds = len(arms_of(settings)) - 1, len(settings.seeds)
    steps = settings.folds * (settings.pre_steps + seeds * settings.post_steps * (lpl_arms + 1))
    flops = settings.folds * (settings.pre_steps * per_step["base"]
                              + seeds * settings.post_steps * (per_step["base"] + lpl_arms * per_step["lpl"]))
    evaluations = settings.folds * seeds * (lpl_arms + 1)
    flops += evaluations * (settings.samples * (SAMPLE_STEPS * forward + decoder)
                            + settings.val_samples * settings.val_draws * 7 * (forward + decoder))
    train_runs = settings.folds + evaluations  # a pre-training per fold, then a post-training per evaluation
    seconds = max(flops / (GPU_EFFECTIVE_TFLOPS * 1e12), steps * GPU_STEP_FLOOR_S) + train_runs * GPU_RUN_OVERHEAD_S
    minutes = seconds / 60
    return dict(flops=flops, steps=steps, gated_fraction=gated, minutes=minutes)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

PRESET_FLAGS = (("resolution", int), ("model", str), ("batch_size", int), ("lr", float), ("pre_steps", int),
                ("post_steps", int), ("post_ema_decay", float), ("folds", int), ("target_l2_weight", float),
                ("train_crops", int), ("val_crops", int), ("val_samples", int), ("val_draws", int), ("samples", int))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="run folder (its finished runs are reused when rerun)")
    parser.add_argument("--preset", choices=list(REPLICATE_PRESETS), default="cpu", help="sizes: cpu (README), quick "
                        "or gpu")
    parser.add_argument("--quick", action="store_true", help="--preset quick: a few minutes, figures not to claim")
    parser.add_argument("--photos", help="a folder of photos (default: assets/photos)")
    parser.add_argument("--estimate", action="store_true", help="print the preset's FLOPs and GPU minutes; no run")
    for name, kind in PRESET_FLAGS:
        choices = list(MODELS) if name == "model" else None
        values = ", ".join(f"{preset} {REPLICATE_PRESETS[preset][name]}" for preset in REPLICATE_PRESETS)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, choices=choices, default=None,
                            help=f"default: the preset's ({values})")
    for name, kind, what in (("seeds", int, "post-training seeds per arm"), ("lpl_weights", float, "w_LPL of the "
                             "LPL arms with shared statistics")):
        values = ", ".join(f"{p} {' '.join(map(str, REPLICATE_PRESETS[p][name]))}" for p in REPLICATE_PRESETS)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, nargs="+", default=None,
                            help=f"{what} (default: the preset's, {values})")
    return parser


def parse_args(argv):
    """argv -> settings: what the flags leave open comes from the preset; bad values as an error naming the flag."""
    parser = build_parser()
    settings = parser.parse_args(argv)
    settings.preset = "quick" if settings.quick else settings.preset
    for name, value in REPLICATE_PRESETS[settings.preset].items():
        if getattr(settings, name) is None:
            setattr(settings, name, value)
    if settings.out is None and not settings.estimate:
        parser.error("--out is required (the run folder)")
    for name in ("batch_size", "pre_steps", "post_steps", "train_crops", "val_crops", "val_samples", "val_draws",
                 "samples"):
        if getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.folds < 2:
        parser.error(f"--folds must be at least 2 (each fold holds out 1/K of the photos), got {settings.folds}")
    if min(settings.lpl_weights) <= 0 or settings.target_l2_weight < 0:
        parser.error("--lpl-weights must be positive and --target-l2-weight >= 0 (0: no target-l2 arm)")
    patch = MODELS[settings.model]["patch_size"]
    if settings.resolution < 8 * patch or settings.resolution % (8 * patch):
        parser.error(f"--resolution {settings.resolution}: must be a positive multiple of {8 * patch} "
                     f"(8x down-sampling, then patches of {patch})")
    settings.argv = list(argv)
    return settings


def photo_files(settings):
    """The photos, sorted by name: --photos (any image files in it) or the bundled assets/photos."""
    folder = Path(settings.photos) if settings.photos else data.ASSETS / "photos"
    files = sorted(list_images(folder, "--photos")[0], key=lambda path: path.name)
    if len(files) < 2 * settings.folds:
        raise UserError(f"--photos {folder}: {len(files)} photos for {settings.folds} folds; each fold needs at "
                        f"least one to hold out and the others to train on (at least {2 * settings.folds} photos)")
    return files


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_args(argv)
    with one_line_errors("replicate.py: "):
        if settings.estimate:
            cost = estimate(settings)
            print(f"preset {settings.preset}: {cost['steps']} training steps, {cost['flops'] / 1e15:.1f} PFLOP, gated "
                  f"fraction {cost['gated_fraction']:.2f}: about {cost['minutes']:.1f} GPU minutes (at "
                  f"{GPU_EFFECTIVE_TFLOPS} TFLOP/s, at least {GPU_STEP_FLOOR_S * 1e3:g} ms a step, "
                  f"{GPU_RUN_OVERHEAD_S} s a run)")
            return cost
        settings.photo_files = photo_files(settings)
        report = benchmark_replicate(settings)
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
