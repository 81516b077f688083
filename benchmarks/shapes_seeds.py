#!/usr/bin/env python
"""The demo's recipe over training seeds and evaluation seeds: how much of one run's gain is the run.

    python benchmarks/shapes_seeds.py --output_dir bench_out/seeds --pairs demo_output/pairs.parquet

Trains ``demo.py``'s Inversion-DPO LoRA (its ``TRAIN_ARGS``, plus ``--train_args``) with the real
``train_inversion_dpo.py`` (for an SDXL or SD3 ``--model``, the trainer of its architecture, as the demo picks it)
through ``accelerate launch`` once per training seed on the same pairs, then samples the
base and every adapter, on the same noise, on the held-out two-object prompts at each evaluation seed set
(``--eval_seeds``, ``--eval_images`` samples per prompt from each) and on all 432 train two-object prompts (one
sample each, from ``--train_prompt_seed``), the prompts the pairs came from. Runs and evaluations already done are
reused. Writes ``results.jsonl`` and ``table.md``.

``--variants`` swaps the preference term of the recipe and keeps everything else (pairs, steps, batch, lr, beta, the
sft and anchor terms and their draws), to tell what the preference term adds. A variant may carry its own trainer flags, quoted, after the recipe's and the variant's (the
later flag wins), as Diffusion-DPO at a beta of its own:

    python benchmarks/shapes_seeds.py --output_dir bench_out/recipe --pairs demo_output/pairs.parquet \
        --variants inversion_dpo "diffusion_dpo --beta_dpo 500" no_preference --eval_seeds 50000 --eval_images 4 \
        --train_prompt_seed 50000 --eval_steps 50 --eval_guidance 7.5

``no_preference`` is the sft objective with the anchor at the recipe's ratio (``--anchor_weight`` / ``--sft_weight``)
and ``--max_grad_norm`` divided by ``--sft_weight``: the loss and the clip scaled by the same factor, which leaves
Adam's update as it was (up to its epsilon), so it trains the recipe's two terms on the winners, without the
preference term.
"""

import argparse
import json
import os
import shlex
import sys

import numpy as np


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "benchmarks"))

from shapes.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS  # noqa: E402


def variant_flags(variant, train_args):
    """Flags that turn the recipe ``train_args`` into ``variant`` (appended after it: later flags win)."""
    if variant == "inversion_dpo":
        return []
    if variant in ("diffusion_dpo", "inpo"):
        return ["--objective", variant]
    import train_inversion_dpo as trainer

    # the trainer's own parser reads the recipe: the last of a repeated flag wins, and unset flags take its defaults
    recipe = trainer.parse_args([*train_args, "--pretrained_model_name_or_path", "-", "--dataset_name", "-"])
    if recipe.sft_weight <= 0:
        raise SystemExit("error: --variants no_preference trains the recipe's sft term alone; its --sft_weight is 0")
    return ["--objective", "sft", "--sft_weight", "0", "--anchor_weight", repr(recipe.anchor_weight / recipe.sft_weight),
            "--max_grad_norm", repr(recipe.max_grad_norm / recipe.sft_weight)]  # fmt: skip


VARIANTS = ("inversion_dpo", "diffusion_dpo", "inpo", "no_preference")


def run_name(variant, seed):
    # the demo's own recipe keeps its earlier name, so that its results are reused; a variant's name carries its flags
    return f"seed {seed}" if variant == "inversion_dpo" else f"{variant} seed {seed}"


def run_folder(variant, seed):
    from shapes_objectives import run_folder as folder

    return f"seed{seed}" if variant == "inversion_dpo" else f"{folder(variant)}-seed{seed}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(HERE, "models", "shapes-sd-tiny"))
    p.add_argument("--output_dir", default="bench_out/seeds")
    p.add_argument("--pairs", default=None, help="A pairs parquet; made as demo.py makes them when not given.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds.")
    p.add_argument("--eval_seeds", type=int, nargs="+", default=[10_000, 20_000], help="First seed of each set.")
    p.add_argument("--eval_images", type=int, default=2, help="Samples per held-out prompt in each seed set.")
    p.add_argument("--train_prompt_seed", type=int, default=20_000, help="Seed of the all-train-prompt sample.")
    p.add_argument("--no_train_prompts", action="store_true", help="Skip the 432 train prompts (half the time).")
    p.add_argument("--max_train_steps", type=int, default=None, help="Instead of the demo's (its TRAIN_ARGS).")
    p.add_argument("--max_eval_prompts", type=int, default=None, help="Evaluate on the first N prompts of each set.")
    p.add_argument("--train_args", default="", help="Extra flags for train_inversion_dpo.py, quoted.")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["inversion_dpo"],
        help=f"The recipe's preference term: as the demo trains it, another pair objective, or none (see above): "
        f"{list(VARIANTS)}, each optionally followed by its own trainer flags, quoted: 'diffusion_dpo --beta_dpo 500'.",
    )
    p.add_argument("--eval_steps", type=int, default=DEFAULT_STEPS, help="DDIM steps of every sample (stock: 50).")
    p.add_argument("--eval_guidance", type=float, default=DEFAULT_GUIDANCE, help="Guidance scale (stock: 7.5).")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Torch threads of training and sampling.")
    return p.parse_args(argv)


