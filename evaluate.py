#!/usr/bin/env python
"""Compares a base model with one or more LoRA adapters on a prompt file, with fixed seeds, under reward models.

    python evaluate.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapters sd15-inversion-dpo sd15-diffusion-dpo --prompts prompts.txt --num_images_per_prompt 4 \\
        --pickscore yuvalkirstain/PickScore_v1 --pickscore_processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K \\
        --clip_score openai/clip-vit-large-patch14 \\
        --aesthetic_clip openai/clip-vit-large-patch14 --aesthetic_head sac+logos+ava1-l14-linearMSE.safetensors \\
        --output_dir eval

Image j of every prompt starts from the noise of seed ``--seed + j`` for every model (common random numbers), so the
win rate of an adapter against the base is a paired comparison: per image, 1 if the adapter's scores higher, 1/2 on a
tie. Writes ``scores.csv`` (one row per model, prompt and seed), ``summary.csv`` (mean and win rate with 95%
intervals per model and scorer: a mean's is clipped to its score's range, the win rate's is Wilson's with ties as
half-wins; ``evaluation/stats.py``), ``grid.png`` (a row per model, a column per prompt, the first seed) and the
images. A model or adapter that is neither a local folder nor a Hub repository (offline: one in the local cache)
stops it at once, in one line.
The scorers are in ``evaluation/scorers.py``; a scorer runs only when its weights are given. HPSv2 and ImageReward
read converted folders: ``scripts/convert_scorer_weights.py`` makes them from the published checkpoints.
"""

import argparse
import csv
import os
import re

import torch

from evaluation.scorers import InputError, first_line, run_cli


def is_hub_id(name: str) -> bool:
    """A Hub repository id (``owner/name``) rather than a local path: neither part starts with a dot (``./x``)."""
    return not os.path.exists(name) and re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name) is not None


