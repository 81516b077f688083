#!/usr/bin/env python
"""The embedded default, offline on a CPU: build a tiny Stable Diffusion and a tiny Pick-a-Pic-style preference set
in code, train an Inversion-DPO LoRA with the real `train_inversion_dpo.py` through `accelerate launch`, and load
the adapter into a stock diffusers pipeline.

    python demo.py [--output_dir demo_output] [--max_train_steps 20]

The model is random, so the images mean nothing; what this shows is the whole path working end to end.
"""

import argparse
import json
import os
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--max_train_steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, HERE)
    from inversion_dpo.tiny import save_tiny_pairs, save_tiny_sd

    start = time.time()
    base = save_tiny_sd(os.path.join(args.output_dir, "base-model"))
    pairs = save_tiny_pairs(os.path.join(args.output_dir, "pairs.parquet"), num_rows=32, tie_every=8)
    print(f"built a tiny SD at {base} and 32 preference rows (4 ties) at {pairs}")

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        os.path.join(HERE, "train_inversion_dpo.py"),
        "--pretrained_model_name_or_path",
        base,
        "--dataset_name",
        pairs,
        "--output_dir",
        args.output_dir,
        "--objective",
        "inversion_dpo",
        "--inversion_target",
        "step",
        "--inversion_steps",
        "10",
        "--resolution",
        "32",
        "--train_batch_size",
        "4",
        "--max_train_steps",
        str(args.max_train_steps),
        "--learning_rate",
        "1e-3",
        "--checkpointing_steps",
        "10",
        "--checkpoints_total_limit",
        "1",
        "--validation_prompts",
        "a red circle",
        "a blue square left of a yellow triangle",
        "--validation_steps",
        "10",
        "--validation_num_inference_steps",
        "10",
        "--seed",
        "0",
        "--report_to",
        "tensorboard",
    ]
    print(" ".join(cmd[1:]))
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=HERE))

    with open(os.path.join(args.output_dir, "logs", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    print("\nstep  loss    margin      accuracy")
    for r in rows[:: max(1, len(rows) // 10)] + ([rows[-1]] if len(rows) % 10 else []):
        print(f"{r['step']:4d}  {r['loss']:.4f}  {r['margin']:+.3e}  {r['accuracy']:.2f}")

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=10, height=32, width=32, generator=g, output_type="pt").images

    before = sample()
    pipe.load_lora_weights(args.output_dir)
    change = (sample() - before).abs().mean().item()
    print(f"\nadapter: {os.path.join(args.output_dir, 'pytorch_lora_weights.safetensors')}")
    print(f"stock StableDiffusionPipeline.load_lora_weights changed the sample by {change:.4f} (mean |diff|)")
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
