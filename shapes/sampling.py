"""Sampling and scoring a (shapes-world) Stable Diffusion pipeline with fixed seeds (``load_pipeline`` and ``sample``
also serve ``evaluate.py`` for any SD, SDXL or SD3 model).

``sample`` draws K images per prompt: image j of every prompt starts from the noise of seed ``seed + j``
(common random numbers: two models, or a model with and without a LoRA, are compared on the same noise).
``evaluate`` scores them with ``shapes.scorer.score`` and reports, per group of prompts, the mean score and the
full-prompt pass rate.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from evaluation.scorers import InputError, first_line
from shapes import scorer, world


DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


def load_pipeline(model_path: str, lora_path: Optional[str] = None, torch_dtype=None):
    """An SD, SDXL or SD3 pipeline from a folder or Hub id (no safety checker; safetensors only), optionally with
    LoRA weights. SD and SDXL sample with DDIM; SD3, a flow model, keeps its own sampler (FlowMatchEulerDiscrete:
    DDIM's noise schedule does not apply to it). A model or adapter that cannot be loaded is a one-line InputError
    naming it."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    try:
        components = DiffusionPipeline.load_config(model_path)
        no_checker = {"safety_checker": None, "feature_extractor": None} if "safety_checker" in components else {}
        pipe = DiffusionPipeline.from_pretrained(
            model_path, use_safetensors=True, torch_dtype=torch_dtype, **no_checker
        )
    except (OSError, ValueError) as e:
        raise InputError(f"could not load model '{model_path}': {first_line(e)}") from None
    if not is_flow_model(pipe):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora_path:
        load_adapter(pipe, lora_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_flow_model(pipe) -> bool:
    """An SD3-style pipeline: an MMDiT ``transformer`` sampled by rectified flow, instead of a DDPM ``unet``."""
    return getattr(pipe, "transformer", None) is not None


def denoiser(pipe):
    """The pipeline's noise (or velocity) predictor: SD3's ``transformer`` or SD and SDXL's ``unet``."""
    return pipe.transformer if is_flow_model(pipe) else pipe.unet


# StableDiffusion3Pipeline's default max_sequence_length: T5 tokens per caption
SD3_T5_TOKENS = 256


def call_kwargs(pipe) -> dict:
    """What a call of ``pipe`` needs beyond the prompt and the sampler's settings. SD3 with a T5 whose tokenizer
    holds fewer than the pipeline's default 256 tokens (the shapes twin's 16) gets that many: the pipeline runs T5
    without an attention mask, so pad tokens beyond those it was trained with would change every caption state."""
    tokenizer = getattr(pipe, "tokenizer_3", None)
    if tokenizer is not None and tokenizer.model_max_length < SD3_T5_TOKENS:
        return {"max_sequence_length": tokenizer.model_max_length}
    return {}


def load_adapter(pipe, lora_path: str, adapter_name: Optional[str] = None):
    """``pipe.load_lora_weights`` from safetensors only, with a one-line InputError naming the adapter."""
    try:
        pipe.load_lora_weights(lora_path, adapter_name=adapter_name, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load adapter '{lora_path}': {first_line(e)}") from None


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    num_images: int = 1,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    size: Optional[int] = None,
) -> List[List[Image.Image]]:
    """``num_images`` images per prompt, ``size`` square (default: the model's own, 32 in the shapes world); image j
    of each prompt uses seed ``seed + j``."""
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_images)]
    out: List[List[Optional[Image.Image]]] = [[None] * num_images for _ in prompts]
    size = size or denoiser(pipe).config.sample_size * pipe.vae_scale_factor
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = pipe(
            prompt=[str(prompts[i]) for i, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(seed + j) for _, j in chunk],
            height=size,
            width=size,
            output_type="pil",
            **call_kwargs(pipe),
        ).images
        for (i, j), im in zip(chunk, images):
            out[i][j] = im
    return out


def sample_and_score(pipe, prompts: Sequence[str], num_images: int, seed: int, **sample_kwargs):
    """``sample`` then the shapes scorer: (images, results), each a list per prompt of ``num_images``."""
    images = sample(pipe, prompts, num_images, seed, **sample_kwargs)
    results = [[scorer.score(im, p) for im in ims] for p, ims in zip(prompts, images)]
    return images, results


OUTCOMES = ("pass", "relation", "objects")


def outcome(result: "scorer.ScoreResult") -> str:
    """``pass``; ``relation`` (every object right, nothing extra, only the relation wrong); or ``objects`` (an object
    missing or wrong, or an extra one)."""
    if result.passed:
        return "pass"
    return "relation" if all(result.object_present) and result.no_extra else "objects"


