#!/usr/bin/env python
"""The whole story on a CPU, offline, in minutes: a tiny text-to-image model of the shapes world gets composition
often wrong; sample it, score its images with a program, turn them into preference pairs, train an Inversion-DPO
LoRA with the real `train_inversion_dpo.py` through `accelerate launch`, and compare base and aligned on prompt
combinations held out of training, with fixed seeds.

    python demo.py [--output_dir demo_output]

Ends with the results table and one line: held-out full-prompt accuracy, base -> aligned, the paired difference with
its 95% interval, and whether the aligned model beat the base (the interval above 0). Writes to the output folder:
the adapter (`pytorch_lora_weights.safetensors`) and its card, the pairs, the results (`results.md`, that line on
top; `results.json`), a before/after grid with each sample's pass or fail (`before_after.png`), the training curve
(`training_curve.png`: the preference loss, each extra term and the preference accuracy) and the reference-side
cache of the pairs (`inversion_cache/`).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_args(input_args=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default=os.path.join(HERE, "models", "shapes-sd-tiny"),
        help="An SD, SDXL or SD3 pipeline folder, trained by the script of its architecture "
        "(models/shapes-sdxl-tiny: the SDXL twin, by train_inversion_dpo_sdxl.py; models/shapes-sd3-tiny: the SD3 "
        "twin, by train_inversion_dpo_sd3.py).",
    )
    p.add_argument(
        "--output_dir",
        default="demo_output",
        help="Where the pairs, the adapter and its card, the results and the figures are written.",
    )
    p.add_argument(
        "--pair_prompts", type=int, default=432, help="Train prompts sampled for pairs (432: every two-object one)."
    )
    p.add_argument(
        "--images_per_prompt", type=int, default=3, help="Samples per pair prompt, scored to pick winners and losers."
    )
    p.add_argument(
        "--pair_sampling_steps",
        type=int,
        default=10,
        help="DDIM steps of the samples that make the pairs (the evaluation samples at 25): 10-step samples pass "
        "about as often and cost 40%%, which buys more prompts.",
    )
    p.add_argument(
        "--pair_guidance",
        type=float,
        default=1.0,
        help="Guidance of the samples that make the pairs: 1 samples the model itself (one UNet call a step). With "
        "the sft anchor, guidance-1 winners gave 50.9%% on train prompts against 41.2%% for guidance-5 ones (single "
        "runs).",
    )
    p.add_argument(
        "--min_winner_score",
        type=float,
        default=1.0,
        help="Keep only pairs whose winner scores at least this (1.0: it passes the whole prompt); 0 keeps every "
        "pair.",
    )
    p.add_argument("--max_pairs_per_prompt", type=int, default=4, help="At most this many pairs from one prompt.")
    p.add_argument("--eval_seeds", type=int, default=2, help="Samples per held-out and single-object prompt.")
    p.add_argument(
        "--train_eval_seeds",
        type=int,
        default=1,
        help="Samples per train prompt evaluated (a quarter of them): 1 keeps the demo within its 10 minutes.",
    )
    p.add_argument("--max_eval_prompts", type=int, default=None, help="Evaluate on the first N prompts of each group.")
    p.add_argument("--seed", type=int, default=0, help="Seeds the pair samples and the training run.")
    p.add_argument("--train_args", default="", help="Extra flags for train_inversion_dpo.py, quoted.")
    return p.parse_args(input_args)


# Inversion-DPO with the objectives benchmark's best setting: the x0 target, uniform step weights, errors on v, beta
# 5000, one graph; N = 3 inversion steps (no worse than 5 on these pairs, and cheaper); 300 steps of 16 pairs at lr
# 3e-3 (over 3 training seeds +0.7 / +1.7 / +4.2 held-out points against lr 2e-3, at three evaluations). Two terms on
# the winners come with it:
# - a supervised anchor (`--sft_weight`): 300 x the sft loss at t >= 600, the levels where a sample's layout is decided
#   from pure noise, which the inverted latents (that already hold their image's layout) do not train, with a fifth of
#   its rows on the null caption so that guidance keeps its balance;
# - a reference anchor (`--anchor_weight`): 30000 x the policy's distance to the reference at t < 600, where the
#   objects' shapes are drawn: one LoRA serves every level, and without it what the other terms learn loses objects.
# Mean gains in points, held-out / train prompts, over six evaluations of one training seed at guidance 5:
# Inversion-DPO alone +5.5 / +3.5 (next to nothing on the prompts the pairs came from); with the sft anchor +9.4 /
# +7.4, losing objects where it fixed orders; with both anchors, 300 steps, +19.3 / +23.1.
# The LoRA sits on the transformer blocks' input and output projections and their MLP as well as on the attention
# projections: over 3 training seeds at stock sampling +2.2 held-out and +4.5 train points against the attention
# alone (+20.8 / +24.8 against +18.6 / +20.3), for 1.4 x the training seconds.
LORA_TARGET_MODULES = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2"
TRAIN_ARGS = [
    "--objective", "inversion_dpo", "--inversion_target", "x0", "--timestep_weighting", "uniform",
    "--inversion_steps", "3", "--inversion_chunk_steps", "3", "--train_batch_size", "16", "--max_train_steps", "300",
    "--learning_rate", "3e-3", "--beta_dpo", "5000", "--rank", "8", "--resolution", "32", "--checkpointing_steps",
    "1000", "--checkpoints_total_limit", "1", "--report_to", "tensorboard",
    "--sft_weight", "300", "--sft_min_timestep", "600", "--sft_caption_dropout", "0.2", "--anchor_weight", "30000",
    "--lora_target_modules", LORA_TARGET_MODULES,
]  # fmt: skip


# The SD3 trainer runs the same recipe with the MMDiT's names for the same places: both streams' attention
# projections (image: to_*, caption: add_*_proj, to_add_out) and both streams' MLPs; an MMDiT block has no
# proj_in/proj_out (its only proj_out is the final layer's).
SD3_LORA_TARGET_MODULES = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,ff.net.0.proj,"
                           "ff.net.2,ff_context.net.0.proj,ff_context.net.2")  # fmt: skip


def trainer_for(model: str):
    """``(script, flags)``: the training script for the model folder's architecture (read from its
    ``model_index.json``) and the flags it needs after ``TRAIN_ARGS``: for SD3 its LoRA modules and T5's caption
    length, which must match what the model was trained and is sampled with (``shapes.sampling.call_kwargs``)."""
    from diffusers import DiffusionPipeline

    components = DiffusionPipeline.load_config(model)
    if "transformer" in components:
        from shapes.sampling import SD3_T5_TOKENS

        flags = ["--lora_target_modules", SD3_LORA_TARGET_MODULES]
        if components.get("text_encoder_3", [None])[0] is None:
            flags.append("--no_t5")  # T5's states are zeros, as the pipeline runs without it
        else:
            from transformers import AutoTokenizer

            length = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_3").model_max_length
            flags += ["--max_sequence_length", str(min(length, SD3_T5_TOKENS))]
        return "train_inversion_dpo_sd3.py", flags
    return ("train_inversion_dpo_sdxl.py" if "text_encoder_2" in components else "train_inversion_dpo.py"), []


def recipe_for(model: str):
    """``(script, flags)``: the trainer of the model's architecture and ``TRAIN_ARGS`` with that architecture's own
    values in place (``trainer_for``): its LoRA modules instead of the UNet's, then its other flags."""
    script, extra = trainer_for(model)
    flags = list(TRAIN_ARGS)
    if "--lora_target_modules" in extra:
        i = extra.index("--lora_target_modules")
        flags[flags.index("--lora_target_modules") + 1] = extra[i + 1]
        extra = extra[:i] + extra[i + 2 :]
    return script, flags + extra


