"""The project's figures, drawn with Pillow alone: the power spectra of `fid.py spectrum` (paper Fig. 4 and 5),
replicate.py's trade-off of HF error against latent MSE (Fig. 9 at toy scale) and the training curves of a run
(train.py redraws OUT/curves.png at every checkpoint).

    python plot.py curves runs/x/log.jsonl --out curves.png                    # one run
    python plot.py curves runs/ab/base-seed0/log.jsonl runs/ab/lpl-seed0/log.jsonl --out ab.png   # two, overlaid

Curves: L_tot, the diffusion loss, LPL (and, for one run, each of its layers), the gradient norm and images/s, per
log period; and from the validation lines ("eval": "ema") the HF error of the decoded estimate, per noise level for
one run, at sigma/alpha 1 for several.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from runtime import UserError, atomic_output, check_output_file, one_line_errors

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


# ----------------------------------------------------------------------------------------------------------------
# Panels: ticks, lines, labels, a legend
# ----------------------------------------------------------------------------------------------------------------


def nice_ticks(low, high, count=6):
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
    low, high = (low - 0.5, high + 0.5) if high <= low else (low, high)
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    decimals = max(0, -math.floor(math.log10(step)))
    first, last = math.floor(low / step), math.ceil(high / step)
    return [round(i * step, decimals) for i in range(first, last + 1)]


def draw_panel(draw, box, curves, title, x_label, y_label, font):
    """Line plot of curves [(name, xs, ys, color)] inside box = (left, top, right, bottom) of the figure."""
    left, top, right, bottom = box
    x_ticks, y_ticks = (nice_ticks(min(np.min(c[i]) for c in curves), max(np.max(c[i]) for c in curves))
                        for i in (1, 2))
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x, y):
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    for x in x_ticks:
        px, _ = to_pixel(x, y_low)
        draw.line([(px, top), (px, bottom)], fill="#e6e6e6")
        draw.line([(px, bottom), (px, bottom + 5)], fill="black")
        draw.text((px, bottom + 8), f"{x:g}", fill="black", font=font, anchor="mt")
    for y in y_ticks:
        _, py = to_pixel(x_low, y)
        draw.line([(left, py), (right, py)], fill="#e6e6e6")
        draw.line([(left - 5, py), (left, py)], fill="black")
        draw.text((left - 8, py), f"{y:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    for name, curve_x, curve_y, color in curves:
        points = [to_pixel(x, y) for x, y in zip(curve_x, curve_y)]
        draw.line(points, fill=color, width=2)
        if len(points) == 1:  # one log period so far: a dot, since a line needs two
            (px, py), = points
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    draw.text(((left + right) / 2, top - 10), title, fill="black", font=font, anchor="md")
    draw.text(((left + right) / 2, bottom + 30), x_label, fill="black", font=font, anchor="mt")
    draw.text((left, top - 28), y_label, fill="black", font=font, anchor="lm")


def draw_legend(draw, right, top, entries, font):
    """Legend box [(name, color)] with its top-right corner at (right, top)."""
    left = right - 40 - max(draw.textlength(name, font=font) for name, _ in entries)
    draw.rectangle([left, top, right, top + 8 + 20 * len(entries)], fill="white", outline="black")
    for y, (name, color) in zip(range(top + 14, top + 14 + 20 * len(entries), 20), entries):
        draw.line([(left + 8, y), (left + 28, y)], fill=color, width=3)
        draw.text((left + 34, y), name, fill="black", font=font, anchor="lm")


def plot_spectra(path, comparison, title):
    """PNG of the curves (DC left out: it is the mean brightness, it stays in the JSON / CSV) and differences."""
    names = list(comparison["log10_power"])
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    frequency = np.asarray(comparison["frequency_cycles_per_image"][1:])
    image = Image.new("RGB", (1400, 620), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=15)
    draw.text((700, 22), title, fill="black", font=ImageFont.load_default(size=20), anchor="mt")
    power_curves = [(n, frequency, np.asarray(comparison["log10_power"][n][1:]), colors[n]) for n in names]
    draw_panel(draw, (90, 110, 670, 540), power_curves, "Radially averaged power spectrum",
               "frequency (cycles per image)", "log10 power", font)
    reference, differences = comparison["reference"], comparison["difference_to_reference"]
    difference_curves = [(n, frequency, np.asarray(differences[n][1:]) if n in differences else 0 * frequency,
                          colors[n]) for n in names]
    draw_panel(draw, (790, 110, 1370, 540), difference_curves, f"Difference to {reference}",
               "frequency (cycles per image)", "log10 power - reference", font)
    draw_legend(draw, 660, 120, [(n, colors[n]) for n in names], font)
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG")


def plot_tradeoff(path, points, title, x_label, y_label):
    """PNG of one point per arm, points [(name, x, x_se, y, y_se)], with +- 1 standard error bars both ways (the
    trade-off of replicate.py: HF error change against latent MSE change)."""
    image = Image.new("RGB", (900, 700), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=15)
    draw.text((450, 22), title, fill="black", font=ImageFont.load_default(size=18), anchor="mt")
    curves = []
    for index, (name, x, x_se, y, y_se) in enumerate(points):
        color = COLORS[index % len(COLORS)]
        curves += [(name, [x], [y], color), ("", [x - x_se, x + x_se], [y, y], color),
                   ("", [x, x], [y - y_se, y + y_se], color)]
    draw_panel(draw, (100, 90, 860, 610), curves, "", x_label, y_label, font)
    draw_legend(draw, 855, 95, [(name, color) for name, _, _, color in curves if name], font)
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Training curves of one run or several: a log.jsonl each
# ----------------------------------------------------------------------------------------------------------------

TRAINING_PANELS = [("loss", "L_tot = L_diff + w L_LPL"), ("diffusion", "diffusion loss"), ("lpl", "LPL"),
                   ("grad_norm", "gradient norm"), ("img_per_s", "images / s")]
VALIDATION = ("hf_error", "validation (EMA): HF error of the decoded estimate")


def read_log(path):
    """(training records, EMA validation records) of a train.py log.jsonl; a line a kill cut short is skipped."""
    training, validation = [], []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "eval" not in record:
            training.append(record)
        elif record["eval"] == "ema" and "error" not in record:
            validation.append(record)
    return training, validation


def series(records, key, index=None):
    """(steps, values) of the records that hold a finite `key` (element `index` of a per-level list)."""
    points = [(r["step"], r[key] if index is None else r[key][index]) for r in records if r.get(key) is not None]
    points = [(step, value) for step, value in points if value is not None and math.isfinite(value)]
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def curves_of(runs, key):
    """The curves of one panel: one per run; for a single run, LPL's layers too, and validation per noise level."""
    curves = []
    for run_index, (name, training, validation) in enumerate(runs):
        color = COLORS[run_index % len(COLORS)]
        if key == VALIDATION[0]:
            levels = validation[0]["sigma_ratio"] if validation else []
            chosen = range(len(levels)) if len(runs) == 1 else [i for i, level in enumerate(levels) if level == 1.0]
            for order, i in enumerate(chosen):
                label = f"sigma/alpha {levels[i]:g}" if len(runs) == 1 else name
                curves.append((label, *series(validation, key, i), COLORS[order % len(COLORS)] if len(runs) == 1
                               else color))
            continue
        curves.append((name, *series(training, key), color))
        layers = sorted(k for k in (training[-1] if training else {}) if k.startswith("lpl_layer"))
        for layer_index, layer in enumerate(layers if key == "lpl" and len(runs) == 1 else []):
            curves.append((layer.replace("lpl_", ""), *series(training, layer), COLORS[(layer_index + 1) % 8]))
    return [curve for curve in curves if len(curve[1]) > 0]