def main(args):
    import torch
    from shapes_objectives import load_results, split_runs, train

    import demo
    from evaluation.stats import mean_interval, paired_difference
    from shapes import sampling, world

    variants = split_runs(args.variants, VARIANTS, "variant")
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    pipe = sampling.load_pipeline(args.model)
    pairs = args.pairs or os.path.join(args.output_dir, "pairs.parquet")
    if not os.path.exists(pairs):
        print(demo.make_demo_pairs(pipe, demo.parse_args([]), pairs), flush=True)

    first = slice(args.max_eval_prompts)
    groups = [
        ("held-out", [str(p) for p in world.heldout_prompts()][first], args.eval_images, s) for s in args.eval_seeds
    ]
    if not args.no_train_prompts:
        groups.append(("train", [str(p) for p in world.train_prompts(2)][first], 1, args.train_prompt_seed))
    # a set's name says what it holds, so that results of other sizes or settings are never reused for it
    settings = (args.eval_steps, args.eval_guidance)
    sampler = (
        "" if settings == (DEFAULT_STEPS, DEFAULT_GUIDANCE) else f", {settings[0]} steps, guidance {settings[1]:g}"
    )
    sets = {f"{group} {len(prompts)} x {n}, seeds {seed}-{sampler}": (prompts, n, seed)
            for group, prompts, n, seed in groups}  # fmt: skip
    results_path = os.path.join(args.output_dir, "results.jsonl")
    done = load_results(results_path, ("run", "set"))

    def evaluate(run):
        for name, (prompts, n, seed) in sets.items():
            if (run, name) in done:
                continue
            _, results = sampling.sample_and_score(
                pipe, prompts, n, seed=seed, steps=args.eval_steps, guidance=args.eval_guidance
            )
            flat = [r for rs in results for r in rs]
            done[(run, name)] = {"run": run, "set": name, "passed": [bool(r.passed) for r in flat],
                                 "both": [all(r.object_present) for r in flat]}  # fmt: skip
            with open(results_path, "a") as f:
                f.write(json.dumps(done[(run, name)]) + "\n")
            print(f"{run} on {name}: accuracy {np.mean(done[(run, name)]['passed']):.1%}", flush=True)

    evaluate("base")
    steps = [] if args.max_train_steps is None else ["--max_train_steps", str(args.max_train_steps)]
    _, recipe = demo.recipe_for(args.model)  # TRAIN_ARGS, with an SD3 model's own LoRA modules and flags
    train_args = " ".join([*recipe, *steps, args.train_args])
    recipe = shlex.split(train_args)
    for variant, (kind, extra) in variants.items():
        for seed in args.seeds:
            run_dir = os.path.join(args.output_dir, "runs", run_folder(variant, seed))
            # the objectives benchmark's trainer, with the demo's flags; its own step budget and checkpoints give way
            # to the demo's (TRAIN_ARGS names both, and the later flag wins)
            flags = argparse.Namespace(model=args.model, threads=args.threads, max_train_steps=150, eval_every=1000,
                                       train_args=shlex.join(recipe + variant_flags(kind, recipe) + extra))  # fmt: skip
            # one reference-side cache for every seed and setting, Inversion-DPO's only: it keeps one folder per key
            # (the pairs, the base, the inversion settings), so a variant that changes them gets a cache of its own
            cache = ["--inversion_cache", os.path.join(args.output_dir, "inversion_cache")]
            train(flags, variant, seed, pairs, run_dir, run_flags=cache if kind == "inversion_dpo" else [])
            sampling.load_adapter(pipe, run_dir)
            evaluate(run_name(variant, seed))
            pipe.unload_lora_weights()

    header = " | ".join(sets)
    lines = [f"Pairs `{pairs}`; demo.py's recipe{' + `' + args.train_args + '`' if args.train_args else ''}; "
             f"full-prompt accuracy (in parentheses: the share of samples with both objects right).", "",
             f"| model | {header} |", "|---|" + "---|" * len(sets)]  # fmt: skip

    def row(run):
        cells = [f"{np.mean(done[(run, name)]['passed']):.1%} ({np.mean(done[(run, name)]['both']):.0%})"
                 for name in sets]  # fmt: skip
        lines.append(f"| {run} | " + " | ".join(cells) + " |")

    def per_sample(variant, name):  # each sample's pass rate over the training seeds
        return np.mean([done[(run_name(variant, s), name)]["passed"] for s in args.seeds], axis=0)

    row("base")
    for variant in variants:
        for seed in args.seeds:
            row(run_name(variant, seed))
        gains = [per_sample(variant, name).mean() - np.mean(done[("base", name)]["passed"]) for name in sets]
        label = "" if list(variants) == ["inversion_dpo"] else f" ({variant})"
        lines.append(
            f"| mean gain over training seeds{label} | " + " | ".join(f"{100 * g:+.1f} points" for g in gains) + " |"
        )
        # every seed's samples against the base's on the same prompts and noise (Newcombe's paired interval, as the
        # league pools them): it counts the samples' spread, not the training seeds'
        cells = []
        for name in sets:
            new = [p for s in args.seeds for p in done[(run_name(variant, s), name)]["passed"]]
            d = paired_difference(new, done[("base", name)]["passed"] * len(args.seeds))
            cells.append(f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] points")
        lines.append(f"| paired gain over base, seeds pooled [95% CI]{label} | " + " | ".join(cells) + " |")
    others = [v for v in variants if v != "inversion_dpo"] if "inversion_dpo" in variants else []
    for variant in others:
        # paired on the same prompts and noise; the interval counts the samples' spread, not the training seeds'
        cells = []
        for name in sets:
            mean, low, high = mean_interval(list(per_sample(variant, name) - per_sample("inversion_dpo", name)))
            cells.append(f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] points")
        lines.append(f"| {variant} - inversion_dpo, paired [95% CI] | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main(parse_args())