def fail(message: str):
    """Ends the demo with one line naming the problem, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def cpu_launch_command(script: str) -> list:
    """``accelerate launch`` of a script on one CPU process, with every launcher default given (no prompt, no
    warning about missing values)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", script]  # fmt: skip


def make_demo_pairs(pipe, args, path):
    """The demo's preference pairs (``--pair_prompts`` train prompts x ``--images_per_prompt`` samples of ``pipe``)
    written to ``path``; returns the pair generator's counts."""
    from shapes.pairs import make_pairs

    return make_pairs(
        pipe,
        args.pair_prompts,
        args.images_per_prompt,
        path,
        seed=args.seed,
        steps=args.pair_sampling_steps,
        guidance=args.pair_guidance,
        max_pairs_per_prompt=args.max_pairs_per_prompt,
        min_winner_score=args.min_winner_score or None,
    )


def train_flag(flags, name: str, default="0"):
    """The value of a trainer flag as the trainer reads it: the last ``--name value`` (or ``--name=value``) wins."""
    value = default
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


# each --loss_type's preference loss at margin 0: the policy ranks the pair as the reference does (at the first step)
LOSS_AT_NO_PREFERENCE = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 0.25}


def training_curve(rows, flags, path: str):
    """``training_curve.png``: one panel per logged term of the training loss and one for the preference accuracy,
    each with its per-step values and their running mean; returns the figure.

    The logged ``loss`` is the total, preference + sft_weight x sft + anchor_weight x anchor: with the demo's
    weights (300, 30000) the sft term dominates it, so the preference loss gets its own panel (the trainer's
    ``preference_loss`` where it logs one, otherwise the total less the weighted terms) and each extra term is shown
    unweighted, its weight in the title."""
    from evaluation.plots import new_figure, save, smoothed_panel

    rows = [r for r in rows if "loss" in r and "step" in r]
    sft_weight, anchor_weight = float(train_flag(flags, "--sft_weight")), float(train_flag(flags, "--anchor_weight"))
    no_preference = LOSS_AT_NO_PREFERENCE.get(train_flag(flags, "--loss_type", "sigmoid"))

    def preference(r):
        if "preference_loss" in r:
            return r["preference_loss"]
        return r["loss"] - sft_weight * r.get("sft", 0.0) - anchor_weight * r.get("anchor", 0.0)

    panels = [("preference loss", "loss", preference, "C0")]
    if any("sft" in r for r in rows):
        title = f"sft loss on the winners (x {sft_weight:g} in the total)"
        panels.append((title, "loss, unweighted", lambda r: r.get("sft"), "C1"))
    if any("anchor" in r for r in rows):
        title = f"reference anchor (x {anchor_weight:g} in the total)"
        panels.append((title, "distance, unweighted", lambda r: r.get("anchor"), "C2"))
    title = "preference accuracy (pairs ranked right)"
    panels.append((title, "fraction of the batch's pairs", lambda r: r.get("accuracy"), "C3"))
    window = max(1, len(rows) // 15)  # one step's batch is noisy: 20 steps of the demo's 300
    ncols = 2 if len(panels) > 2 else len(panels)
    fig, axes = new_figure(math.ceil(len(panels) / ncols), ncols, panel_size=(5.2, 3.2))
    for ax, (title, y_label, value, color) in zip(axes.flat, panels):
        points = [(r["step"], v) for r in rows for v in [value(r)] if v is not None]
        smoothed_panel(ax, points, window, title, y_label, color=color)
    if no_preference is not None:
        label = f"policy = reference ({no_preference:.3g})"
        axes.flat[0].axhline(no_preference, color="grey", linestyle="--", linewidth=1, label=label)
        axes.flat[0].legend(fontsize=8, loc="upper right")
    accuracy = axes.flat[len(panels) - 1]
    accuracy.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (0.5)")
    accuracy.set_ylim(-0.03, 1.03)
    accuracy.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(panels) :]:
        ax.remove()
    total = "preference" + "".join(f" + {w:g} x {n}" for n, w in (("sft", sft_weight), ("anchor", anchor_weight)) if w)
    objective = train_flag(flags, "--objective", "inversion_dpo")
    fig.suptitle(f"Training ({objective}), {len(rows)} steps: total loss = {total}", fontsize=11)
    save(fig, path)
    return fig


