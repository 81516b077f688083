#!/usr/bin/env python
"""Every objective on the same shapes-world pairs with the same budget: held-out score against optimizer steps, UNet
evaluations and wall-clock seconds, over several seeds.

    python benchmarks/shapes_objectives.py --output_dir bench_out/objectives --seeds 0 1 2

Each run is the real ``train_inversion_dpo.py`` through ``accelerate launch`` with a checkpoint every
``--eval_every`` steps; every checkpoint's LoRA is loaded into the stock pipeline and sampled on held-out prompt
combinations with fixed seeds (the base model on the same noise). Compute comes from the trainer's own metrics:
``step_seconds`` and the UNet rows it ran per pair, with grad (about 3 forward-equivalents: a forward and a
backward) and without (1). Runs and evaluations already done are reused, so an interrupted benchmark continues.
Writes ``results.jsonl`` (one line per checkpoint), ``table.md`` and ``curves.png``.

A run label may carry flags of its own, quoted, after the shared ``--train_args`` and the label's (the later flag
wins); the run is named and tabulated with them, as Diffusion-DPO at a beta of its own:

    python benchmarks/shapes_objectives.py --runs diffusion_dpo "diffusion_dpo --beta_dpo 500"
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

# label -> flags of train_inversion_dpo.py; every objective and every inversion target. Inversion-DPO labels name
# their step weighting (the paper's 1/(2 a_t) unless ":uniform"), so a label means the same whatever the defaults.
INVERSION = ["--objective", "inversion_dpo", "--inversion_target"]
RUNS = {
    "diffusion_dpo": ["--objective", "diffusion_dpo"],
    "inversion_dpo:step": [*INVERSION, "step", "--timestep_weighting", "official"],
    "inversion_dpo:x0": [*INVERSION, "x0", "--timestep_weighting", "official"],
    "inversion_dpo:step:uniform": [*INVERSION, "step", "--timestep_weighting", "uniform"],
    "inversion_dpo:x0:uniform": [*INVERSION, "x0", "--timestep_weighting", "uniform"],
    "inversion_dpo:reference": [*INVERSION, "reference", "--timestep_weighting", "official"],
    "inpo": ["--objective", "inpo"],
    "sft": ["--objective", "sft"],
}


def trainer_flags():
    """The flags train_inversion_dpo.py knows, as its --help lists them."""
    import contextlib
    import io

    import train_inversion_dpo as trainer

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        trainer.parse_args(["--help"])
    return set(re.findall(r"--[a-z0-9_]+", text.getvalue()))


def split_run(spec, known, what="run label"):
    """``"diffusion_dpo --beta_dpo 500"`` -> ``("diffusion_dpo", ["--beta_dpo", "500"])``: a label among ``known`` and
    flags of train_inversion_dpo.py that go after the label's own (the later flag wins), checked by the trainer's
    parser, so that a typo stops the benchmark before it samples anything."""
    import train_inversion_dpo as trainer

    words = shlex.split(spec)
    if not words or words[0] not in known:
        raise SystemExit(
            f"error: unknown {what} {spec!r}; expected one of {list(known)}, optionally followed by trainer flags"
        )
    extra = words[1:]
    unknown = [w for w in extra if w.startswith("--") and w.split("=")[0] not in trainer_flags()]
    if unknown:
        raise SystemExit(f"error: {what} {spec!r}: {unknown[0]!r} is not a flag of train_inversion_dpo.py")
    try:
        trainer.parse_args([*extra, "--pretrained_model_name_or_path", "-", "--dataset_name", "-"])
    except (SystemExit, trainer.InputError) as e:
        raise SystemExit(f"error: {what} {spec!r}: {e}") from None
    return words[0], extra


def run_name(spec) -> str:
    """A run's name in results.jsonl and the table: its label and extra flags, single-spaced."""
    return " ".join(shlex.split(spec))


