"""The GPU check: every device figure the README cites, in one command, each part guarded so that one failure
does not cost the others, the results rewritten after every part (a run cut short keeps what it measured).

    python suite.py --out bench-gpu          # bench.py's benchmarks at the paper's settings + a torchrun smoke
    python suite.py --out bench-cpu --tiny   # the same at CPU scale, in under a minute (the tests run it)

Writes OUT/bench.json (every figure) and OUT/bench.md (a table per part, PASS / MISS / n/a per target). Sized for
one session's device time (15 minutes of one H200, start-up included).
"""

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import (add_row, benchmark_fid, benchmark_lpl, benchmark_lpl_subbatch, benchmark_sample, benchmark_train,
                   command_line, default_device, environment, format_report, free_memory, json_ready,
                   latent_shape_of, parse_args, save_random_decoder, start_report, train_argv,
                   write_synthetic_dataset)
from runtime import write_text

REPO = Path(__file__).resolve().parent

SUITES = {
    "paper": dict(  # the flags' defaults are the paper's settings
        train="train",
        train_variants=([], ["--lpl-checkpointing"], ["--lpl-blocks", "4"], ["--lpl-max-samples", "8"]),
        train_compiled_variants=([], ["--lpl-compile"]),
        lpl="lpl",
        fid="fid --repeats 1",
        sample="sample --decode",
        subbatch="lpl-subbatch --repeats 8",
        smoke="train --steps 20 --dtype bf16",
        smoke_timeout=420),
    "tiny": dict(
        train="train --model demo --resolution 32 --batch-size 4 --vae-ch 32 --lpl-threshold 32 --warmup 1 --steps 2",
        train_variants=([], ["--lpl-checkpointing"], ["--lpl-blocks", "4"], ["--lpl-max-samples", "2"]),
        lpl="lpl --vae-ch 32 --resolution 32 --gated 2 --warmup 1 --repeats 2",
        fid="fid --dim 128 --repeats 1 --inception-batch 1 --inception-iters 1",
        sample="sample --model demo --resolution 32 --batch-size 2 --steps 3 --cfg 1.5 --decode --vae-ch 32",
        subbatch="lpl-subbatch --resolution 32 --batch-size 8 --vae-ch 32 --lpl-threshold 32 --max-samples 2 8 "
                 "--repeats 3",
        smoke="train --model demo --resolution 32 --batch-size 4 --vae-ch 32 --lpl-threshold 32 --steps 2 "
              "--dtype bf16",
        smoke_timeout=120),
}


def torchrun_smoke(settings, timeout):
    """train.py under torchrun on one process with LPL (settings.steps optimiser steps), on a synthetic dataset and a
    saved random decoder; PASS when it exits 0 with a finite loss, LPL active and a checkpoint written."""
    device, report = start_report("torchrun smoke", settings)
    with tempfile.TemporaryDirectory(prefix="lpl-smoke-") as tmp:
        dataset = write_synthetic_dataset(Path(tmp) / "data", 2 * settings.batch_size, latent_shape_of(settings))
        vae = save_random_decoder(Path(tmp) / "vae.safetensors", settings.vae_arch, settings.vae_ch)
        argv = train_argv(settings, dataset, vae, Path(tmp) / "run", steps=settings.steps) + ["--log-every", "10"]
        torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *argv]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *torchrun], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        log_path = Path(tmp) / "run" / "log.jsonl"
        records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
        saved = (Path(tmp) / "run" / "checkpoints" / "last.pt").exists()
    last = records[-1] if records else {}
    finite = all(math.isfinite(last.get(k, math.nan)) for k in ("loss", "lpl"))
    lpl_active = any(record.get("lpl_gated_fraction", 0) > 0 for record in records)
    ok = done.returncode == 0 and finite and lpl_active and saved
    report["command"] = shlex.join(["python", *torchrun])
    report["figures"].update(returncode=done.returncode, seconds=seconds, log=records, checkpoint_saved=saved,
                             output_tail=(done.stdout + done.stderr)[-3000:])
    add_row(report, "train.py under torchrun", f"exit {done.returncode} after {seconds:.1f} s for {settings.steps} "
                                               f"steps (start-up, checkpoint and sample grid included); last log "
                                               f"{json.dumps(last)}")
    status = "PASS" if ok else "MISS"
    report["targets"].append(dict(name="torchrun LPL smoke", value=float(ok), goal=1.0, status=status,
                                  text=f"[{status}] torchrun {settings.dtype} LPL smoke: exit "
                                       f"{done.returncode}, finite loss {finite}, LPL active {lpl_active}, "
                                       f"checkpoint written {saved}"))
    return report