def summary(results, base_results=None):
    """One row of the results table for a model's scored samples (lists per prompt); against ``base_results`` on
    the same noise, also the win rate, the paired accuracy difference and what changed per sample."""
    from evaluation.scorers import SCORE_RANGES
    from evaluation.stats import mean_interval, paired_difference, wilson_interval, win_rate
    from shapes import sampling

    flat = [r for rs in results for r in rs]
    mean, low, high = mean_interval([r.score for r in flat], bounds=SCORE_RANGES["shapes"])
    passed = sum(r.passed for r in flat)
    acc_low, acc_high = wilson_interval(passed, len(flat))
    row = {
        "n": len(flat),
        "mean_score": mean,
        "mean_score_ci": [low, high],
        "accuracy": passed / len(flat),
        "accuracy_ci": [acc_low, acc_high],
    }
    if base_results is not None:
        base_flat = [r for rs in base_results for r in rs]
        row["win_rate"] = win_rate([r.score for r in flat], [r.score for r in base_flat])
        row["accuracy_difference"] = paired_difference([r.passed for r in flat], [r.passed for r in base_flat])
        row["transitions"] = sampling.transitions(base_results, results)
    return row


def transitions_line(group: str, table) -> str:
    """What changed per sample on the same noise: fixed and broken, by the kind of failure."""
    moves = [f"{a} -> {b} {table[a][b]}" for a, b in [("relation", "pass"), ("objects", "pass"), ("pass", "relation"),
                                                    ("pass", "objects"), ("relation", "objects")]]  # fmt: skip
    return f"{group}, per sample (base -> aligned, the same noise): " + ", ".join(moves)