def run_folder(name) -> str:
    """A run's folder name: ``inversion_dpo:x0:uniform`` -> ``inversion_dpo-x0-uniform``,
    ``diffusion_dpo --beta_dpo 500`` -> ``diffusion_dpo-beta_dpo-500``."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-")


def split_runs(specs, known, what="run label"):
    """name -> (label, extra flags) for every spec, in order; two specs may not share a folder."""
    runs, folders = {}, {}
    for spec in specs:
        name = run_name(spec)
        runs[name] = split_run(spec, known, what)
        other = folders.setdefault(run_folder(name), name)
        if other != name:
            raise SystemExit(f"error: {what}s {other!r} and {name!r} would share the folder {run_folder(name)!r}")
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(HERE, "models", "shapes-sd-tiny"))
    p.add_argument("--output_dir", default="bench_out/objectives")
    p.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        help=f"Labels among {list(RUNS)}, each optionally followed by its own trainer flags, quoted: "
        "'diffusion_dpo --beta_dpo 500' (after --train_args and the label's flags: the later flag wins).",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pairs", default=None, help="A pairs parquet; made from the base model when not given.")
    p.add_argument("--pair_prompts", type=int, default=160)
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=300)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--eval_prompts", type=int, default=96, help="Held-out two-object prompts evaluated.")
    p.add_argument("--eval_images", type=int, default=1, help="Samples per prompt (seeds 10000, 10001, ...).")
    p.add_argument(
        "--train_args",
        default="--train_batch_size 8 --learning_rate 1e-3 --beta_dpo 5000 --inversion_steps 5 --rank 8",
        help="Flags shared by every run, quoted.",
    )
    p.add_argument("--threads", type=int, default=1, help="Torch threads of each training and evaluation.")
    return p.parse_args(argv)


def forward_equivalents(record) -> float:
    """UNet forward-equivalents per pair of one step: a row with grad costs a forward and a backward (about 3). The
    SD3 trainer counts its transformer's rows under ``transformer_*``."""
    model = "transformer" if "transformer_evals_per_pair" in record else "unet"
    return 3 * record.get(f"{model}_grad_evals_per_pair", 0.0) + record.get(f"{model}_evals_per_pair", 0.0)


