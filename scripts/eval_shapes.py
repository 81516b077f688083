"""Samples an SD, SDXL or SD3 pipeline (optionally with a LoRA) on shapes-world prompts with fixed seeds and scores
it.

Groups: ``single`` (the 12 single-object prompts), ``heldout-2obj`` and ``train-2obj`` (a fixed random subset of
``--num_two_object`` prompts each, or all with 0). Image j of every prompt uses seed ``--seed + j``.

    OMP_NUM_THREADS=1 python scripts/eval_shapes.py --model models/shapes-sd-tiny --num_images 4
"""

import argparse
import json
import os
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shapes import sampling  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/shapes-sd-tiny", help="an SD, SDXL or SD3 pipeline folder")
    ap.add_argument("--lora", default=None, help="a folder of LoRA weights (pipe.load_lora_weights)")
    ap.add_argument("--num_images", type=int, default=4, help="samples per prompt")
    ap.add_argument("--num_two_object", type=int, default=48, help="two-object prompts per group (0: all)")
    ap.add_argument("--prompts", nargs="*", default=None, help="score only these prompts (one group 'custom')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=sampling.DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=sampling.DEFAULT_GUIDANCE)
    ap.add_argument("--save_dir", default=None, help="write a grid image per group here")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = sampling.load_pipeline(args.model, args.lora)
    if args.prompts:
        groups = {"custom": list(args.prompts)}
    else:
        groups = sampling.default_groups(args.num_two_object, args.seed)
    results = sampling.evaluate(
        pipe, groups, args.num_images, args.seed, args.steps, args.guidance, save_dir=args.save_dir
    )
    sampler = "flow Euler" if sampling.is_flow_model(pipe) else "DDIM"  # SD3 keeps its own sampler
    print(
        f"model {args.model} lora {args.lora} | {sampler} {args.steps} steps, guidance {args.guidance}, "
        f"{args.num_images} images per prompt, seeds {args.seed}..{args.seed + args.num_images - 1}"
    )
    for r in results:
        print(r.line())
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": [r.__dict__ for r in results]}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
