#!/usr/bin/env python
"""How well SD3's Euler inversion comes back: reconstruction error against the number of steps, per order, at equal
model evaluations.

    OMP_NUM_THREADS=1 python benchmarks/sd3_inversion.py                               # a tiny random SD3 (~1 min)
    OMP_NUM_THREADS=1 python benchmarks/sd3_inversion.py --model models/shapes-sd3-tiny --out \\
        benchmarks/results/sd3_inversion.md
    python benchmarks/sd3_inversion.py --model /path/to/stable-diffusion-3.5-medium --size 1024 --dtype bfloat16

Inverts ``--images`` shapes-world renders (``shapes.world.render``, resized to ``--size``) with their captions through
``pipeline_inversion_sd3.InversionSD3Pipeline.invert(order=k)``, samples each back with the pipeline's own
``__call__(caption, latents=inv.latents)`` at the same steps and guidance, and reports

- latent RMSE: between the sampled-back latent and ``z0`` (the normalised VAE mean the inversion started from);
- PSNR: of the decoded sample against the decoded ``z0`` (the VAE's own error left out), mean over images, images in
  [0, 1];
- evaluations: velocity evaluations of the inversion per image (``steps * order``; a guided one runs two transformer
  rows); sampling back costs ``steps`` more whatever the order.

Every order above 1 at ``--steps`` also gets first order at the same number of evaluations, so each row can be read
against first order at equal cost (the ``vs order 1`` column: RMSE over first order's RMSE there). ``--ode_solvers``
adds the two second-order integrators of the flow ODE that the pipeline leaves out, run in its place (two evaluations
a step): ``heun`` (``v(x, s_{i-1})``, then the mean with ``v`` at the Euler-predicted latent and ``s_i``) and
``midpoint`` (``v`` at the half step). Without ``--model`` the model is the tiny random SD3 of ``tests/tiny.py``,
saved and loaded as a real one.
"""

import argparse
import atexit
import math
import os
import shutil
import sys
import tempfile
import time
from unittest import mock


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(name, "1")
for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):  # the tiny tokenizers truncate every caption, loudly
    os.environ.setdefault(name, "error")

import torch  # noqa: E402

import pipeline_inversion_sd3  # noqa: E402
from pipeline_inversion_sd3 import InversionSD3Pipeline, InversionTrajectory, euler_move  # noqa: E402


def heun_walk(velocity_fn, z0, grid):
    """Heun's method on the flow ODE, up the grid: second order in the ODE, two evaluations a step."""
    x, latents, velocities = z0, [], []
    for i in range(len(grid.timesteps)):
        s_from, s_to = grid.sigmas[i], grid.sigmas[i + 1]
        v_from = velocity_fn(x, s_from)
        v = (v_from.float() + velocity_fn(euler_move(x, v_from, s_from, s_to), s_to).float()) / 2
        x = euler_move(x, v, s_from, s_to)
        latents.append(x)
        velocities.append(v)
    return InversionTrajectory(latents, velocities)


def midpoint_walk(velocity_fn, z0, grid):
    """The explicit midpoint method on the flow ODE, up the grid: second order in the ODE, two evaluations a step."""
    x, latents, velocities = z0, [], []
    for i in range(len(grid.timesteps)):
        s_from, s_to = grid.sigmas[i], grid.sigmas[i + 1]
        s_mid = (s_from + s_to) / 2
        v = velocity_fn(euler_move(x, velocity_fn(x, s_from), s_from, s_mid), s_mid)
        x = euler_move(x, v, s_from, s_to)
        latents.append(x)
        velocities.append(v)
    return InversionTrajectory(latents, velocities)


# name -> (invert's order, the walk put in place of its first-order one or None, evaluations per step)
METHODS = {
    "1": (1, None, 1),
    "2": (2, None, 2),
    "3": (3, None, 3),
    "heun": (1, heun_walk, 2),
    "midpoint": (1, midpoint_walk, 2),
}