def train(args, label, seed, pairs, run_dir, run_flags):
    """One run of the real trainer: ``args.train_args``, then the run's own flags ``run_flags`` (the later flag wins)."""
    from demo import cpu_launch_command, trainer_for

    if os.path.exists(os.path.join(run_dir, "pytorch_lora_weights.safetensors")):
        return
    # an unfinished run (stopped, or diverged) starts over: its metrics would add to the new run's seconds and evals
    shutil.rmtree(run_dir, ignore_errors=True)
    script, architecture_flags = trainer_for(args.model)  # the SD3 trainer for an SD3 model, with its flags
    cmd = cpu_launch_command(os.path.join(HERE, script))
    cmd[cmd.index("--cpu") + 1 : cmd.index("--cpu") + 1] = ["--num_cpu_threads_per_process", str(args.threads)]
    cmd += ["--pretrained_model_name_or_path", args.model, "--dataset_name", pairs, "--output_dir", run_dir,
            "--seed", str(seed), "--resolution", "32", "--max_train_steps", str(args.max_train_steps),
            "--checkpointing_steps", str(args.eval_every), "--num_validation_prompts", "0", *architecture_flags,
            *shlex.split(args.train_args), *run_flags]  # fmt: skip
    print(f"train {label} seed {seed}", flush=True)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(run_dir + ".log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def load_results(path, key_fields):
    """The records of a results.jsonl written so far (none if it is not there), by the tuple of their key fields."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done[tuple(r[k] for k in key_fields)] = r
    return done


def compute_by_step(run_dir):
    """step -> (cumulative seconds, cumulative UNet forward-equivalents per pair) from the run's metrics."""
    out, seconds, evals = {}, 0.0, 0.0
    with open(os.path.join(run_dir, "logs", "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "step_seconds" in r:
                seconds += r["step_seconds"]
                evals += forward_equivalents(r)
                out[r["step"]] = (seconds, evals)
    return out


def curve_point(records, step) -> dict:
    """One checkpoint's held-out accuracy over its seeds' records: the mean over seeds, each seed's, the samples
    pooled over seeds (for the Wilson interval), and the mean compute spent to reach it (0 for the base)."""
    return {
        "step": step,
        "unet": float(np.mean([r.get("unet_evals", 0.0) for r in records])),
        "seconds": float(np.mean([r.get("seconds", 0.0) for r in records])),
        "accuracy": float(np.mean([np.mean(r["passed"]) for r in records])),
        "seeds": [float(np.mean(r["passed"])) for r in records],
        "passed": int(sum(sum(r["passed"]) for r in records)),
        "n": sum(len(r["passed"]) for r in records),
    }


# the plots' x axes: (file name, curve_point key, axis label)
AXES = [
    ("by_steps", "step", "optimizer steps"),
    ("by_unet_evals", "unet", "UNet forward-equivalents per pair"),
    ("by_seconds", "seconds", "wall-clock seconds of training"),
]


def accuracy_panel(ax, curves, base, key, x_label):
    """Held-out accuracy against one measure of cost: per run, the mean over seeds as a line from the base (cost 0)
    with the 95% Wilson interval of its samples pooled over seeds as a band, and each seed's accuracy as a faint dot
    where there are several; the base as a dashed line with its own band."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    from evaluation.plots import accuracy_band
    from evaluation.stats import wilson_interval

    low, high = wilson_interval(base["passed"], base["n"])
    ax.axhspan(low, high, color="grey", alpha=0.12, linewidth=0)
    ax.axhline(base["accuracy"], color="grey", linestyle="--", linewidth=1, label=f"base ({base['accuracy']:.1%})")
    for i, (label, points) in enumerate(curves.items()):
        color = f"C{i % 10}"
        points = [base] + list(points)
        bands = [wilson_interval(p["passed"], p["n"]) for p in points]
        x = [p[key] for p in points]
        accuracy_band(
            ax, x, [p["accuracy"] for p in points], [b[0] for b in bands], [b[1] for b in bands], label, color
        )
        if any(len(p["seeds"]) > 1 for p in points):
            seeds = [(p[key], a) for p in points[1:] for a in p["seeds"]]
            ax.plot([x for x, _ in seeds], [a for _, a in seeds], ".", color=color, alpha=0.35, markersize=4)
    if key == "step":
        ax.xaxis.set_major_locator(MaxNLocator("auto", steps=[1, 2, 2.5, 5, 10], integer=True))
    ax.set_xlabel(x_label)
    ax.set_ylabel("held-out full-prompt accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3)


def plot_curves(curves, base, output_dir):
    """``curves.png`` (held-out accuracy against steps, UNet evaluations and seconds, side by side) and each panel on
    its own (``by_steps.png``, ``by_unet_evals.png``, ``by_seconds.png``); returns the side-by-side figure."""
    from evaluation.plots import new_figure, save

    seeds = max(len(p["seeds"]) for points in curves.values() for p in points)
    note = f"lines: mean over {seeds} seed{'s' if seeds > 1 else ''}" + ("; dots: each seed" if seeds > 1 else "")
    note += f"; bands: 95% Wilson interval of the samples pooled over seeds (base: {base['n']} samples)"
    for name, key, x_label in AXES:
        fig, axes = new_figure(1, 1, panel_size=(6.4, 4.2))
        accuracy_panel(axes[0][0], curves, base, key, x_label)
        axes[0][0].set_title(f"held-out accuracy against {x_label}", fontsize=10)
        axes[0][0].legend(fontsize=8)
        fig.supxlabel(note, fontsize=7)
        save(fig, os.path.join(output_dir, f"{name}.png"))
    fig, axes = new_figure(1, len(AXES), panel_size=(5.0, 4.0))
    for ax, (_, key, x_label) in zip(axes[0], AXES):
        accuracy_panel(ax, curves, base, key, x_label)
        ax.set_title(f"against {x_label}", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle("Held-out two-object accuracy of every objective", fontsize=11)
    fig.supxlabel(note, fontsize=8)
    save(fig, os.path.join(output_dir, "curves.png"))
    return fig


def main(args):
    import torch

    from evaluation.stats import mean_interval, win_rate
    from shapes import sampling, world
    from shapes.pairs import make_pairs

    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    runs = split_runs(args.runs, RUNS)
    pipe = sampling.load_pipeline(args.model)

    pairs = args.pairs or os.path.join(args.output_dir, "pairs.parquet")
    if not os.path.exists(pairs):
        print(make_pairs(pipe, args.pair_prompts, args.images_per_prompt, pairs, seed=1), flush=True)

    prompts = [str(p) for p in world.heldout_prompts()][: args.eval_prompts]
    results_path = os.path.join(args.output_dir, "results.jsonl")
    done = load_results(results_path, ("run", "seed", "step"))

    def evaluate(key):
        if key not in done:
            _, results = sampling.sample_and_score(pipe, prompts, args.eval_images, seed=10_000)
            scores = [s for rs in results for s in rs]
            done[key] = {"run": key[0], "seed": key[1], "step": key[2], "scores": [s.score for s in scores],
                         "passed": [bool(s.passed) for s in scores]}  # fmt: skip
            with open(results_path, "a") as f:
                f.write(json.dumps(done[key]) + "\n")
        return done[key]

    base = evaluate(("base", 0, 0))
    for label, (kind, extra) in runs.items():
        for seed in args.seeds:
            run_dir = os.path.join(args.output_dir, "runs", f"{run_folder(label)}-seed{seed}")
            train(args, label, seed, pairs, run_dir, run_flags=[*RUNS[kind], *extra])
            compute = compute_by_step(run_dir)
            for step in range(args.eval_every, args.max_train_steps + 1, args.eval_every):
                if (label, seed, step) not in done:
                    sampling.load_adapter(pipe, os.path.join(run_dir, f"checkpoint-{step}"))
                    evaluate((label, seed, step))
                    pipe.unload_lora_weights()
                done[(label, seed, step)].update(seconds=compute[step][0], unet_evals=compute[step][1])
                print(f"{label} seed {seed} step {step}: accuracy {np.mean(done[(label, seed, step)]['passed']):.3f}")

    # Table: the final checkpoint, mean over seeds (and the seeds' spread); compute to reach diffusion_dpo's final
    steps = list(range(args.eval_every, args.max_train_steps + 1, args.eval_every))

    def curve(label, field):
        """[(step, mean over seeds of field, seconds, UNet evaluations)]"""
        rows = []
        for step in steps:
            rs = [done[(label, s, step)] for s in args.seeds]
            rows.append((step, float(np.mean([np.mean(r[field]) for r in rs])),
                         float(np.mean([r["seconds"] for r in rs])), float(np.mean([r["unet_evals"] for r in rs]))))  # fmt: skip
        return rows

    base_acc, base_score = float(np.mean(base["passed"])), float(np.mean(base["scores"]))
    target = curve("diffusion_dpo", "passed")[-1][1] if "diffusion_dpo" in runs else None
    lines = [
        f"Held-out two-object prompts: {len(prompts)} x {args.eval_images} samples per checkpoint; base accuracy "
        f"{base_acc:.1%}, mean score {base_score:.3f}. {args.max_train_steps} steps, seeds {args.seeds}; "
        f"shared flags `{args.train_args}`.",
        "",
        "| run | accuracy (final, mean over seeds) | seeds' range | best checkpoint | mean score | "
        "win rate vs base [95% CI] | s / step | UNet fwd-equiv / pair / step | to reach diffusion_dpo's final accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    curves = {}
    for label in runs:
        acc = curve(label, "passed")
        score = curve(label, "scores")
        finals = [float(np.mean(done[(label, s, steps[-1])]["passed"])) for s in args.seeds]
        wins = win_rate(
            [x for s in args.seeds for x in done[(label, s, steps[-1])]["scores"]],
            [x for _ in args.seeds for x in base["scores"]],
        )
        _, seconds, evals = acc[-1][0], acc[-1][2], acc[-1][3]
        reached = "-"
        if target is not None:
            hit = next((row for row in acc if row[1] >= target), None)
            reached = f"{hit[3]:.0f} evals, {hit[2]:.0f} s (step {hit[0]})" if hit else "not reached"
        best = max(acc, key=lambda row: row[1])
        lines.append(
            f"| {label} | {acc[-1][1]:.1%} ({acc[-1][1] - base_acc:+.1%}) | {min(finals):.1%} - {max(finals):.1%} | "
            f"{best[1]:.1%} (step {best[0]}) | {score[-1][1]:.3f} | {wins['win_rate']:.2f} [{wins['low']:.2f}, {wins['high']:.2f}] | "
            f"{seconds / steps[-1]:.2f} | {evals / steps[-1]:.1f} | {reached} |"
        )
        curves[label] = [curve_point([done[(label, s, step)] for s in args.seeds], step) for step in steps]
    mean, low, high = mean_interval(base["passed"], bounds=(0.0, 1.0))
    lines.append(f"| base | {mean:.1%} [{low:.1%}, {high:.1%}] | | | {base_score:.3f} | | | | |")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    plot_curves(curves, curve_point([base], 0), args.output_dir)
    print(f"wrote {args.output_dir}/table.md, curves.png, {', '.join(f'{name}.png' for name, *_ in AXES)}")


if __name__ == "__main__":
    main(parse_args())
