"""Writes shapes-world preference pairs (Pick-a-Pic schema parquet) from a model's own samples.

Train prompts only; ties dropped; the winner is randomly in position 0 or 1 (see shapes/pairs.py).

    OMP_NUM_THREADS=1 python scripts/make_pairs.py --model models/shapes-sd-tiny --num_prompts 200 \
        --images_per_prompt 4 --out out/pairs/train.parquet
"""

import argparse
import os
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shapes import sampling  # noqa: E402
from shapes.pairs import make_pairs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/shapes-sd-tiny")
    ap.add_argument("--lora", default=None, help="sample from the model with these LoRA weights")
    ap.add_argument("--num_prompts", type=int, default=200, help="distinct train prompts")
    ap.add_argument("--images_per_prompt", type=int, default=4)
    ap.add_argument("--single_fraction", type=float, default=0.0, help="share of single-object prompts")
    ap.add_argument("--max_pairs_per_prompt", type=int, default=None)
    ap.add_argument(
        "--min_winner_score", type=float, default=None, help="drop pairs whose winner scores lower (1.0: it passes)"
    )
    ap.add_argument(
        "--loser_outcome",
        choices=sampling.OUTCOMES,
        default=None,
        help="keep only pairs whose loser fails this way (relation: every object right, only the relation wrong)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=sampling.DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=sampling.DEFAULT_GUIDANCE)
    ap.add_argument("--out", required=True, help="output parquet file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = sampling.load_pipeline(args.model, args.lora)
    stats = make_pairs(
        pipe,
        args.num_prompts,
        args.images_per_prompt,
        args.out,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        single_fraction=args.single_fraction,
        max_pairs_per_prompt=args.max_pairs_per_prompt,
        min_winner_score=args.min_winner_score,
        loser_outcome=args.loser_outcome,
    )
    print(
        f"wrote {stats['pairs']} pairs to {args.out} from {stats['samples']} samples of {stats['prompts']} train "
        f"prompts (sample pass rate {stats['sample_pass_rate']:.3f}; {time.time() - t0:.0f} s)"
    )
    return stats


if __name__ == "__main__":
    main()
