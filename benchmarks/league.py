#!/usr/bin/env python
"""The league: every method of this project on the shapes world, each at its own best learning rate and beta from a
small sweep, over training seeds; held-out accuracy against UNet evaluations (data included) and seconds.

    python benchmarks/league.py --output_dir bench_out/league

First the sweep: each method's candidate settings (``SWEEP``) are trained with the first seed and their final
adapters evaluated; the best by held-out accuracy (the earlier candidate on a tie) is then trained with every other
seed and evaluated at each checkpoint. The offline methods (Diffusion-DPO, Inversion-DPO with the trajectory margin
and with the per-step margin from the reference-side cache, InPO, SFT) run ``train_inversion_dpo.py`` on the same
pairs, sampled from the base first; SPO runs ``train_spo.py`` on the train prompts, the shapes scorer judging each
candidate on the image 4 policy steps make of it. Every run is the real trainer through ``accelerate launch``.

Compute counts every UNet row, a row with grad as 3 (a forward and a backward): the pairs' sampling for the offline
methods, the cache build for the per-step margin, and each training step's rows as the trainer's metrics count them
(for SPO: the sampling, the lookahead, the policy and the reference). Seconds are the trainers' step seconds plus the
pairs' sampling and the cache build, each on ``--threads`` threads.

Evaluation as ``demo.py`` evaluates: the 96 held-out two-object prompts x 2 samples from seed 10000, DDIM 25 steps,
guidance 5, the base on the same noise. Runs and evaluations already done are reused, so an interrupted league
continues, and invocations sharing ``--output_dir`` may split the methods (``--methods``) over processes once the
pairs exist. Writes ``results.jsonl``, ``table.md``, ``curves.png`` (accuracy against UNet evaluations and seconds).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from benchmarks.shapes_objectives import curve_point, forward_equivalents, load_results  # noqa: E402


LORA = ["--rank", "8", "--lora_target_modules", "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2"]
OFFLINE_SHARED = ["--train_batch_size", "8", "--beta_dpo", "5000", "--inversion_steps", "5", *LORA]
SPO_SHARED = ["--train_batch_size", "4", *LORA]
INVERSION = ["--objective", "inversion_dpo", "--inversion_target", "x0", "--timestep_weighting", "uniform"]
CACHE = "{output_dir}/inversion_cache"
# method -> (trainer, its flags after the shared ones)
METHODS = {
    "diffusion_dpo": ("train_inversion_dpo.py", ["--objective", "diffusion_dpo"]),
    "inversion_dpo": ("train_inversion_dpo.py", INVERSION),
    "inversion_dpo:per_step": (
        "train_inversion_dpo.py",
        [*INVERSION, "--inversion_margin", "step", "--inversion_cache", CACHE],
    ),
    "inpo": ("train_inversion_dpo.py", ["--objective", "inpo"]),
    "sft": ("train_inversion_dpo.py", ["--objective", "sft"]),
    "spo": ("train_spo.py", ["--preference_model", "shapes", "--spo_lookahead_steps", "4"]),
}
# method -> candidate settings, each a string of flags after the method's; the first seed picks one
SWEEP = {
    "diffusion_dpo": [
        "--learning_rate 1e-3 --beta_dpo 500",
        "--learning_rate 1e-3 --beta_dpo 5000",
        "--learning_rate 3e-3 --beta_dpo 500",
    ],  # fmt: skip
    "inversion_dpo": ["--learning_rate 1e-3", "--learning_rate 3e-3"],
    "inversion_dpo:per_step": ["--learning_rate 1e-3", "--learning_rate 3e-3", "--learning_rate 1e-3 --beta_dpo 500"],
    "inpo": ["--learning_rate 1e-3", "--learning_rate 3e-3"],
    "sft": ["--learning_rate 3e-4", "--learning_rate 1e-3", "--learning_rate 3e-3"],
    "spo": ["--learning_rate 3e-4", "--learning_rate 1e-3"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(HERE, "models", "shapes-sd-tiny"))
    p.add_argument("--output_dir", default="bench_out/league")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="The first one also runs the sweep.")
    p.add_argument("--pair_prompts", type=int, default=160)
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--offline_steps", type=int, default=300, help="Optimizer steps of an offline run (8 pairs each).")
    p.add_argument("--spo_steps", type=int, default=150, help="Optimizer steps of an SPO run (4 trajectories each).")
    p.add_argument("--checkpoints", type=int, default=3, help="Evaluated checkpoints of each run, evenly spaced.")
    p.add_argument("--eval_prompts", type=int, default=96, help="Held-out two-object prompts evaluated.")
    p.add_argument("--eval_images", type=int, default=2, help="Samples per prompt (seeds 10000, 10001, ...).")
    p.add_argument("--threads", type=int, default=1, help="Torch threads of each training and evaluation.")
    p.add_argument("--table_only", action="store_true", help="Tabulate what is done; train nothing.")
    return p.parse_args(argv)


def run_folder(method, setting, seed) -> str:
    """``inversion_dpo:per_step``, ``--learning_rate 1e-3`` -> ``inversion_dpo-per_step-learning_rate-1e-3-seed0``"""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", f"{method} {setting} seed{seed}").strip("-")


def method_flags(args, method, setting):
    trainer, flags = METHODS[method]
    shared = SPO_SHARED if trainer == "train_spo.py" else OFFLINE_SHARED
    steps = args.spo_steps if trainer == "train_spo.py" else args.offline_steps
    if steps % args.checkpoints:
        raise SystemExit(f"error: {steps} steps do not split into {args.checkpoints} evenly spaced checkpoints")
    flags = [f.format(output_dir=args.output_dir) for f in flags]
    budget = ["--max_train_steps", str(steps), "--checkpointing_steps", str(steps // args.checkpoints)]
    return trainer, [*shared, *budget, *flags, *shlex.split(setting)]


def parsed(trainer, flags):
    """The trainer's own reading of a run's flags (the later flag wins, as on the command line)."""
    import importlib

    module = importlib.import_module(trainer[: -len(".py")])
    data = ["--prompts", "-"] if trainer == "train_spo.py" else ["--dataset_name", "-"]
    return module.parse_args([*flags, "--pretrained_model_name_or_path", "-", *data])


def launch(args, trainer, flags, seed, run_dir, data, log_path, extra=()):
    from demo import cpu_launch_command

    cmd = cpu_launch_command(os.path.join(HERE, trainer))
    cmd[cmd.index("--cpu") + 1 : cmd.index("--cpu") + 1] = ["--num_cpu_threads_per_process", str(args.threads)]
    data_flag = "--prompts" if trainer == "train_spo.py" else "--dataset_name"
    cmd += ["--pretrained_model_name_or_path", args.model, data_flag, data, "--output_dir", run_dir, "--seed",
            str(seed), "--resolution", "32", "--num_validation_prompts", "0", *flags, *extra]  # fmt: skip
    with open(log_path, "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def train(args, method, setting, seed, data):
    """One run (skipped when its final adapter exists; an unfinished one starts over, so that its metrics count one
    run's compute)."""
    run_dir = os.path.join(args.output_dir, "runs", run_folder(method, setting, seed))
    if not os.path.exists(os.path.join(run_dir, "pytorch_lora_weights.safetensors")):
        if args.table_only:
            return None
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        trainer, flags = method_flags(args, method, setting)
        print(f"train {method} {setting} seed {seed}", flush=True)
        launch(args, trainer, flags, seed, run_dir, data[trainer], run_dir + ".log")
    return run_dir


def make_data(args, pipe):
    """The offline methods' pairs and SPO's prompts, with what sampling the pairs cost (``data.json``)."""
    from shapes import world
    from shapes.pairs import make_pairs

    pairs = os.path.join(args.output_dir, "pairs.parquet")
    prompts = os.path.join(args.output_dir, "prompts.txt")
    info_path = os.path.join(args.output_dir, "data.json")
    if not os.path.exists(info_path):
        start = time.perf_counter()
        counts = make_pairs(pipe, args.pair_prompts, args.images_per_prompt, pairs + ".tmp", seed=1)
        seconds = time.perf_counter() - start
        os.replace(pairs + ".tmp", pairs)
        with open(prompts, "w") as f:
            f.write("\n".join(map(str, world.train_prompts())) + "\n")
        # DDIM steps x rows per step (the conditional and the unconditional branch under guidance)
        from shapes import sampling

        rows = counts["samples"] * sampling.DEFAULT_STEPS * (2 if sampling.DEFAULT_GUIDANCE > 1 else 1)
        with open(info_path + ".tmp", "w") as f:
            json.dump({**counts, "unet_rows": rows, "seconds": seconds, "threads": args.threads}, f)
        os.replace(info_path + ".tmp", info_path)
    with open(info_path) as f:
        info = json.load(f)
    return {"train_inversion_dpo.py": pairs, "train_spo.py": prompts}, info


def build_cache(args, data):
    """The per-step margin's reference-side cache, built once (by the trainer, ``--inversion_cache_only``) and shared by
    every run of that method: its seconds, and its UNet rows (per pair and stored flip, both images: the inversion's
    N steps, twice under inversion guidance, and the reference's prediction at each stored step). None when it is
    not built yet and ``--table_only`` says to build nothing."""
    path = os.path.join(args.output_dir, "inversion_cache.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if args.table_only:
        return None
    trainer, flags = method_flags(args, "inversion_dpo:per_step", "")
    log_path = os.path.join(args.output_dir, "inversion_cache.log")
    start = time.perf_counter()
    launch(args, trainer, flags, 0, os.path.join(args.output_dir, "cache_run"), data[trainer], log_path,
           extra=["--inversion_cache_only"])  # fmt: skip
    seconds = time.perf_counter() - start
    with open(log_path) as f:
        found = re.search(r"inversion cache .*?: ([\d,]+) pairs? x (\d+) flips? x (\d+) steps?", f.read())
    pairs, flips, steps = int(found.group(1).replace(",", "")), int(found.group(2)), int(found.group(3))
    a = parsed(trainer, flags)
    rows = pairs * flips * 2 * (a.inversion_steps * (2 if a.inversion_guidance_scale > 1 else 1) + steps)
    out = {"pairs": pairs, "flips": flips, "stored_steps": steps, "unet_rows": rows, "seconds": seconds}
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def compute_by_step(run_dir, trainer, pairs_per_step, start):
    """step -> (cumulative seconds, cumulative UNet forward-equivalents) from the run's metrics, from ``start`` (the
    data's cost): a row with grad counts 3. SPO logs its rows per step; the offline trainer per pair."""
    out, (seconds, evals) = {}, start
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "step_seconds" not in r:
                continue
            if trainer == "train_spo.py":
                rows = 3 * r["unet_grad_evals"] + r["unet_evals"]
            else:
                rows = pairs_per_step * forward_equivalents(r)
            seconds, evals = seconds + r["step_seconds"], evals + rows
            out[r["step"]] = (seconds, evals)
    return out


def main(args):
    import torch

    from evaluation.stats import paired_difference
    from shapes import sampling, world

    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    pipe = sampling.load_pipeline(args.model)
    data, data_info = make_data(args, pipe)
    prompts = [str(p) for p in world.heldout_prompts()][: args.eval_prompts]
    results_path = os.path.join(args.output_dir, "results.jsonl")
    done = load_results(results_path, ("run", "seed", "step"))

    def evaluate(key, lora=None):
        if key not in done:
            if lora:
                sampling.load_adapter(pipe, lora)
            _, results = sampling.sample_and_score(pipe, prompts, args.eval_images, 10_000, steps=25, guidance=5.0)
            if lora:
                pipe.unload_lora_weights()
            done[key] = {"run": key[0], "seed": key[1], "step": key[2],
                         "passed": [bool(r.passed) for rs in results for r in rs]}  # fmt: skip
            with open(results_path, "a") as f:
                f.write(json.dumps(done[key]) + "\n")
        return done[key]

    base = evaluate(("base", 0, 0))
    first, others = args.seeds[0], args.seeds[1:]
    league = {}  # method -> (best setting, {seed: run_dir}, its parsed flags, {setting: sweep accuracy}, data's cost)
    for method in args.methods:
        cache = build_cache(args, data) if method == "inversion_dpo:per_step" else None
        # the sweep: each candidate's final adapter, first seed
        sweep = {}
        for setting in SWEEP[method]:
            run_dir = train(args, method, setting, first, data)
            if run_dir is None:
                continue
            a = parsed(*method_flags(args, method, setting))
            key = (f"{method} {setting}", first, a.max_train_steps)
            sweep[setting] = np.mean(
                evaluate(key, os.path.join(run_dir, "pytorch_lora_weights.safetensors"))["passed"]
            )
            print(f"sweep {method} {setting}: {sweep[setting]:.3f}", flush=True)
        if len(sweep) < len(SWEEP[method]):
            continue
        best = max(SWEEP[method], key=lambda s: (sweep[s], -SWEEP[method].index(s)))
        runs = {first: os.path.join(args.output_dir, "runs", run_folder(method, best, first))}
        for seed in others:
            runs[seed] = train(args, method, best, seed, data)
        if any(r is None for r in runs.values()):
            continue
        trainer, flags = method_flags(args, method, best)
        a = parsed(trainer, flags)
        start = (0.0, 0.0) if trainer == "train_spo.py" else (data_info["seconds"], data_info["unet_rows"])
        if cache is not None:
            start = (start[0] + cache["seconds"], start[1] + cache["unet_rows"])
        for seed, run_dir in runs.items():
            compute = compute_by_step(run_dir, trainer, a.train_batch_size, start)
            for step in range(a.checkpointing_steps, a.max_train_steps + 1, a.checkpointing_steps):
                lora = os.path.join(run_dir, f"checkpoint-{step}", "pytorch_lora_weights.safetensors")
                record = evaluate((f"{method} {best}", seed, step), lora)
                record.update(seconds=compute[step][0], unet_evals=compute[step][1])
        league[method] = (best, runs, a, sweep, start)

    write_table(args, league, done, base, data_info, paired_difference)


def plot(args, curves, starts, base):
    """curves.png: held-out accuracy against UNet evaluations and against seconds, each method's mean over seeds as a
    line (each seed a faint dot) from what it spent before its first step (the data) at the base's accuracy; the base
    as a dashed line in its 95% Wilson band."""
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    from evaluation.plots import new_figure, save
    from evaluation.stats import wilson_interval

    fig, axes = new_figure(1, 2, panel_size=(5.6, 4.2))
    low, high = wilson_interval(sum(base["passed"]), len(base["passed"]))
    base_acc = float(np.mean(base["passed"]))
    for ax, (key, label) in zip(axes[0], [("unet", "UNet forward-equivalents, data included"),
                                          ("seconds", "training seconds, data included")]):  # fmt: skip
        ax.axhspan(low, high, color="grey", alpha=0.12, linewidth=0)
        ax.axhline(base_acc, color="grey", linestyle="--", linewidth=1, label=f"base ({base_acc:.1%})")
        for i, (method, points) in enumerate(curves.items()):
            color = f"C{i % 10}"
            x0 = starts[method][0 if key == "seconds" else 1]
            ax.plot([x0] + [p[key] for p in points], [base_acc] + [p["accuracy"] for p in points], "-o",
                    color=color, markersize=4, label=method)  # fmt: skip
            ax.plot([p[key] for p in points for _ in p["seeds"]], [a for p in points for a in p["seeds"]], ".",
                    color=color, alpha=0.35, markersize=4)  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("held-out full-prompt accuracy")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        if key == "unet":
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
        ax.grid(alpha=0.3)
        ax.set_title(f"against {label.split(',')[0]}", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle("Held-out accuracy of every method at its best setting", fontsize=11)
    fig.supxlabel(f"lines: mean over seeds {args.seeds}, from the data's cost at the base's accuracy; dots: each "
                  "seed; band: the base's 95% Wilson interval", fontsize=8)  # fmt: skip
    save(fig, os.path.join(args.output_dir, "curves.png"))


def write_table(args, league, done, base, data_info, paired_difference):
    """table.md (the final checkpoints, the sweeps, where each method first reaches Diffusion-DPO's best) and
    curves.png."""

    base_acc = float(np.mean(base["passed"]))
    curves, starts = {}, {method: entry[4] for method, entry in league.items()}
    for method, (best, runs, a, *_) in league.items():
        steps = range(a.checkpointing_steps, a.max_train_steps + 1, a.checkpointing_steps)
        curves[method] = [curve_point([done[(f"{method} {best}", s, step)] for s in runs], step) for step in steps]
    target = None
    if "diffusion_dpo" in curves:
        target = max(p["accuracy"] for p in curves["diffusion_dpo"])
    lines = [
        f"Held-out: {args.eval_prompts} two-object prompts x {args.eval_images} samples (seed 10000, DDIM 25 steps, "
        f"guidance 5); base {base_acc:.1%}. "
        f"Seeds {args.seeds}. UNet evaluations in forward-equivalents (a row with grad counts 3), data included: "
        f"the offline methods' {data_info['pairs']} pairs cost {data_info['unet_rows']:,} rows and "
        f"{data_info['seconds']:.0f} s to sample on {data_info['threads']} thread(s).",
        "",
        "| method | best setting (sweep, first seed's final accuracy) | final accuracy, mean over seeds | seeds | "
        "paired gain over base [95% CI] | best checkpoint | UNet evaluations | seconds | "
        "to reach Diffusion-DPO's best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, (best, runs, a, sweep, _) in league.items():
        points = curves[method]
        final = points[-1]
        new = [x for s in runs for x in done[(f"{method} {best}", s, a.max_train_steps)]["passed"]]
        d = paired_difference(new, base["passed"] * len(runs))
        tried = "; ".join(f"{'**' if s == best else ''}{s.replace('--', '')}: {v:.1%}{'**' if s == best else ''}"
                          for s, v in sweep.items())  # fmt: skip
        reached = "-"
        if target is not None:
            hit = next((p for p in points if p["accuracy"] >= target - 1e-9), None)
            reached = (
                f"{hit['unet']:,.0f} evals, {hit['seconds']:.0f} s (step {hit['step']})" if hit else "not reached"
            )
        top = max(points, key=lambda p: p["accuracy"])
        lines.append(
            f"| {method} | {tried} | {final['accuracy']:.1%} | {' / '.join(f'{x:.1%}' for x in final['seeds'])} | "
            f"{d['difference']:+.1%} [{d['low']:+.1%}, {d['high']:+.1%}] | {top['accuracy']:.1%} (step {top['step']}) | "
            f"{final['unet']:,.0f} | {final['seconds']:.0f} | {reached} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    if curves:
        plot(args, curves, starts, base)
    print(f"wrote {args.output_dir}/table.md, curves.png")


if __name__ == "__main__":
    main(parse_args())