def plot_curves(paths, out, names=None):
    """PNG of the training curves of the logs at `paths` (overlaid, one colour per run), 3 x 2 panels."""
    runs = []
    for index, path in enumerate(paths):
        if not Path(path).is_file():
            raise UserError(f"{path}: no such log (expected a train.py log.jsonl)")
        runs.append((names[index] if names else Path(path).parent.name, *read_log(path)))
    image = Image.new("RGB", (1500, 980), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    for index, (key, title) in enumerate([*TRAINING_PANELS, VALIDATION]):
        column, row = index % 3, index // 3
        box = (80 + 490 * column, 90 + 460 * row, 450 + 490 * column, 460 + 460 * row)
        curves = curves_of(runs, key)
        if not curves:
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f"{title}: nothing logged", fill="grey",
                      font=font, anchor="mm")
            continue
        draw_panel(draw, box, curves, title, "step", "", font)
        draw_legend(draw, box[2] - 4, box[1] + 4, [(name, color) for name, _, _, color in curves], font)
    with atomic_output(out) as temporary:
        image.save(temporary, format="PNG")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    curves = commands.add_parser("curves", help="training curves of one or more log.jsonl, overlaid")
    curves.add_argument("logs", nargs="+", help="train.py's OUT/log.jsonl files")
    curves.add_argument("--out", required=True, help="PNG to write")
    curves.add_argument("--names", nargs="+", help="a name per log (default: its run folder's)")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.logs):
        parser.error(f"--names: {len(args.names)} names for {len(args.logs)} logs")
    with one_line_errors("plot.py curves: "):
        check_output_file(args.out, "--out")
        print(f"wrote {plot_curves(args.logs, args.out, args.names)}")


if __name__ == "__main__":
    main()