def locate(name: str, flag: str, kind: str) -> str:
    """What ``name`` (a model or an adapter) loads from, checked before anything is sampled: a local path as given; a
    Hub id as given once the Hub says it exists, or, offline or with the Hub out of reach, its snapshot in the local
    cache (diffusers does not look an adapter up in the cache without a weight name). Otherwise one line naming it as
    a missing folder: ``some/typo`` is more often a mistyped folder than a Hub repository."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if os.path.exists(name):
        return name
    missing = f"{flag}: no such {kind} folder: '{name}'"
    if not is_hub_id(name):
        raise InputError(missing)
    reason = "HF_HUB_OFFLINE is set, so the Hub is not asked"
    if not constants.HF_HUB_OFFLINE:
        try:
            HfApi().repo_info(name, timeout=10)
            return name
        except GatedRepoError:  # it exists; the download asks for access
            return name
        except RepositoryNotFoundError:
            raise InputError(f"{missing}, nor a Hub repository (a private one needs `hf auth login`)") from None
        except Exception as e:
            reason = f"the Hub could not be reached: {first_line(e, 120)}"
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not in the cache, whatever the cause: the same answer
        raise InputError(f"{missing} (nor a Hub repository in the local cache; {reason})") from None


def make_parser():
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--pretrained_model_name_or_path", required=True, help="The base model: Hub id or local folder.")
    p.add_argument("--adapters", nargs="*", default=[], help="LoRA adapters (folders or Hub ids) to compare with it.")
    p.add_argument("--adapter_names", nargs="*", default=None, help="Their names in the outputs (default: basenames).")
    p.add_argument(
        "--prompts", required=True, help="A text file, one prompt a line (blank lines and # comments skipped)."
    )
    p.add_argument("--num_images_per_prompt", type=int, default=2, help="Images per prompt and model.")
    p.add_argument(
        "--seed", type=int, default=0, help="Image j of every prompt starts from seed + j, the same for every model."
    )
    p.add_argument("--num_inference_steps", type=int, default=25, help="Sampling steps per image.")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance of the samples.")
    p.add_argument("--resolution", type=int, default=None, help="Square image size (default: the model's).")
    p.add_argument("--batch_size", type=int, default=8, help="Images sampled at once.")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="Of the diffusion pipeline.")
    p.add_argument("--device", default=None, help="Where the models run; unset: cuda when there is one, else cpu.")
    p.add_argument(
        "--output_dir", default="eval", help="Where scores.csv, summary.csv, grid.png and images/ are written."
    )
    p.add_argument("--grid_prompts", type=int, default=8, help="Prompts (columns) in grid.png.")
    g = p.add_argument_group("scorers (each runs when its weights are given: a Hub id or a local path)")
    g.add_argument("--pickscore", default=None, help="PickScore's CLIP, e.g. yuvalkirstain/PickScore_v1.")
    g.add_argument(
        "--pickscore_processor",
        default=None,
        help="Its processor where the model's folder has none (PickScore_v1: laion/CLIP-ViT-H-14-laion2B-s32B-b79K).",
    )
    g.add_argument(
        "--hpsv2",
        default=None,
        help="HPSv2 as a transformers CLIPModel folder; convert the published .pt first with: python "
        "scripts/convert_scorer_weights.py hpsv2 HPS_v2.1_compressed.pt --output_dir HPS_v2.1_compressed",
    )
    g.add_argument("--clip_score", default=None, help="A CLIP for CLIP score, e.g. openai/clip-vit-large-patch14.")
    g.add_argument("--aesthetic_clip", default=None, help="The LAION aesthetic predictor's CLIP (ViT-L/14).")
    g.add_argument("--aesthetic_head", default=None, help="Its linear head: .safetensors, or the released .pth.")
    g.add_argument(
        "--imagereward",
        default=None,
        help="ImageReward as a transformers BlipForImageTextRetrieval folder with imagereward_head.safetensors; "
        "convert the published .pt first with: python scripts/convert_scorer_weights.py imagereward ImageReward.pt "
        "--output_dir ImageReward",
    )
    g.add_argument(
        "--shapes_score", action="store_true", help="The shapes world's pixel scorer (shapes prompts only)."
    )
    return p


def parse_args(input_args=None):
    p = make_parser()
    args = p.parse_args(input_args)
    if args.adapter_names is not None and len(args.adapter_names) != len(args.adapters):
        p.error(f"--adapter_names has {len(args.adapter_names)} names for {len(args.adapters)} adapters")
    if (args.aesthetic_clip is None) != (args.aesthetic_head is None):
        p.error("--aesthetic_clip and --aesthetic_head go together")
    if args.num_images_per_prompt < 1:
        p.error("--num_images_per_prompt must be at least 1")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def read_prompts(path):
    if not os.path.isfile(path):
        raise InputError(f"--prompts: no file '{path}'")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"--prompts: '{path}' has no prompt")
    return prompts


def load_scorers(args, prompts):
    """Every scorer whose weights are given, loaded before any sampling so that a missing model fails at once."""
    from evaluation.scorers import AestheticScorer, ClipScorer, ImageRewardScorer, shapes_scorer

    scorers = {}
    for kind in ("pickscore", "hpsv2", "clip_score"):
        if getattr(args, kind):
            processor = args.pickscore_processor if kind == "pickscore" else None
            scorers[kind] = ClipScorer(kind, getattr(args, kind), processor, args.device)
    if args.imagereward:
        scorers["imagereward"] = ImageRewardScorer(args.imagereward, args.device)
    if args.aesthetic_clip:
        scorers["aesthetic"] = AestheticScorer(args.aesthetic_clip, args.aesthetic_head, args.device)
    if args.shapes_score:
        scorers["shapes"] = shapes_scorer(prompts)
    if not scorers:
        raise InputError("no scorer: give at least one of --pickscore, --hpsv2, --clip_score, --imagereward, "
                         "--aesthetic_clip/--aesthetic_head, --shapes_score")  # fmt: skip
    return scorers


def summarize(scores, names, scorer_names):
    """Rows of summary.csv: per model and scorer, the mean with its interval and, against base, the win rate."""
    from evaluation.scorers import SCORE_RANGES
    from evaluation.stats import mean_interval, win_rate

    rows = []
    for name in names:
        for scorer in scorer_names:
            mean, low, high = mean_interval(scores[name][scorer], bounds=SCORE_RANGES.get(scorer))
            row = {"model": name, "scorer": scorer, "n": len(scores[name][scorer]), "mean": mean, "mean_low": low,
                   "mean_high": high, "win_rate": "", "win_low": "", "win_high": ""}  # fmt: skip
            if name != "base":
                win = win_rate(scores[name][scorer], scores["base"][scorer])
                row.update(win_rate=win["win_rate"], win_low=win["low"], win_high=win["high"])
            rows.append(row)
    return rows


def main(args):
    # before diffusers loads: importing the trainer installs its filters of known-harmless library messages
    import train_inversion_dpo  # noqa: F401
    from evaluation.plots import image_grid, save
    from shapes import sampling

    # 1. Prompts, models, scorers: everything that can be missing is looked for before the first image
    prompts = read_prompts(args.prompts)
    model = locate(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path", "model")
    adapters = [locate(adapter, "--adapters", "adapter") for adapter in args.adapters]
    names = ["base"] + (args.adapter_names or [os.path.basename(os.path.normpath(a)) for a in args.adapters])
    if len(set(names)) != len(names):
        raise InputError(f"two models share a name ({', '.join(names)}): name them with --adapter_names")
    scorers = load_scorers(args, prompts)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = sampling.load_pipeline(model, torch_dtype=dtype).to(args.device)

    # 2. Sample every model on the same prompts and seeds; score
    images, scores = {}, {}
    for name, adapter in zip(names, [None] + adapters):
        if adapter:
            sampling.load_adapter(pipe, adapter, adapter_name=name)
        images[name] = sampling.sample(
            pipe, prompts, args.num_images_per_prompt, args.seed, args.num_inference_steps, args.guidance_scale,
            args.batch_size, args.resolution,
        )  # fmt: skip
        if adapter:
            pipe.unload_lora_weights()  # back to the base for the next adapter
        flat_images = [im for ims in images[name] for im in ims]
        flat_prompts = [p for p in prompts for _ in range(args.num_images_per_prompt)]
        scores[name] = {}
        for scorer_name, scorer in scorers.items():
            scores[name][scorer_name] = []
            for start in range(0, len(flat_images), args.batch_size):
                end = start + args.batch_size
                scores[name][scorer_name] += scorer(flat_images[start:end], flat_prompts[start:end])

    # 3. Write the scores, the summary, the images and the grid; print the summary
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "prompt_index", "prompt", "seed", *scorers])
        for name in names:
            for k in range(len(prompts) * args.num_images_per_prompt):
                i, j = divmod(k, args.num_images_per_prompt)
                writer.writerow([name, i, prompts[i], args.seed + j, *(scores[name][s][k] for s in scorers)])
                folder = os.path.join(args.output_dir, "images", name)
                os.makedirs(folder, exist_ok=True)
                images[name][i][j].save(os.path.join(folder, f"{i:04d}-{args.seed + j}.png"))
    summary = summarize(scores, names, list(scorers))
    with open(os.path.join(args.output_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    shown = prompts[: args.grid_prompts]
    first = {name: [ims[0] for ims in images[name][: len(shown)]] for name in names}
    grid = image_grid(
        first, shown, title=f"The first seed ({args.seed}) of each prompt, the same noise for every model"
    )
    save(grid, os.path.join(args.output_dir, "grid.png"))

    n = len(prompts) * args.num_images_per_prompt
    print(f"{len(prompts)} prompts x {args.num_images_per_prompt} seeds = {n} images per model; 95% intervals")
    print(f"{'model':<24} {'scorer':<12} {'mean':>22}  win rate vs base")
    for row in summary:
        mean = f"{row['mean']:.4f} [{row['mean_low']:.4f}, {row['mean_high']:.4f}]"
        win = f"{row['win_rate']:.3f} [{row['win_low']:.3f}, {row['win_high']:.3f}]" if row["win_rate"] != "" else "-"
        print(f"{row['model']:<24} {row['scorer']:<12} {mean:>22}  {win}")
    print(f"wrote {args.output_dir}/scores.csv, summary.csv, grid.png, images/")
    return summary


if __name__ == "__main__":
    run_cli(main, parse_args)