def format_value(value):
    return "n/a" if value is None else f"{value:.3g}"


def suite_markdown(suite):
    lines = [f"# suite.py ({'tiny, CPU scale' if suite['tiny'] else 'paper settings'})", "",
             f"{suite['environment']['device']}, torch {suite['environment']['torch']}", ""]
    for name, part in suite["parts"].items():
        lines += [f"## {name}", ""]
        if "error" in part:
            lines += ["FAILED:", "", "```", part["error"].strip(), "```", ""]
            continue
        lines += [f"`{part['command']}`", "", "| figure | value |", "|---|---|"]
        lines += [f"| {label.strip()} | {text} |" for label, text in part["rows"]]
        lines += ["", "| target | value | goal | status |", "|---|---|---|---|"]
        lines += [f"| {t['name']} | {format_value(t['value'])} | {format_value(t['goal'])} | {t['status']} |"
                  for t in part["targets"]]
        lines.append("")
    return "\n".join(lines)


def run_suite(settings, log=print):
    """Runs every part, each guarded: a failure is recorded and the next part runs. Results are rewritten to
    OUT/bench.json and OUT/bench.md after every part, so a run cut short keeps what it measured."""
    plan = SUITES["tiny" if settings.tiny else "paper"]
    extra = ["--peak-tflops", str(settings.peak_tflops)] if settings.peak_tflops else []
    parts = [
        ("train", lambda: benchmark_train(parse_args(plan["train"].split() + extra), plan["train_variants"], log)),
        ("train compiled", lambda: benchmark_train(parse_args(plan["train"].split() + ["--compile"] + extra),
                                                   plan["train_compiled_variants"], log)),
        ("lpl", lambda: benchmark_lpl(parse_args(plan["lpl"].split()))),
        ("fid", lambda: benchmark_fid(parse_args(plan["fid"].split()))),
        ("sample", lambda: benchmark_sample(parse_args(plan["sample"].split() + extra))),
        ("lpl-subbatch", lambda: benchmark_lpl_subbatch(parse_args(plan["subbatch"].split()))),
        ("torchrun smoke", lambda: torchrun_smoke(parse_args(plan["smoke"].split()), plan["smoke_timeout"])),
    ]
    parts = [(name, run) for name, run in parts if name != "train compiled" or not settings.tiny]  # CPU: minutes
    device = default_device()
    suite = dict(command=command_line(settings.argv, program="suite.py"), tiny=settings.tiny,
                 environment=environment(device), parts={})
    out = Path(settings.out)
    for name, run in parts:
        log(f"suite: {name}")
        started = time.perf_counter()
        try:
            part = run()
            log(format_report(part))
        except (Exception, SystemExit):
            part = dict(error=traceback.format_exc())
            log(f"suite: {name} FAILED\n{part['error']}")
        part["seconds"] = time.perf_counter() - started
        suite["parts"][name] = part
        free_memory(device)
        write_text(out / "bench.json", json.dumps(json_ready(suite), indent=1))
        write_text(out / "bench.md", suite_markdown(suite))
    log(f"suite: wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return suite


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for bench.json and bench.md")
    parser.add_argument("--tiny", action="store_true", help="CPU scale: the whole suite in under a minute")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak for MFU on a GPU the table does not know")
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parser.parse_args(argv)
    if settings.peak_tflops is not None and settings.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {settings.peak_tflops}")
    settings.argv = argv
    return run_suite(settings)


if __name__ == "__main__":
    main()