def load_pipeline(model, dtype, device):
    if model is None:
        from tests.tiny import save_tiny_sd3

        # saved then loaded: `from_pretrained` puts every module in eval mode, as a built-in-code one is not (its
        # T5's dropout would make each encoding of a caption different)
        folder = tempfile.mkdtemp(prefix="tiny-sd3-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        model = save_tiny_sd3(os.path.join(folder, "model"))
    pipe = InversionSD3Pipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_images(num_images, size, seed):
    """``num_images`` renders of train prompts of the shapes world (two-object ones but every fourth), with captions."""
    import numpy as np
    from PIL import Image

    from shapes import world

    rng = np.random.default_rng(seed)
    single, double = world.train_prompts(1), world.train_prompts(2)
    prompts = [
        single[rng.integers(len(single))] if k % 4 == 3 else double[rng.integers(len(double))]
        for k in range(num_images)
    ]
    images = [world.render(p, rng).resize((size, size), Image.BICUBIC) for p in prompts]
    return images, [str(p) for p in prompts]


def decode(pipe, latents):
    """Latents as `__call__` decodes them, to images in [0, 1]."""
    config = pipe.vae.config
    latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def measure(pipe, images, captions, steps, method, guidance_scale, batch):
    """Latent RMSE and mean PSNR of inverting and sampling back ``images`` at ``steps`` with ``method``."""
    order, walk, _ = METHODS[method]
    squared, psnrs, seconds = [], [], 0.0
    for start in range(0, len(images), batch):
        chunk, texts = images[start : start + batch], captions[start : start + batch]
        started = time.perf_counter()
        with mock.patch.object(pipeline_inversion_sd3, "flow_invert", walk or pipeline_inversion_sd3.flow_invert):
            inv = pipe.invert(chunk, texts, num_inference_steps=steps, guidance_scale=guidance_scale, order=order)
        seconds += time.perf_counter() - started
        back = pipe(
            texts,
            latents=inv.latents,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=chunk[0].height,
            width=chunk[0].width,
            output_type="latent",
        ).images
        z0 = inv.image_latents.float()
        squared.append((back.float() - z0).pow(2).flatten(1).mean(1))
        mse = (decode(pipe, back) - decode(pipe, z0)).pow(2).flatten(1).mean(1)
        psnrs += [10 * math.log10(1 / max(m, 1e-20)) for m in mse.tolist()]
    return {
        "rmse": torch.cat(squared).mean().sqrt().item(),
        "psnr": sum(psnrs) / len(psnrs),
        "seconds": seconds / len(images),
    }


LEGEND = """Latent RMSE: the latent sampled back by `__call__` (Euler, same steps and guidance) against `z0`. vs order 1: that
RMSE over first order's at the same number of evaluations. PSNR: the decoded sample against the decoded `z0`, images
in [0, 1]. Evaluations: velocity evaluations of the inversion per image (a guided one is two transformer rows);
sampling back costs `steps` more. Order k: `invert(order=k)`, k - 1 fixed-point corrections a step towards the exact
inverse of the sampler's Euler step. Heun, midpoint (ODE): second-order integrators of the flow ODE in the place of
the pipeline's walk, two evaluations a step.
"""


def table(rows, guidance_scales):
    lines = [
        "| guidance | inversion | steps | evaluations | latent RMSE | vs order 1 | PSNR (dB) | inversion s / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"1": "order 1", "2": "order 2", "3": "order 3", "heun": "Heun (ODE)", "midpoint": "midpoint (ODE)"}
    rank = list(METHODS)
    for g in guidance_scales:
        first = {r["evaluations"]: r["rmse"] for r in rows if r["guidance"] == g and r["method"] == "1"}
        ours = sorted(
            (r for r in rows if r["guidance"] == g), key=lambda r: (r["evaluations"], rank.index(r["method"]))
        )
        for r in ours:
            ratio = f"{r['rmse'] / first[r['evaluations']]:.3f}" if r["evaluations"] in first else ""
            lines.append(
                f"| {g:g} | {names[r['method']]} | {r['steps']} | {r['evaluations']} | {r['rmse']:.2e} | {ratio} "
                f"| {r['psnr']:.1f} | {r['seconds']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="A local SD3 / SD3.5 diffusers folder (default: a tiny random SD3).")
    ap.add_argument("--images", type=int, default=8, help="How many shapes-world images to invert.")
    ap.add_argument("--size", type=int, default=32, help="Image side in pixels (the renders are resized to it).")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    ap.add_argument("--orders", type=int, nargs="+", default=[1, 2], choices=[1, 2, 3])
    ap.add_argument(
        "--ode_solvers", nargs="*", default=[], choices=["heun", "midpoint"], help="Also these, at --steps."
    )
    ap.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0])
    ap.add_argument("--batch", type=int, default=4, help="Images per invert / __call__.")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0, help="Picks the prompts and their layouts.")
    ap.add_argument("--out", default=None, help="Also write the table (and the command) to this markdown file.")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.model, getattr(torch, args.dtype), device)
    images, captions = shapes_images(args.images, args.size, args.seed)

    runs = {(str(method), steps) for method in args.orders + args.ode_solvers for steps in args.steps}
    runs |= {("1", steps * METHODS[method][2]) for method, steps in runs}  # first order at every equal cost
    rows = []
    for g in args.guidance_scales:
        for method, steps in sorted(runs, key=lambda run: (list(METHODS).index(run[0]), run[1])):
            result = measure(pipe, images, captions, steps, method, g, args.batch)
            evaluations = steps * METHODS[method][2]
            rows.append({"guidance": g, "method": method, "steps": steps, "evaluations": evaluations, **result})
            print(f"guidance {g:g} {method} steps {steps}: {result}", file=sys.stderr, flush=True)

    model = args.model or "tiny random SD3 (tests/tiny.py)"
    text = (
        f"Model: {model}; {args.images} shapes-world images ({args.size} px) with their captions, {args.dtype}, "
        f"{device}.\n\n{table(rows, args.guidance_scales)}\n"
    )
    print(text)
    if args.out:
        command = "python benchmarks/sd3_inversion.py " + " ".join(argv if argv is not None else sys.argv[1:])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"# SD3 inversion: reconstruction against steps and order\n\n`{command}`\n\n{text}\n{LEGEND}")
    return rows


if __name__ == "__main__":
    main()
