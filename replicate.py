"""The A/B of LPL post-training on the bundled photos: the paper's recipe (Sec. 4.1, Table 4) at toy scale.

    python replicate.py --out runs/ab                     # the README's CPU run (preset cpu)
    python replicate.py --out runs/ab-gpu --preset gpu    # larger, three post-training seeds per arm
    python replicate.py --out runs/ab --post-steps 500 --seeds 0 1   # any flag overrides the preset's value

It pre-trains one MMDiT without LPL on random crops of assets/photos (encoded by the bundled taef2), post-trains
from that checkpoint with and without LPL for the same steps and seeds, evaluates both arms on the held-out photos
(validation.evaluate: the same rows and noise for both) and compares the power spectra of their samples with the real
crops' (fid.py's spectrum functions). It writes OUT/replicate.md (the table: every figure at every noise level, each
arm's mean +- standard error and the paired change of LPL against no LPL), OUT/replicate.json, OUT/spectra.png and
OUT/spectra.json. Finished runs in OUT are reused: after an interruption, rerun the same command.

The steps, one function each: the data (replicate_data), one train.py run (replicate_train), the evaluation of one
checkpoint (replicate_evaluate), the spectra (replicate_spectra), combining seeds (combine_seeds, paired_change) and
the table (replicate_table); benchmark_replicate runs them in order.
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

import data
import fid
import train
from autoencoder import load_autoencoder
from bench import add_row, default_device, format_report, json_ready, new_report, settings_dict
from lpl import LatentPerceptualLoss
from model import MODELS
from plot import plot_spectra
from runtime import load_checkpoint, one_line_errors, write_json, write_text
from sample import latents_to_uint8, mmdit_model_fn, model_from_checkpoint, sample_share, write_samples
from validation import evaluate

# Both presets train on random crops of assets/photos through the bundled taef2 (data.build_demo_data) and evaluate
# on the held-out photos. "cpu" is the README's run; "gpu" is sized from FLOP estimates to take under 8 minutes on
# one H100 with three post-training seeds per arm, and has not been run yet.
REPLICATE_PRESETS = {
    "cpu": dict(resolution=64, model="demo", batch_size=32, lr=1e-3, pre_steps=1500, post_steps=1000, seeds=[0],
                post_ema_decay=0.995, val_samples=128, val_draws=4, samples=256),
    "gpu": dict(resolution=128, model="S/2", batch_size=128, lr=3e-4, pre_steps=1500, post_steps=800,
                seeds=[0, 1, 2], post_ema_decay=0.998, val_samples=128, val_draws=8, samples=512),
}
REPLICATE_FIGURES = ("diffusion", "latent_mse", "psnr", "hf_error", "hf_log_ratio", "lpl")
ARMS = {"base": [], "lpl": ["--lpl"]}  # arm -> the train.py flags of its post-training
EVAL_BATCH = 64  # rows (and samples) per batch of the evaluation and the spectra
SAMPLE_STEPS = 50  # DDIM steps of the generated images


# ----------------------------------------------------------------------------------------------------------------
# The steps: data, one training run, one evaluation, the spectra
# ----------------------------------------------------------------------------------------------------------------

def replicate_data(out, settings, log=print):
    """(train, val) flat-file datasets of the bundled photos' crops, in OUT/data (cached)."""
    return data.build_demo_data(out / "data", resolution=settings.resolution, log=log)


