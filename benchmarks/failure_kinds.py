#!/usr/bin/env python
"""What a shapes-world model gets wrong, base against adapters on the same noise, counted by kind of failure.

    python benchmarks/failure_kinds.py --adapters demo_output

Samples the held-out two-object prompts (``--held_images`` each) and every ``--train_every``-th train two-object
prompt (``--train_images`` each) with the base and with each adapter, at stock diffusers settings unless told (50
DDIM steps, guidance 7.5), from seeds ``--seed``, ``--seed`` + 1, ...; scores every sample and counts it under
``shapes.sampling.FAILURE_KINDS`` (pass, only the relation wrong, the two colours swapped, an extra object, an object's
colour, shape, or the object missing). Prints a markdown table, also written to ``--output`` when given.
"""

import argparse
import os
import sys


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(HERE, "models", "shapes-sd-tiny"))
    p.add_argument("--adapters", nargs="*", default=[], help="LoRA folders (or files) to compare with the base.")
    p.add_argument("--seed", type=int, default=60_000, help="Image j of every prompt starts from seed + j.")
    p.add_argument("--held_images", type=int, default=2, help="Samples per held-out prompt.")
    p.add_argument("--train_every", type=int, default=2, help="Every n-th of the 432 train two-object prompts.")
    p.add_argument("--train_images", type=int, default=1, help="Samples per train prompt.")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (stock StableDiffusionPipeline: 50).")
    p.add_argument("--guidance", type=float, default=7.5, help="Guidance scale (stock StableDiffusionPipeline: 7.5).")
    p.add_argument("--max_prompts", type=int, default=None, help="Only the first N prompts of each group.")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Torch threads for sampling.")
    p.add_argument("--output", default=None, help="Also write the table to this file.")
    args = p.parse_args(argv)
    if min(args.held_images, args.train_every, args.train_images, args.steps) < 1:
        p.error("--held_images, --train_every, --train_images and --steps must be at least 1")
    args.names = [os.path.basename(os.path.normpath(a)) for a in args.adapters]  # the table's column names
    taken = ["base"]
    for name in args.names:
        if name in taken:
            p.error(f"--adapters: two columns would be named '{name}' (give folders with different last names)")
        taken.append(name)
    return args


def main(args):
    import torch

    from shapes import sampling, world

    torch.set_num_threads(args.threads)
    first = slice(args.max_prompts)
    groups = {
        f"held-out ({args.held_images} a prompt)": (
            [str(p) for p in world.heldout_prompts()][first],
            args.held_images,
        ),
        f"train, every {args.train_every} ({args.train_images} a prompt)": (
            [str(p) for p in world.train_prompts(2)][:: args.train_every][first],
            args.train_images,
        ),
    }
    models = {"base": None, **dict(zip(args.names, args.adapters))}
    counts = {}  # (group, model) -> {kind: n}
    for name, adapter in models.items():
        pipe = sampling.load_pipeline(args.model, lora_path=adapter)
        for group, (prompts, n) in groups.items():
            _, results = sampling.sample_and_score(
                pipe, prompts, n, seed=args.seed, steps=args.steps, guidance=args.guidance
            )
            counts[group, name] = sampling.failure_counts(results)
        print(f"sampled {name}", file=sys.stderr, flush=True)
    columns = [(g, m) for g in groups for m in models]
    lines = [
        f"{args.steps} steps, guidance {args.guidance:g}, seeds from {args.seed}; samples per kind (share of the group)",
        "",
        "| kind | " + " | ".join(f"{g}: {m}" for g, m in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    totals = {col: sum(counts[col].values()) for col in columns}
    for kind in sampling.FAILURE_KINDS:
        cells = [f"{counts[col][kind]} ({100 * counts[col][kind] / totals[col]:.1f}%)" for col in columns]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    return counts


if __name__ == "__main__":
    main(parse_args())