REPRODUCIBILITY = (
    "Training on a CPU is not reproducible to the digit across machines (the order of its floating-point sums "
    "differs), so this run's held-out figure is one draw from the range over training seeds that the README states."
)


def headline(difference, num_prompts: int) -> str:
    """The demo's result in one line: held-out full-prompt accuracy, base -> aligned, the paired difference with its
    95% interval, and whether the aligned model beat the base (the interval is above 0)."""
    verdict = "beat the base" if difference["low"] > 0 else "did not beat the base"
    return (
        f"Held-out prompts, full-prompt accuracy: base {difference['base']:.1%} -> aligned {difference['new']:.1%}, "
        f"{100 * difference['difference']:+.1f} points [95% CI {100 * difference['low']:+.1f}, "
        f"{100 * difference['high']:+.1f}] (paired: {difference['n']} samples of {num_prompts} prompts on the same "
        f"noise): the aligned model {verdict}."
    )


def results_table(table) -> list:
    """The markdown table of every group, base and aligned rows, and the lines of what changed per sample."""
    lines = ["| prompts | model | samples | mean score [95% CI] | full-prompt accuracy [95% CI] | accuracy vs base, "
             "points [95% CI, paired] | win rate vs base [95% CI] |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for group, rows in table.items():
        for name, r in rows.items():
            win, diff = r.get("win_rate"), r.get("accuracy_difference")
            win_text = f"{win['win_rate']:.2f} [{win['low']:.2f}, {win['high']:.2f}]" if win else "-"
            diff_text = "-"
            if diff:
                diff_text = f"{100 * diff['difference']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
            lines.append(
                f"| {group} | {name} | {r['n']} | {r['mean_score']:.3f} [{r['mean_score_ci'][0]:.3f}, "
                f"{r['mean_score_ci'][1]:.3f}] | {r['accuracy']:.1%} [{r['accuracy_ci'][0]:.1%}, "
                f"{r['accuracy_ci'][1]:.1%}] | {diff_text} | {win_text} |"
            )
    changes = [transitions_line(g, rows["aligned"]["transitions"]) for g, rows in table.items() if "two-object" in g]
    return lines + [""] + changes


def main(args):
    import torch

    # before diffusers loads: importing the trainer installs its filters of known-harmless library messages
    import train_inversion_dpo  # noqa: F401
    from evaluation.plots import image_grid, save
    from shapes import sampling, world

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    if not os.path.isdir(args.model):
        fail(f"no model folder '{args.model}' (scripts/train_shapes_base.py builds it)")

    # 1. Preference pairs from the base model's own samples, scored by the program, on train prompts only
    base = sampling.load_pipeline(args.model)
    pairs_path = os.path.join(out, "pairs.parquet")
    counts = make_demo_pairs(base, args, pairs_path)
    print(f"[{time.time() - start:4.0f}s] pairs: {counts}")
    if counts["pairs"] == 0:
        fail(
            f"the {counts['samples']} samples of '{args.model}' gave no pair with a winner scoring at least "
            f"{args.min_winner_score:g}, so there is no preference pair to train on (more --images_per_prompt or "
            "--pair_prompts, a lower --min_winner_score, or a better-trained model)"
        )

    # 2. Inversion-DPO LoRA with the real training script
    script, recipe = recipe_for(args.model)
    flags = [
        "--pretrained_model_name_or_path",
        args.model,
        "--dataset_name",
        pairs_path,
        "--output_dir",
        out,
        # a rerun into the same folder trains anew; the pairs and the cache beside the run are kept
        "--overwrite_output_dir",
        "--seed",
        str(args.seed),
        # the reference side (inversions, targets, reference errors) once per pair instead of once per visit
        "--inversion_cache",
        os.path.join(out, "inversion_cache"),
        *recipe,
        *args.train_args.split(),
    ]
    print(f"[{time.time() - start:4.0f}s] accelerate launch {script} {' '.join(flags)}")
    cmd = cpu_launch_command(os.path.join(HERE, script)) + flags
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    print(f"[{time.time() - start:4.0f}s] trained")

    # 3. Base against aligned on held-out prompt combinations, the same noise for both
    aligned = sampling.load_pipeline(args.model, lora_path=out)
    groups = {  # name: (prompts, samples per prompt)
        "held-out two-object": ([str(p) for p in world.heldout_prompts()], args.eval_seeds),
        # a quarter of the 432 the pairs came from (new seeds): most of the grammar's two-object prompts are these
        "train two-object (every 4th)": ([str(p) for p in world.train_prompts(2)][::4], args.train_eval_seeds),
        "single-object": ([str(p) for p in world.train_prompts(1)], args.eval_seeds),
    }
    table, grids = {}, {}
    for group, (prompts, seeds) in groups.items():
        prompts = prompts[: args.max_eval_prompts]
        base_images, base_results = sampling.sample_and_score(base, prompts, seeds, seed=10_000)
        new_images, new_results = sampling.sample_and_score(aligned, prompts, seeds, seed=10_000)
        table[group] = {"base": summary(base_results), "aligned": summary(new_results, base_results)}
        grids[group] = (prompts, base_images, new_images, base_results, new_results)
    print(f"[{time.time() - start:4.0f}s] evaluated")

    # 4. The table with the headline on top, the grid, the curve; the headline printed last, where it is seen
    held_out = table["held-out two-object"]["aligned"]["accuracy_difference"]
    result = headline(held_out, len(grids["held-out two-object"][0]))
    text = "\n".join(results_table(table))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"{result}\n\n{REPRODUCIBILITY}\n\n{text}\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        record = {"headline": result, "pairs": counts, "table": table, "train_script": script, "train_args": flags}
        json.dump(record, f, indent=1)

    prompts, base_images, new_images, base_results, new_results = grids["held-out two-object"]
    shown = list(range(0, len(prompts), max(1, len(prompts) // 8)))[:8]
    grid = image_grid(
        {"base": [base_images[i][0] for i in shown], "aligned": [new_images[i][0] for i in shown]},
        [prompts[i] for i in shown],
        marks={
            "base": [base_results[i][0].passed for i in shown],
            "aligned": [new_results[i][0].passed for i in shown],
        },
        title="Held-out prompts, the same noise for base and aligned",
        caption="\u2713 green: the shapes scorer passes the whole prompt; \u2717 red: it does not",
    )
    save(grid, os.path.join(out, "before_after.png"))
    with open(os.path.join(out, "logs", "metrics.jsonl")) as f:
        training_curve([json.loads(line) for line in f], flags, os.path.join(out, "training_curve.png"))
    print(
        f"[{time.time() - start:4.0f}s] wrote {out}/: pytorch_lora_weights.safetensors, results.md, "
        f"before_after.png, training_curve.png"
    )
    print("\n" + text + "\n")
    print(result)


if __name__ == "__main__":
    main(parse_args())