FAILURE_KINDS = ("pass", "relation", "colours swapped", "colour", "shape", "missing", "extra")


def failure_kind(result: "scorer.ScoreResult") -> str:
    """What one scored sample got wrong, the first that applies of ``FAILURE_KINDS``: ``pass``; ``relation`` (every
    object right, nothing extra, only the order wrong); ``colours swapped`` (two objects of different colours and
    shapes drawn each with the other's colour, nothing else); ``extra`` (more objects than the prompt names);
    otherwise the first wrong object of the prompt: ``colour`` (its shape is drawn in another colour), ``shape`` (its
    colour is drawn as another shape) or ``missing``, among the objects that match none of the prompt's."""
    kind = outcome(result)
    if kind != "objects":
        return kind
    objects, found = result.prompt.objects, {(d.color, d.shape) for d in result.detections}
    if len(objects) == 2 and len(result.detections) == 2:
        a, b = objects
        if a.color != b.color and a.shape != b.shape and found == {(b.color, a.shape), (a.color, b.shape)}:
            return "colours swapped"
    if not result.no_extra:
        return "extra"
    obj = next(o for o, ok in zip(objects, result.object_present) if not ok)
    others = found - {(o.color, o.shape) for o, ok in zip(objects, result.object_present) if ok}
    if any(shape == obj.shape for _, shape in others):
        return "colour"
    if any(color == obj.color for color, _ in others):
        return "shape"
    return "missing"


def failure_counts(results) -> Dict[str, int]:
    """``{kind: count}`` over ``FAILURE_KINDS`` for a list of results per prompt (as ``sample_and_score`` returns)."""
    counts = dict.fromkeys(FAILURE_KINDS, 0)
    for rs in results:
        for r in rs:
            counts[failure_kind(r)] += 1
    return counts


def transitions(base_results, new_results) -> Dict[str, Dict[str, int]]:
    """How each sample's outcome changed between two models sampled on the same noise (lists per prompt, as
    ``sample_and_score`` returns): ``{base outcome: {new outcome: count}}``. A preference adapter that moves only
    details keeps almost every sample where it was; one that changes composition moves ``relation`` to ``pass``."""
    table = {a: dict.fromkeys(OUTCOMES, 0) for a in OUTCOMES}
    for base, new in zip(base_results, new_results, strict=True):
        for a, b in zip(base, new, strict=True):
            table[outcome(a)][outcome(b)] += 1
    return table


@dataclass
class GroupResult:
    name: str
    num_prompts: int
    num_samples: int
    mean_score: float
    pass_rate: float

    def line(self) -> str:
        return (
            f"{self.name:<16} prompts {self.num_prompts:4d} samples {self.num_samples:5d} "
            f"mean score {self.mean_score:.3f} pass rate {self.pass_rate:.3f}"
        )


def score_group(name: str, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> GroupResult:
    results = [scorer.score(im, p) for p, ims in zip(prompts, images) for im in ims]
    return GroupResult(
        name=name,
        num_prompts=len(prompts),
        num_samples=len(results),
        mean_score=float(np.mean([r.score for r in results])) if results else float("nan"),
        pass_rate=scorer.pass_rate(results),
    )


def default_groups(num_two_object: int = 48, seed: int = 0) -> Dict[str, List[str]]:
    """single (all 12 objects), heldout-2obj and train-2obj (``num_two_object`` each, a fixed random subset)."""
    rng = np.random.default_rng(seed)

    def subset(prompts):
        prompts = [str(p) for p in prompts]
        if num_two_object and num_two_object < len(prompts):
            idx = sorted(rng.choice(len(prompts), num_two_object, replace=False))
            prompts = [prompts[i] for i in idx]
        return prompts

    return {
        "single": [str(p) for p in world.train_prompts(1)],
        "heldout-2obj": subset(world.heldout_prompts()),
        "train-2obj": subset(world.train_prompts(2)),
    }


def evaluate(
    pipe,
    groups: Dict[str, Sequence[str]],
    num_images: int = 4,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    save_dir: Optional[str] = None,
) -> List[GroupResult]:
    """Samples and scores every group; optionally saves a grid per group (rows = prompts, columns = seeds)."""
    out = []
    for name, prompts in groups.items():
        images = sample(pipe, prompts, num_images, seed, steps, guidance)
        out.append(score_group(name, prompts, images))
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            grid = Image.new("RGB", (32 * num_images, 32 * len(prompts)), "white")
            for r, ims in enumerate(images):
                for c, im in enumerate(ims):
                    grid.paste(im.resize((32, 32)), (32 * c, 32 * r))
            grid.save(os.path.join(save_dir, f"{name}.png"))
    return out