def replicate_train(out, train_data, val_data, settings, seed, steps, extra=()):
    """One train.py run in this process (its log has a validation at the end); returns its last checkpoint. A run
    that finished before is reused: the command can be rerun after an interruption."""
    if not (out / "checkpoints" / "last.pt").exists():
        shutil.rmtree(out, ignore_errors=True)
        train.main(["--data", str(train_data), "--val-data", str(val_data), "--out", str(out),
                    "--model", settings.model, "--steps", str(steps), "--global-batch-size", str(settings.batch_size),
                    "--lr", str(settings.lr), "--seed", str(seed), "--vae", str(data.DEMO_VAE),
                    "--ckpt-every", str(steps), "--log-every", str(max(1, steps // 20)), "--sample-every", "0",
                    "--val-samples", str(min(32, settings.val_samples)), *map(str, extra)])
    return out / "checkpoints" / "last.pt"


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
# Combining seeds and arms; the table
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
    """LPL against no LPL for one figure at one level: the relative change of its mean (for hf_log_ratio, the
    difference) and the standard error of that change. Both arms are evaluated on the same rows with the same noise,
    so with one seed the error is over the per-row differences; with several, over the seeds' changes."""
    changes, errors = [], []
    for base, lpl in zip(base_records, lpl_records):
        b = np.array(base["rows_of"][name][level])
        d = np.array(lpl["rows_of"][name][level]) - b
        scale = 1.0 if name == "hf_log_ratio" else abs(b.mean()) / 100  # in percent
        changes.append(d.mean() / scale)
        errors.append(d.std(ddof=1) / math.sqrt(len(d)) / scale)
    if len(changes) == 1:
        return changes[0], errors[0]
    return float(np.mean(changes)), float(np.std(changes, ddof=1) / math.sqrt(len(changes)))


def replicate_table(arms, per_seed):
    """Markdown: every figure at every noise level, mean +- standard error per arm, and LPL against no LPL."""
    rows = ["| sigma/alpha | figure | no LPL | LPL | LPL vs no LPL (paired) |", "|---|---|---|---|---|"]
    base, lpl = arms["base"], arms["lpl"]
    for i, level in enumerate(base["sigma_ratio"]):
        for name in REPLICATE_FIGURES:
            if name not in base or base[name][i] is None:
                continue
            shown = [f"{arm[name][i]:.4g} +- {arm[name + '_se'][i]:.2g}" for arm in (base, lpl)]
            change, error = paired_change(per_seed["base"], per_seed["lpl"], name, i)
            unit = "" if name == "hf_log_ratio" else "%"
            paired = f"{change:+.4g}{unit} +- {error:.2g}{unit}"
            rows.append(f"| {level:g} | {name} | {shown[0]} | {shown[1]} | {paired} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# The whole A/B
# ----------------------------------------------------------------------------------------------------------------

def benchmark_replicate(settings, log=print):
    """Pre-train without LPL, post-train from that checkpoint with and without LPL for the same steps (Sec. 4.1,
    Table 4; one pre-training, `seeds` post-trainings per arm), evaluate both arms on the held-out photos
    (validation.evaluate) and compare the power spectra of their samples with the real crops' (fid.py spectrum).
    Writes OUT/replicate.md, OUT/replicate.json and OUT/spectra.png. Returns the report (bench.py's layout)."""
    device, out, started = default_device(), Path(settings.out), time.perf_counter()
    report = new_report("replicate", settings.argv, device, settings_dict(settings), program="replicate.py")
    train_data, val_data = replicate_data(out, settings, log)
    pre = replicate_train(out / "pre", train_data, val_data, settings, 0, settings.pre_steps)
    val = data.LatentDataset(val_data, "--val-data")
    ae = load_autoencoder(data.DEMO_VAE, device=device, verbose=False)
    lpl = LatentPerceptualLoss(ae)  # the LPL figure of both arms: the distance the LPL arm is trained on
    per_seed, samples = {arm: [] for arm in ARMS}, {arm: [] for arm in ARMS}
    post_flags = ["--init-from", pre, "--ema-decay", settings.post_ema_decay]
    for seed in settings.seeds:
        for arm, extra in ARMS.items():
            path = replicate_train(out / f"{arm}-seed{seed}", train_data, val_data, settings, seed,
                                   settings.post_steps, post_flags + extra)
            figures, images = replicate_evaluate(path, val, ae, lpl, settings, device)
            per_seed[arm].append(figures)
            samples[arm].append(images)
    arms = {arm: combine_seeds(records) for arm, records in per_seed.items()}
    for arm, chunks in samples.items():
        write_samples(out / f"samples-{arm}.npz", np.concatenate(chunks), np.zeros(0, np.int64), dict(arm=arm))
    with torch.no_grad():  # the autoencoder's own reconstructions of the held-out crops: the ceiling of both arms
        reconstructions = latents_to_uint8(ae.decode(val.get(range(val.count))[0].to(device)))
    write_samples(out / "reconstructions.npz", reconstructions, np.zeros(0, np.int64), dict(arm="taef2"))
    sets = [val_data.parent / "images" / "val"]
    sets += [out / f"{name}.npz" for name in ("samples-base", "samples-lpl", "reconstructions")]
    spectra = replicate_spectra(sets, out / "spectra.png", out / "spectra.json", device, log)
    table = replicate_table(arms, per_seed)
    report["figures"].update(arms=arms, per_seed=per_seed, spectra_band_error=spectra["band_error"],
                             minutes=(time.perf_counter() - started) / 60, table=table)
    add_row(report, "wall time", f"{report['figures']['minutes']:.1f} minutes (pre-training, both arms, evaluation)")
    for name, bands in spectra["band_error"].items():
        errors = ", ".join(f"{b['mean_abs_log10_difference']:.3f}" for b in bands)
        add_row(report, f"spectrum of {name}", f"mean |log10 difference| to the real crops, per octave: {errors}")
    write_text(out / "replicate.md", f"`{report['command']}`\n\n{table}\n")
    write_text(out / "replicate.json", json.dumps(json_ready(report), indent=1))
    log(table)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

PRESET_FLAGS = (("resolution", int), ("model", str), ("batch_size", int), ("lr", float), ("pre_steps", int),
                ("post_steps", int), ("post_ema_decay", float), ("val_samples", int), ("val_draws", int),
                ("samples", int))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (its finished runs are reused when rerun)")
    parser.add_argument("--preset", choices=list(REPLICATE_PRESETS), default="cpu",
                        help="sizes: cpu (README) or gpu")
    for name, kind in PRESET_FLAGS:
        choices = list(MODELS) if name == "model" else None
        cpu, gpu = REPLICATE_PRESETS["cpu"][name], REPLICATE_PRESETS["gpu"][name]
        parser.add_argument("--" + name.replace("_", "-"), type=kind, choices=choices, default=None,
                            help=f"default: the preset's (cpu {cpu}, gpu {gpu})")
    cpu, gpu = (" ".join(map(str, REPLICATE_PRESETS[preset]["seeds"])) for preset in ("cpu", "gpu"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"post-training seeds per arm (default: the preset's, cpu {cpu}, gpu {gpu})")
    return parser


def parse_args(argv):
    """argv -> settings: what the flags leave open comes from the preset; bad values as an error naming the flag."""
    parser = build_parser()
    settings = parser.parse_args(argv)
    for name, value in REPLICATE_PRESETS[settings.preset].items():
        if getattr(settings, name) is None:
            setattr(settings, name, value)
    for name in ("batch_size", "pre_steps", "post_steps", "val_samples", "val_draws", "samples"):
        if getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    patch = MODELS[settings.model]["patch_size"]
    if settings.resolution < 8 * patch or settings.resolution % (8 * patch):
        parser.error(f"--resolution {settings.resolution}: must be a positive multiple of {8 * patch} "
                     f"(8x down-sampling, then patches of {patch})")
    settings.argv = list(argv)
    return settings


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_args(argv)
    with one_line_errors("replicate.py: "):
        report = benchmark_replicate(settings)
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
