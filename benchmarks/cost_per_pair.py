#!/usr/bin/env python
"""Cost of one preference pair for every objective, with and without the reference-side cache, measured on one model
and one data set in one run: wall seconds, UNet rows with and without grad, and peak tensor memory of training, each
also as a ratio to Diffusion-DPO (= 1.00); then peak memory against the number of inversion steps N.

    OMP_NUM_THREADS=1 python benchmarks/cost_per_pair.py            # models/shapes-sd-tiny on shapes pairs (~22 min)
    OMP_NUM_THREADS=1 python benchmarks/cost_per_pair.py --tiny     # a tiny random SD and random pairs (stand-ins)

Every configuration runs the real trainer (``train_inversion_dpo.py``'s ``main``, flags as a user gives them) in a
process of its own, with one torch thread:

- seconds per pair: the median wall time of an optimizer step (``step_seconds`` in metrics.jsonl) over the steps after
  the first, divided by the pairs per step; cached runs read a cache built beforehand, whose one-off cost is shown
  apart, per pair;
- UNet rows per pair: the trainer's own count (``unet_grad_evals_per_pair``, ``unet_evals_per_pair`` in
  metrics.jsonl); "forward-equivalents" weighs a row with grad 3 (forward + backward ~ 2 forwards) and one without 1
  (method.md's cost model);
- peak memory: the largest total of tensor storages alive during ``train()`` (``benchmarks/memory.py``), i.e.
  activations, gradients, optimizer state and temporaries above the loaded weights. Measured in separate runs, as the
  counter slows the run down.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


# ---------------------------------------------------------------------------------------------------------------
# One configuration, in its own process


def child(spec: dict):
    """Runs the trainer once with ``spec["flags"]``; prints one JSON line with rows, seconds and peak memory."""
    import torch

    import train_inversion_dpo as script
    from benchmarks.memory import PeakTensorMemory

    torch.set_num_threads(1)
    peak = {}
    if spec["memory"]:
        train = script.train

        def tracked(*args, **kwargs):  # train() alone: the weights are loaded before it
            with PeakTensorMemory() as memory:
                result = train(*args, **kwargs)
            peak["bytes"] = memory.peak
            return result

        script.train = tracked
    started = time.perf_counter()
    returned = script.main(script.parse_args(spec["flags"]))
    seconds = time.perf_counter() - started
    output_dir = spec["flags"][spec["flags"].index("--output_dir") + 1]
    steps = []
    metrics_file = os.path.join(output_dir, "logs", "metrics.jsonl")
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            steps = [record for record in map(json.loads, f) if "step_seconds" in record]
    result = {
        # the trainer's own count of UNet rows per pair (with grad / without), over the run's steps
        "rows": {
            "grad": statistics.fmean(r["unet_grad_evals_per_pair"] for r in steps) if steps else 0,
            "no_grad": statistics.fmean(r["unet_evals_per_pair"] for r in steps) if steps else 0,
        },
        "steps": [r["step_seconds"] for r in steps],
        "peak": peak.get("bytes"),
        "seconds": seconds,
        "cache": returned.get("cache"),
    }
    print("RESULT " + json.dumps(result))


def run_child(flags, memory=False):
    spec = json.dumps({"flags": [str(f) for f in flags], "memory": memory})
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", spec], env=env, capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"a benchmark run failed ({' '.join(map(str, flags))}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------------------------------------
# The model and the data


def model_and_pairs(args):
    if args.tiny:
        from tests.tiny import save_tiny_pairs, save_tiny_sd

        model = os.path.join(args.work_dir, "tiny-sd")
        if not os.path.exists(model):
            save_tiny_sd(model)
        pairs = os.path.join(args.work_dir, "tiny-pairs.parquet")
        if not os.path.exists(pairs):
            save_tiny_pairs(pairs, num_rows=24)
        return model, pairs, 32
    model = os.path.join(REPO, "models", "shapes-sd-tiny")
    pairs = os.path.join(args.work_dir, "shapes-pairs.parquet")
    if not os.path.exists(pairs):
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_pairs.py"), "--model", model,
                        "--num_prompts", "24", "--images_per_prompt", "4", "--out", pairs], check=True)  # fmt: skip
    return model, pairs, 32


# ---------------------------------------------------------------------------------------------------------------
# The tables


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tiny", action="store_true", help="A tiny random SD and random pairs instead of the shapes world."
    )
    ap.add_argument("--work_dir", default=os.path.join(REPO, "out", "benchmark"))
    ap.add_argument("--inversion_steps", type=int, default=20, help="N of the cost table.")
    ap.add_argument("--batch", type=int, default=4, help="Pairs per step.")
    ap.add_argument("--steps", type=int, default=5, help="Optimizer steps of each timed run (the first is not timed).")
    ap.add_argument("--memory_steps", nargs="+", type=int, default=[5, 10, 20, 50], help="N of the memory table.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))

    os.makedirs(args.work_dir, exist_ok=True)
    model, pairs, resolution = model_and_pairs(args)
    counter = iter(range(10**6))

    def flags(extra, steps):
        return [
            "--pretrained_model_name_or_path",
            model,
            "--dataset_name",
            pairs,
            "--resolution",
            resolution,
            "--train_batch_size",
            args.batch,
            "--max_train_steps",
            steps,
            "--seed",
            0,
            "--report_to",
            "none",
            "--checkpointing_steps",
            10**6,
            "--output_dir",
            os.path.join(args.work_dir, f"run-{next(counter)}"),
            "--overwrite_output_dir",
            "--num_validation_prompts",
            0,
            "--random_flip",
            *extra,
        ]  # fmt: skip  (flips on, as when docs/experiments/cost-and-memory.md's numbers were measured; no validation samples in the timings)

    cache_root = os.path.join(args.work_dir, "caches")

    def cached(n):
        return ["--inversion_cache", cache_root, "--inversion_steps", n]

    def build_cache(n):
        """The one-off cost of the cache of N steps: seconds of an --inversion_cache_only run, and its reference rows
        per pair from its key (each flip and image: N inversion rows, twice with guidance, and N reference rows)."""
        result = run_child(flags(["--objective", "inversion_dpo"] + cached(n) + ["--inversion_cache_only"], 1))
        with open(os.path.join(result["cache"], "cache.json")) as f:
            key = json.load(f)["key"]
        result["pairs"] = key["data"]["pairs"]
        guided = key["inversion"]["guidance_scale"] != 1.0
        result["rows_per_pair"] = len(key["data"]["flips"]) * 2 * n * ((2 if guided else 1) + 1)
        return result

    N = args.inversion_steps
    inv = ["--objective", "inversion_dpo", "--inversion_steps", N]
    configs = [
        ("diffusion_dpo", ["--objective", "diffusion_dpo"]),
        ("inpo (coarse grid 10)", ["--objective", "inpo"]),
        ("sft (winners only)", ["--objective", "sft"]),
        (f"inversion_dpo N={N}, one graph", inv + ["--inversion_chunk_steps", N]),
        (f"inversion_dpo N={N}, two-pass", inv),
        (f"inversion_dpo N={N}, two-pass, k=2", inv + ["--inversion_grad_steps", 2]),
        (f"inversion_dpo N={N}, per-step margin", inv + ["--inversion_margin", "step"]),
        (f"inversion_dpo N={N}, one graph, cache", inv + cached(N) + ["--inversion_chunk_steps", N]),
        (f"inversion_dpo N={N}, two-pass, cache", inv + cached(N)),
        (f"inversion_dpo N={N}, two-pass, k=2, cache", inv + cached(N) + ["--inversion_grad_steps", 2]),
        (f"inversion_dpo N={N}, per-step margin, cache", inv + cached(N) + ["--inversion_margin", "step"]),
    ]
    started = time.time()
    builds = {}
    for n in sorted(set(args.memory_steps) | {N}):
        builds[n] = build_cache(n)
    print(f"[{time.time() - started:.0f}s] caches built", flush=True)

    results = []
    for name, extra in configs:
        timed = run_child(flags(extra, args.steps))
        memory = run_child(flags(extra, 2), memory=True)
        results.append(
            {
                "name": name,
                "seconds": statistics.median(timed["steps"][1:]) / args.batch,
                "grad": timed["rows"]["grad"],
                "no_grad": timed["rows"]["no_grad"],
                "peak": memory["peak"],
            }
        )
        print(f"[{time.time() - started:.0f}s] {name}: {results[-1]}", flush=True)

    base = results[0]
    print("\n## Cost per pair (one optimizer step of", args.batch, "pairs; ratios to diffusion_dpo)\n")
    print("| objective | s / pair | x | UNet rows with grad / without | forward-equivalents | x | peak memory | x |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        fe, base_fe = 3 * r["grad"] + r["no_grad"], 3 * base["grad"] + base["no_grad"]
        print(f"| {r['name']} | {r['seconds']:.4f} | {r['seconds'] / base['seconds']:.2f} | "
              f"{r['grad']:.1f} / {r['no_grad']:.1f} | {fe:.1f} | {fe / base_fe:.2f} | "
              f"{r['peak'] / 2**20:.1f} MiB | {r['peak'] / base['peak']:.2f} |")  # fmt: skip
    b = builds[N]
    print(f"\nBuilding the cache of N = {N} once (both flips, {b['pairs']} pairs, a whole run with start-up): "
          f"{b['seconds'] / b['pairs']:.3f} s and {b['rows_per_pair']} reference UNet rows per pair; "
          f"each epoch from the cache saves the reference side of every pair.")  # fmt: skip

    print("\n## Peak memory of training against N (inversion_dpo, target step)\n")
    modes = [
        ("one graph", lambda n: ["--inversion_chunk_steps", n]),
        ("two-pass", lambda n: []),
        ("two-pass, cache", lambda n: cached(n)),
        ("per-step margin, cache", lambda n: cached(n) + ["--inversion_margin", "step"]),
    ]
    table = {}
    for mode, extra in modes:
        for n in args.memory_steps:
            table[mode, n] = run_child(flags(["--objective", "inversion_dpo", "--inversion_steps", n] + extra(n), 2),
                                       memory=True)["peak"]  # fmt: skip
        print(f"[{time.time() - started:.0f}s] {mode} done", flush=True)
    first, last = args.memory_steps[0], args.memory_steps[-1]
    print("| mode | " + " | ".join(f"N = {n}" for n in args.memory_steps) + f" | N = {last} / N = {first} |")
    print("|---|" + "---|" * (len(args.memory_steps) + 1))
    for mode, _ in modes:
        cells = " | ".join(f"{table[mode, n] / 2**20:.1f} MiB" for n in args.memory_steps)
        print(f"| {mode} | {cells} | {table[mode, last] / table[mode, first]:.2f} |")
    print(f"\n(diffusion_dpo: {base['peak'] / 2**20:.1f} MiB; total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
