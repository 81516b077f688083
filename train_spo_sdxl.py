#!/usr/bin/env python
# Copyright 2026 The Inversion-DPO authors. Licensed under the Apache License, Version 2.0.
"""SPO (step-aware preference optimization) LoRA training for Stable Diffusion XL.

    accelerate launch train_spo_sdxl.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --prompts yuvalkirstain/pickapic_v1_no_images --prompt_column caption \\
        --preference_model step_aware --preference_model_path sdxl-step-aware-preference-model \\
        --use_8bit_adam --mixed_precision fp16 --gradient_checkpointing --output_dir sdxl-spo

SPO (Liang et al. 2024, arXiv 2406.04314) learns from prompts, not from pairs: the model being trained samples with
DDIM (eta 1), and at each trained step k candidates of the next latent are drawn from one shared ``x_t``; a
preference model scores each candidate's predicted clean image, the best and the worst make a pair (kept when their
scores differ enough), and one candidate chosen at random continues the chain. The loss is a DPO loss on the two
transitions' log-probabilities under the policy and the reference (the UNet with its adapter off), with the clipped
ratio of the official code. ``docs/method.md`` gives the math; section 4 holds it as functions of tensors.

The official SDXL run branches once per segment of 4 steps (``--spo_segment_steps 4``, segments
751->551->351->151->0): k = 2 candidates share the segment's first ``x_t``, each runs 3 more steps on its own and
is scored at the segment's end; the loss is on the shared first step.

The adapter lands in ``sdxl-spo/pytorch_lora_weights.safetensors``;
``StableDiffusionXLPipeline.load_lora_weights("sdxl-spo")`` loads it.

One file, as the diffusers training examples are: it imports installed packages only. Everything but SDXL's text
encoders and conditioning (section 5) and the official SDXL run's defaults is a marked copy of ``train_spo.py``
(``# Copied from ...``; ``python scripts/check_copies.py`` checks them).
"""

import argparse
import ctypes
import importlib
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union


# Known-harmless messages of the libraries below, each dropped by a filter on the logger that emits it (so nothing
# else they say is lost). Installed before the imports (hence the file's E402 exemption).
# ruff: noqa: E402
# Copied from train_spo.HARMLESS_MESSAGES
HARMLESS_MESSAGES = {
    # bitsandbytes' CPU backend looks for the optional `kernels` package at import; only 4-bit layers would use it
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    # without torchvision, transformers' image processors fall back to their PIL versions; the trainers use none
    "transformers.utils.import_utils": r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back",
    # `.to(dtype)` lists the modules a model keeps in float32: an empty list leaves nothing to keep
    "diffusers.models.modeling_utils": r"There are modules in \w+ that should be kept in float32: \[\]\.",
}


# Copied from train_spo.silence_harmless_messages
def silence_harmless_messages():
    for name, pattern in HARMLESS_MESSAGES.items():
        logging.getLogger(name).addFilter(lambda record, p=re.compile(pattern): not p.match(record.getMessage()))


silence_harmless_messages()

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_unet_state_dict_to_peft
from huggingface_hub import HfApi, ModelCard, ModelCardData, is_offline_mode, try_to_load_from_cache
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


logger = logging.getLogger(__name__)

# What differs between this script and its SDXL copy, besides section 5: the pipeline, the card's tag, and the
# official runs' settings (SD 1.5: k = 4 candidates of one step, threshold 0.3, LoRA rank 4, lr 6e-5; SDXL: k = 2
# candidates each run 4 steps, threshold 0.4, rank 64, lr 1e-5)
PIPELINE_CLASS = StableDiffusionXLPipeline  # saves and loads the LoRA, samples the validation images
ARCHITECTURE = "stable-diffusion-xl"  # the model card's tag
DEFAULT_RESOLUTION = 1024
DEFAULT_POOL_SIZE = 2
DEFAULT_SEGMENT_STEPS = 4
DEFAULT_THRESHOLD = 0.4
DEFAULT_RANK = 64
DEFAULT_LEARNING_RATE = 1e-5

# Copied from train_spo.LORA_TARGET_MODULES
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]

# Copied from train_spo.LR_SCHEDULERS
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]

# --preference_model: a step-aware preference model, an image-text scorer applied to the predicted clean image (not
# step-aware: the timestep is ignored), a plugin FILE.py:FUNCTION, or a name standing for a plugin beside this script
# Copied from train_spo.STEP_AWARE
STEP_AWARE = "step_aware"
# Copied from train_spo.SCORER_KINDS
SCORER_KINDS = ("pickscore", "hpsv2", "clip_score", "aesthetic", "imagereward")
# Copied from train_spo.PLUGIN_ALIASES
PLUGIN_ALIASES = {"shapes": "shapes/preference.py:score"}  # the shapes world's scorer (the embedded default)


# Copied from train_spo.InputError
class InputError(ValueError):
    """Bad input (a flag, a path, the data): the run stops with this one line, exit code 2, before any training."""


# Copied from train_spo.TrainingError
class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, gradient or weight); the message is one line naming the step."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Flags


# Copied from train_spo.parse_args
def parse_args(input_args=None):
    return check_args(make_parser().parse_args(input_args))


# Copied from train_spo.make_parser
def make_parser() -> argparse.ArgumentParser:
    """The flags, each with a help text (so that --help shows every default); docs/flags.md is written from them."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers folder.")
    g.add_argument("--revision", default=None, help="The model's git revision on the Hub (a branch, tag or commit).")
    g.add_argument("--variant", default=None, help="Weights variant, e.g. fp16.")
    g.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE in place of the model's (Hub id or folder), e.g. stabilityai/sd-vae-ft-mse, or for SDXL "
        "madebyollin/sdxl-vae-fp16-fix. A VAE whose config asks for force_upcast (SDXL's own: it overflows in fp16) "
        "stays in fp32; a fp16-safe one runs in --mixed_precision.",
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompts",
        required=True,
        help="A text file with one prompt a line; or a JSON-lines, JSON, CSV or parquet file, a folder of them, a "
        "save_to_disk folder or a Hub dataset, read from --prompt_column (Pick-a-Pic's captions work as they are). "
        "Empty prompts are skipped and duplicates kept once, both counted.",
    )
    g.add_argument("--prompt_column", default="caption", help="The column of --prompts that holds the prompts.")
    g.add_argument("--dataset_config_name", default=None, help="The dataset's configuration, if it has several.")
    g.add_argument("--dataset_split_name", default="train", help="The split to read.")
    g.add_argument("--cache_dir", default=None, help="Where datasets caches downloads (its default cache if unset).")
    g.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N distinct prompts.")
    g.add_argument(
        "--resolution",
        type=int,
        default=DEFAULT_RESOLUTION,
        help="Square size in pixels (a multiple of 8) of the images sampled in training.",
    )
    g = p.add_argument_group("sampling (the policy's own trajectories, DDIM with noise)")
    g.add_argument("--num_inference_steps", type=int, default=20, help="DDIM steps of a training trajectory.")
    g.add_argument(
        "--eta",
        type=float,
        default=1.0,
        help="DDIM's eta: the share of the DDPM posterior's noise in each step (1 = DDPM's variance; above 0, since "
        "the candidates differ only by their noise).",
    )
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=5.0,
        help="Classifier-free guidance of the training trajectories; the log-probabilities are those of the guided "
        "step, as in the official code.",
    )
    g = p.add_argument_group("SPO")
    g.add_argument(
        "--spo_pool_size",
        type=int,
        default=DEFAULT_POOL_SIZE,
        help="k, the candidates drawn from one shared x_t at each trained step (official: 4 for SD 1.5, 2 for SDXL).",
    )
    g.add_argument(
        "--spo_untrained_steps",
        type=int,
        default=4,
        help="The first this many steps of a trajectory are sampled plainly and not trained (official: 4 of 20, "
        "t > 750).",
    )
    g.add_argument(
        "--spo_segment_steps",
        type=int,
        default=DEFAULT_SEGMENT_STEPS,
        help="Each candidate runs this many steps (the first from the shared x_t, then on its own) before it is "
        "scored at the segment's end; the next pool starts there. 1: a pool at every step (official SD 1.5); 4: the "
        "official SDXL run's segments 751->551->351->151->0.",
    )
    g.add_argument(
        "--spo_threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="A pool's pair is kept only when softmax([s_w, s_l]) of the winner's and loser's scores differs by more "
        "than this (official: 0.3 SD 1.5, 0.4 SDXL); others are skipped and counted.",
    )
    g.add_argument(
        "--spo_beta",
        type=float,
        default=10.0,
        help="beta of the loss -log sigmoid(beta (log r_w - log r_l)), r the clipped policy/reference ratio of a "
        "transition's probability (official: 10).",
    )
    g.add_argument(
        "--spo_clip",
        type=float,
        default=0.1,
        help="The ratio is clamped to [1 - this, 1 + this] (official 0.1): no gradient beyond it, a trust region.",
    )
    g.add_argument(
        "--spo_lookahead_steps",
        type=int,
        default=0,
        help="0: score each candidate's predicted clean image at its timestep (the official code, for a step-aware "
        "model). N: score the image that N deterministic DDIM steps of the policy make from it, at t = 0 (this "
        "project's extension, for a step-unaware scorer such as shapes or PickScore; N more guided calls per "
        "candidate).",
    )
    g = p.add_argument_group("preference model")
    g.add_argument(
        "--preference_model",
        default=STEP_AWARE,
        help=f"{STEP_AWARE}: SPO's step-aware preference model (a folder written by "
        "scripts/convert_step_aware_preference_model.py); "
        f"{', '.join(SCORER_KINDS)}: that image-text scorer on the candidate's predicted clean image (not "
        "step-aware, a baseline); shapes: the shapes world's scorer (shapes/preference.py beside this script), no "
        "download; FILE.py:FUNCTION: your own, called as FUNCTION(images, prompts, timesteps) with PIL images, "
        "returning one score per image, higher preferred.",
    )
    g.add_argument(
        "--preference_model_path",
        default=None,
        help=f"The weights of --preference_model {STEP_AWARE} or of a scorer: a Hub id or a local folder (for "
        "aesthetic, its CLIP ViT-L/14; hpsv2 and imagereward read folders that scripts/convert_scorer_weights.py "
        "writes).",
    )
    g.add_argument(
        "--preference_model_processor",
        default=None,
        help="pickscore, hpsv2, clip_score: the CLIP processor, if not in --preference_model_path "
        "(PickScore's is laion/CLIP-ViT-H-14-laion2B-s32B-b79K).",
    )
    g.add_argument("--preference_model_head", default=None, help="aesthetic: its linear head (.safetensors, .pth).")
    g.add_argument(
        "--preference_score_scale",
        type=float,
        default=1.0,
        help="Scores are multiplied by this before the threshold's softmax: PickScore and the step-aware models are "
        "logits already (1); a cosine such as HPSv2's needs about 100.",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--output_dir",
        default="spo-lora",
        help="Where the adapter, its card, the checkpoints and the logs are written. A folder that holds a run "
        "(checkpoints, logs or an adapter) is continued with --resume_from_checkpoint latest, or started over with "
        "--overwrite_output_dir; otherwise the run stops before touching it.",
    )
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start over in an --output_dir that holds a run: its checkpoints, logs, adapter, card, samples and "
        "validation images are removed first (nothing else in the folder).",
    )
    g.add_argument("--logging_dir", default="logs", help="Under output_dir; metrics.jsonl is written there.")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seeds the prompt order, the sampling noise and the choice of the continuing candidate.",
    )
    g.add_argument("--train_batch_size", type=int, default=1, help="Prompts (trajectories) per device per micro-step.")
    g.add_argument(
        "--num_train_epochs", type=int, default=1, help="Passes over the prompts (unless --max_train_steps)."
    )
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-steps (trajectory batches) whose gradients make one optimizer step.",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute the UNet's activations in the backward: less memory, about a third more compute.",
    )
    g.add_argument(
        "--learning_rate", type=float, default=DEFAULT_LEARNING_RATE, help="AdamW's learning rate of the LoRA weights."
    )
    g.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps, batch size and number of processes.",
    )
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=LR_SCHEDULERS,
        help="The learning rate's schedule over --max_train_steps (diffusers' get_scheduler).",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Steps of linear warm-up of the learning rate.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-4, help="AdamW's decoupled weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon.")
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="Clip the gradient's norm to this; 0 measures it (logged as grad_norm) without clipping.",
    )
    g.add_argument("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank (alpha = rank).")
    g.add_argument(
        "--lora_target_modules",
        default=",".join(LORA_TARGET_MODULES),
        help="Comma-separated UNet module names (peft suffix match) that get LoRA: the attention projections by "
        "default; add e.g. conv1,conv2,proj_in,proj_out for the ResNet convolutions and the transformer projections.",
    )
    g.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Frozen weights in this dtype; LoRA weights stay fp32. Defaults to accelerate's config.",
    )
    g.add_argument(
        "--allow_tf32", action="store_true", help="TF32 matrix products on Ampere and newer GPUs: faster fp32 steps."
    )
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="xformers' attention (CUDA only; PyTorch 2's own SDPA is used otherwise).",
    )
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    g = p.add_argument_group("checkpoints")
    g.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a checkpoint-N folder every this many steps (and always after the last step).",
    )
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='A checkpoint folder, or "latest": the last readable checkpoint-N of --output_dir (an unreadable one is '
        "skipped with a warning). The metrics of steps after it are dropped from the log before the run continues.",
    )
    g = p.add_argument_group("validation")
    g.add_argument(
        "--validation_prompts",
        nargs="+",
        default=None,
        help="Sampled every --validation_steps and at the end with fixed seeds; the final samples go into the model "
        "card. Unset: the first --num_validation_prompts prompts.",
    )
    g.add_argument(
        "--num_validation_prompts",
        type=int,
        default=4,
        help="Without --validation_prompts: validate on this many of the prompts; 0 turns validation off.",
    )
    g.add_argument(
        "--validation_steps", type=int, default=200, help="Sample the validation prompts every this many steps."
    )
    g.add_argument(
        "--validation_num_inference_steps", type=int, default=20, help="DDIM steps of the validation samples."
    )
    g.add_argument("--validation_guidance_scale", type=float, default=5.0, help="Guidance of the validation samples.")
    g = p.add_argument_group("hub")
    g.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the adapter, its card and the samples to the Hub at the end.",
    )
    g.add_argument(
        "--hub_model_id", default=None, help="The Hub repository (owner/name); default: the output folder's name."
    )
    g.add_argument("--hub_token", default=None, help="A Hub token; default: the one `hf auth login` stored.")
    g.add_argument(
        "--license",
        default=None,
        help="The card's license. Default: the base model's, read from its card when at hand (a local folder or the "
        'Hub cache), else "other".',
    )
    return p


# Copied from train_spo.check_args
def check_args(args):
    """One-line errors (exit 2) for flags that cannot work together; fills defaults that follow from others."""
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "num_inference_steps",
        "spo_pool_size",
        "spo_segment_steps",
        "rank",
        "resolution",
        "checkpointing_steps",
        "validation_steps",
        "validation_num_inference_steps",
        "num_train_epochs",
        "max_train_steps",
        "max_train_samples",
        "checkpoints_total_limit",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in (
        "num_validation_prompts",
        "lr_warmup_steps",
        "spo_untrained_steps",
        "spo_clip",
        "spo_lookahead_steps",
    ):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must be at least 0, got {getattr(args, name):g}")
    for name in ("learning_rate", "spo_beta", "eta", "preference_score_scale"):
        if not getattr(args, name) > 0:  # also refuses nan
            raise InputError(f"--{name} must be above 0, got {getattr(args, name):g}")
    if args.spo_pool_size < 2:
        raise InputError(f"--spo_pool_size must be at least 2 (a winner and a loser), got {args.spo_pool_size}")
    if not 0 <= args.spo_threshold < 1:
        raise InputError(f"--spo_threshold must be in [0, 1) (a difference of two softmax probabilities), got "
                         f"{args.spo_threshold:g}")  # fmt: skip
    if args.spo_clip >= 1:
        raise InputError(f"--spo_clip must be below 1 (the ratio's lower bound is 1 - it), got {args.spo_clip:g}")
    if args.spo_untrained_steps >= args.num_inference_steps:
        raise InputError(
            f"--spo_untrained_steps ({args.spo_untrained_steps}) leaves no step of the {args.num_inference_steps} "
            "to train"
        )
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise InputError(
            "--overwrite_output_dir starts the run over, --resume_from_checkpoint continues it: pass one of them"
        )
    kind = args.preference_model
    if kind not in (STEP_AWARE, *SCORER_KINDS, *PLUGIN_ALIASES) and ".py:" not in kind:
        raise InputError(
            f"--preference_model '{kind}' is none of {STEP_AWARE}, {', '.join(SCORER_KINDS)}, "
            f"{', '.join(PLUGIN_ALIASES)}, or FILE.py:FUNCTION"
        )
    if kind in (STEP_AWARE, *SCORER_KINDS) and not args.preference_model_path:
        hint = " (a folder written by scripts/convert_step_aware_preference_model.py)" if kind == STEP_AWARE else ""
        raise InputError(f"--preference_model {kind} needs --preference_model_path{hint}")
    if kind == "aesthetic" and not args.preference_model_head:
        raise InputError("--preference_model aesthetic needs --preference_model_head (the linear head's file)")
    if args.resolution % 8:
        raise InputError(f"--resolution must be a multiple of 8, got {args.resolution}")
    args.logging_dir = os.path.join(args.output_dir, args.logging_dir)
    return args


# Copied from train_spo.local_path_like
def local_path_like(name: str) -> bool:
    """A string that can only name a local path: absolute, starting with ``.`` or ``~``, with more than one ``/``, or
    an existing file (a Hub id is ``name`` or ``owner/name``)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.isfile(name)


# Copied from train_spo.check_model_path
def check_model_path(flag: str, name: str, index_file: str, revision: Optional[str] = None):
    """A one-line InputError for a model that cannot load: a local path that is not a folder, or, offline, a Hub id
    that is not in the Hub cache. Cheap: no weight is read; online, a Hub id is left to the load itself."""
    if os.path.isdir(name):
        return
    if os.path.isfile(name):
        raise InputError(
            f"{flag}: no such folder: '{name}' is a file; pass the model's diffusers folder (the one with "
            f"{index_file}) or a Hub id"
        )
    if local_path_like(name) or not is_hub_id(name):
        expanded = os.path.expanduser(name)
        hint = (
            f" (a quoted ~ is not expanded: write {expanded})" if expanded != name and os.path.isdir(expanded) else ""
        )
        raise InputError(f"{flag}: no such folder: '{name}'{hint}")
    if is_offline_mode():
        try:
            cached = try_to_load_from_cache(name, index_file, revision=revision)
        except Exception:  # a name the Hub would refuse as an id is not in its cache either
            cached = None
        if not isinstance(cached, str):
            raise InputError(
                f"{flag}: '{name}' is not a local folder and not in the Hub cache, and HF_HUB_OFFLINE=1 allows no "
                "download: pass the model's local folder, or run once online to cache it"
            )


# Copied from train_spo.check_paths
def check_paths(args):
    """One-line errors (exit 2) for the paths and names a user typed, before anything is written or loaded: the
    models, the prompts, the preference model, the checkpoint to resume, and an --output_dir that holds a run."""
    check_model_path(
        "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "model_index.json", args.revision
    )
    if args.pretrained_vae_model_name_or_path:
        check_model_path("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, "config.json")
    named_file = args.prompts.lower().endswith((".txt", *LOCAL_FORMATS))  # a Hub id has no such suffix
    if (local_path_like(args.prompts) or named_file) and not os.path.exists(args.prompts):
        raise InputError(f"--prompts: no such file or folder: '{args.prompts}'")
    path = args.preference_model_path
    if path and local_path_like(path) and not os.path.exists(path):
        raise InputError(f"--preference_model_path: no such file or folder: '{path}'")
    resume = args.resume_from_checkpoint
    if resume not in (None, "latest") and not os.path.isdir(resume):
        raise InputError(f"--resume_from_checkpoint: no such folder: '{resume}'")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir: '{args.output_dir}' is a file; pass a folder (it is created if missing)")
    found = previous_run(args)
    if found and not (resume or args.overwrite_output_dir):
        raise InputError(
            f"--output_dir '{args.output_dir}' holds a run ({', '.join(found)}): continue it with "
            "--resume_from_checkpoint latest, or start over with --overwrite_output_dir"
        )


# ---------------------------------------------------------------------------------------------------------------
# 2. Prompts


# Copied from train_spo.DataError
class DataError(InputError):
    """Bad input data; the message is one line naming the dataset, the column or the row."""


# Copied from train_spo.first_line
def first_line(error: Exception, limit: int = 300) -> str:
    """An exception's message cut to its first line, for one-line errors; a line over ``limit`` characters is cut at
    a space, never inside a word or a path, and ends in an ellipsis."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0].strip()
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit)
    return (line[:cut] if cut > 0 else line).rstrip(" ,;:") + " ..."


# Copied from train_spo.LOCAL_FORMATS
LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


# Copied from train_spo.load_pairs_dataset
def load_pairs_dataset(name_or_path: str, config_name=None, split: str = "train", cache_dir=None):
    """Loads a Hub id or a local path (parquet/json/jsonl/csv file, a folder of such files or an imagefolder with
    metadata, or a ``save_to_disk`` folder). Returns ``(dataset, base_dir)``; relative image paths resolve
    against ``base_dir``."""
    if os.path.isfile(name_or_path):
        builder = LOCAL_FORMATS.get(os.path.splitext(name_or_path)[1].lower())
        if builder is None:
            raise DataError(f"dataset file '{name_or_path}' is not one of {sorted(LOCAL_FORMATS)}")
        try:
            ds = datasets.load_dataset(builder, data_files=name_or_path, split="train", cache_dir=cache_dir)
        except Exception as e:  # an empty or unreadable file surfaces as datasets' generation error
            if builder == "parquet" and _parquet_rows(name_or_path) == 0:
                raise DataError(f"dataset file '{name_or_path}' has no rows") from None
            cause = e.__cause__ or e
            raise DataError(
                f"could not read dataset file '{name_or_path}' as {builder} "
                f"({type(cause).__name__}: {first_line(cause)})"
            ) from None
        return ds, os.path.dirname(os.path.abspath(name_or_path))
    if os.path.isdir(name_or_path):
        base_dir = os.path.abspath(name_or_path)
        if any(os.path.exists(os.path.join(name_or_path, f)) for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(name_or_path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"dataset '{name_or_path}' has no split '{split}' (splits: {list(ds)})")
                ds = ds[split]
            return ds, base_dir
        return datasets.load_dataset(name_or_path, config_name, split=split, cache_dir=cache_dir), base_dir
    try:
        return datasets.load_dataset(name_or_path, config_name, split=split, cache_dir=cache_dir), os.getcwd()
    except Exception as e:  # datasets raises many kinds here; all mean the same to a user
        raise DataError(
            f"could not load dataset '{name_or_path}': it is not a local file or folder, and loading it from the "
            f"Hub failed ({type(e).__name__}: {first_line(e)}); offline, pass a local path"
        ) from None


# Copied from train_spo._parquet_rows
def _parquet_rows(path: str):
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None


# Copied from train_spo.load_prompts
def load_prompts(args) -> Tuple[List[str], Dict[str, int]]:
    """The distinct non-empty prompts of --prompts, in order, and their counts (rows read, empty, duplicates)."""
    source = args.prompts
    if os.path.isfile(source) and source.lower().endswith(".txt"):
        try:
            with open(source, encoding="utf-8") as f:
                values = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--prompts '{source}': cannot read it as UTF-8 text ({first_line(e)})") from None
        where = f"--prompts '{source}'"
    else:
        dataset, _ = load_pairs_dataset(source, args.dataset_config_name, args.dataset_split_name, args.cache_dir)
        if args.prompt_column not in dataset.column_names:
            raise DataError(
                f"--prompts '{source}' has no column '{args.prompt_column}' (columns: "
                f"{', '.join(dataset.column_names)}); name the prompts' column with --prompt_column"
            )
        values = dataset.select_columns([args.prompt_column])[args.prompt_column]  # no image column is decoded
        where = f"--prompts '{source}', column '{args.prompt_column}'"
    prompts, seen, empty = [], set(), 0
    for value in values:
        if not isinstance(value, str) or not value.strip():
            empty += 1
            continue
        prompt = value.strip()
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"{where}: no prompt in its {plural(len(values), 'row')}")
    counts = {
        "prompt_rows": len(values),
        "empty_prompts": empty,
        "duplicate_prompts": len(values) - empty - len(prompts),
    }
    if args.max_train_samples:
        prompts = prompts[: args.max_train_samples]
    counts["prompts"] = len(prompts)
    return prompts, counts


# Copied from train_spo.prompt_stream
def prompt_stream(prompts: Sequence[str], seed: int, start: int, count: int) -> List[str]:
    """Positions ``start .. start + count - 1`` of an endless stream of the prompts, each epoch a new permutation
    drawn from ``seed`` and the epoch: a pure function of the position, so a resumed run reads on where it stopped."""
    out, n, orders = [], len(prompts), {}
    for position in range(start, start + count):
        epoch, index = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(prompts[int(orders[epoch][index])])
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3. DDIM with noise (Song et al. 2021, arXiv 2010.02502, eq. 12 and 16)


# Copied from train_spo.Alpha
Alpha = Union[float, torch.Tensor]


# Copied from train_spo._as_tensor
def _as_tensor(a: Alpha, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=torch.float32, device=like.device)
    # per-sample alphas of shape [B] broadcast over the remaining dims of x
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a


# Copied from train_spo.PREDICTION_TYPES
PREDICTION_TYPES = ("epsilon", "v_prediction")


# Copied from train_spo.eps_from_prediction
def eps_from_prediction(out: torch.Tensor, x_t: torch.Tensor, a_t: Alpha, prediction_type: str) -> torch.Tensor:
    """The noise prediction implied by a UNet output of ``prediction_type`` at ``x_t`` (level ``a_t``).

    ``v_prediction`` (Salimans & Ho 2022; SD 2.x's 768-v models): ``v = sqrt(a) eps - sqrt(1 - a) x0`` and
    ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` give ``eps = sqrt(a) v + sqrt(1 - a) x_t``.
    """
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        a_t = _as_tensor(a_t, x_t)
        return a_t.sqrt() * out + (1 - a_t).sqrt() * x_t
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")


# Copied from train_spo.DDIMGrid
class DDIMGrid(NamedTuple):
    """The N-step grid of a DDIM scheduler, ascending in noise.

    ``timesteps[i]`` is the label of level ``i + 1``; ``alphas[0]`` is the clean level (the scheduler's
    ``final_alpha_cumprod``, where sampling ends and inversion starts) and ``alphas[i + 1]`` that of
    ``timesteps[i]``.
    """

    timesteps: torch.Tensor  # [N] long, ascending
    alphas: torch.Tensor  # [N + 1] float32


# Copied from train_spo.ddim_grid
def ddim_grid(scheduler, num_steps: int, device: Union[str, torch.device] = "cpu") -> DDIMGrid:
    """Reads the grid from a (copy of a) ``DDIMScheduler``, so the spacing and offset are the model's own."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.flip(0).to(torch.long)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    clean = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).reshape(1)
    alphas = torch.cat([clean, alphas_cumprod[timesteps]])
    return DDIMGrid(timesteps.to(device), alphas.to(device))


# Copied from train_spo.clean_and_noise
def clean_and_noise(x_t: torch.Tensor, out: torch.Tensor, a_t: Alpha, prediction_type: str):
    """``(x0_hat, eps)`` that a UNet output of ``prediction_type`` at ``x_t`` (level ``a_t``) implies:
    ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` for a noise prediction; for v (Salimans & Ho 2022)
    ``x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v``, which holds at a zero-terminal-SNR top level (a_t = 0) too."""
    a = _as_tensor(a_t, x_t)
    x_t, out = x_t.float(), out.float()
    eps = eps_from_prediction(out, x_t, a_t, prediction_type)
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * out, eps
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt(), eps


# Copied from train_spo.ddpm_posterior_std
def ddpm_posterior_std(a_s: Alpha, a_t: Alpha) -> torch.Tensor:
    """Std of q(x_s | x_t, x_0) for levels a_s > a_t (DDPM eq. 7 between two arbitrary levels); 0 between equal
    levels (no step), also where both are 0."""
    a_s, a_t = torch.as_tensor(a_s, dtype=torch.float32), torch.as_tensor(a_t, dtype=torch.float32)
    stay = a_s == a_t
    var = (1 - a_s) / torch.where(stay, 1.0, 1 - a_t) * (1 - a_t / torch.where(stay, 1.0, a_s))
    return torch.where(stay, 0.0, var).clamp(min=0).sqrt()


# Copied from train_spo.ddim_step_distribution
def ddim_step_distribution(
    x_t: torch.Tensor, out: torch.Tensor, a_t: Alpha, a_p: Alpha, eta: float, prediction_type: str
):
    """The Gaussian of one DDIM step from level ``a_t`` to the cleaner ``a_p`` (DDIM eq. 12, sigma of eq. 16), given
    the UNet output ``out`` at ``x_t``:

        x0, eps = clean_and_noise(x_t, out)
        sigma   = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p)
        mean    = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps

    Returns ``(mean, sigma)``; ``x_p = mean + sigma z`` is ``DDIMScheduler.step`` with ``eta``."""
    x0, eps = clean_and_noise(x_t, out, a_t, prediction_type)
    sigma = eta * _as_tensor(ddpm_posterior_std(a_p, a_t), x_t)
    a_p = _as_tensor(a_p, x_t)
    mean = a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp(min=0).sqrt() * eps
    return mean, sigma


# ---------------------------------------------------------------------------------------------------------------
# 4. The objective (SPO, Liang et al. 2024, arXiv 2406.04314, as its official code computes it)


# Copied from train_spo.transition_log_prob
def transition_log_prob(x_next: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(x_next; mean, sigma^2) of each row, up to constants that cancel in a ratio, as a mean over the elements
    (the official code's, not a sum): ``-mean((x_next - mean)^2) / (2 sigma^2)``. [B]."""
    dims = tuple(range(1, x_next.ndim))
    sigma = sigma.reshape(-1) if sigma.ndim else sigma
    return -((x_next.float() - mean.float()) ** 2).mean(dims) / (2 * sigma.float() ** 2)


# Copied from train_spo.spo_loss
def spo_loss(logp_pol_w, logp_ref_w, logp_pol_l, logp_ref_l, beta: float, clip: float):
    """SPO's DPO loss on one step (paper eq. 9, with the official code's clamp):

        log r = log clamp(p_policy / p_reference, 1 - clip, 1 + clip)      (per transition, zero gradient outside)
        loss  = -log sigmoid(beta (log r_w - log r_l))

    At policy == reference every ratio is 1 and the loss is log 2. Returns ``(loss, margin)``, [B] each, where
    ``margin = (logp_pol_w - logp_ref_w) - (logp_pol_l - logp_ref_l)`` unclamped (positive: the policy favours the
    winner more than the reference does)."""
    log_r_w = logp_pol_w - logp_ref_w
    log_r_l = logp_pol_l - logp_ref_l
    low, high = math.log1p(-clip), math.log1p(clip)
    loss = -F.logsigmoid(beta * (log_r_w.clamp(low, high) - log_r_l.clamp(low, high)))
    return loss, (log_r_w - log_r_l).detach()


# Copied from train_spo.preference_gap
def preference_gap(score_w: torch.Tensor, score_l: torch.Tensor) -> torch.Tensor:
    """``softmax([s_w, s_l])[0] - softmax([s_w, s_l])[1]``, in [0, 1): the official code's test of a pool's pair."""
    probs = torch.stack([score_w, score_l], dim=-1).float().softmax(dim=-1)
    return probs[..., 0] - probs[..., 1]


# Copied from train_spo.Denoiser
Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


# Copied from train_spo.map_cond
def map_cond(cond, fn):
    if isinstance(cond, dict):
        return {k: map_cond(v, fn) for k, v in cond.items()}
    return fn(cond) if isinstance(cond, torch.Tensor) else cond


# Copied from train_spo.tile_cond
def tile_cond(cond, k: int):
    """Repeats every row block ``k`` times: conditioning for ``k`` stacked copies of the batch."""
    return cond if k == 1 else map_cond(cond, lambda v: v.repeat(k, *([1] * (v.ndim - 1))))


# Copied from train_spo.map_cond_pair
def map_cond_pair(a, b, fn):
    """``fn(a_leaf, b_leaf)`` over two conditionings of the same structure (tensor leaves; others from ``a``)."""
    if isinstance(a, dict):
        return {k: map_cond_pair(a[k], b[k], fn) for k in a}
    return fn(a, b) if isinstance(a, torch.Tensor) else a


# Copied from train_spo._cat_cond
def _cat_cond(a, b):
    return map_cond_pair(a, b, lambda x, y: torch.cat([x, y]))


# Copied from train_spo.SPOConfig
@dataclass
class SPOConfig:
    grid: DDIMGrid  # the sampling grid, ascending (section 3)
    eta: float
    guidance_scale: float
    pool_size: int
    untrained_steps: int
    segment_steps: int
    threshold: float
    beta: float
    clip: float
    prediction_type: str = "epsilon"
    lookahead_steps: int = 0


# Copied from train_spo.PoolStep
class PoolStep(NamedTuple):
    """One trained step of a batch of trajectories: the pool's pair per row, its loss (with grad, through the policy)
    and whether the pair was kept."""

    loss: torch.Tensor  # [B]; count only the kept rows (a skipped row's may be nan: a step without noise)
    kept: torch.Tensor  # [B] bool
    margin: torch.Tensor  # [B], detached
    gap: torch.Tensor  # [B] the preference gap of winner and loser
    timestep: int
    x_t: torch.Tensor  # [B, ...] the shared latent the candidates branch from
    candidates: torch.Tensor  # [k, B, ...] their first step, x_{t-1}^j
    winner: torch.Tensor  # [B] candidate indices
    loser: torch.Tensor
    chosen: torch.Tensor  # [B] the candidate that continues


# Copied from train_spo.guided
def guided(denoiser: Denoiser, cond, null_cond, guidance_scale: float) -> Callable:
    """``eps(x, t)`` with classifier-free guidance: ``eps(null) + g (eps(c) - eps(null))``; g = 1 is one call."""
    if guidance_scale == 1.0:
        return lambda x, t: denoiser(x, t, cond)

    stacked_cond = _cat_cond(null_cond, cond)

    def eps(x, t):
        e_null, e_cond = denoiser(torch.cat([x, x]), torch.cat([t, t]), stacked_cond).chunk(2)
        return e_null + guidance_scale * (e_cond - e_null)

    return eps


# Copied from train_spo.guided_at
def guided_at(denoiser: Denoiser, x, t: int, cond, null_cond, guidance_scale: float) -> torch.Tensor:
    """``guided`` at ``x`` with the label ``t`` for every row: the guided UNet output. Guidance combines the raw
    outputs; the noise they imply is the guided noise, eps or v alike (eps is affine in v at a given ``x``)."""
    return guided(denoiser, cond, null_cond, guidance_scale)(x, torch.full((x.shape[0],), t, device=x.device))


# Copied from train_spo.pool_levels
def pool_levels(cfg: SPOConfig) -> List[int]:
    """The grid levels (N = pure noise .. 0 = clean) where a pool branches: after ``untrained_steps`` plain steps,
    one every ``segment_steps`` levels."""
    n = len(cfg.grid.timesteps)
    return list(range(n - cfg.untrained_steps, 0, -cfg.segment_steps))


# Copied from train_spo.lookahead
def lookahead(policy: Denoiser, x: torch.Tensor, level: int, cond, null_cond, cfg: SPOConfig) -> torch.Tensor:
    """The clean latent that ``cfg.lookahead_steps`` deterministic DDIM steps (eta 0) of the policy make from ``x`` at
    grid level ``level``, on levels spaced evenly down to 0 (fewer when fewer are left). This project's extension: a
    step-unaware scorer then judges the image a candidate leads to, which is what a step-aware model is trained to
    predict from the candidate itself, at the price of these steps."""
    grid = cfg.grid
    levels = torch.linspace(level, 0, min(cfg.lookahead_steps, level) + 1).round().long().unique_consecutive()
    for upper, lower in zip(levels.tolist(), levels[1:].tolist()):
        out = guided_at(policy, x, int(grid.timesteps[upper - 1]), cond, null_cond, cfg.guidance_scale)
        mean, _ = ddim_step_distribution(x, out, grid.alphas[upper], grid.alphas[lower], 0.0, cfg.prediction_type)
        x = mean
    return x.float()


# Copied from train_spo.spo_trajectories
def spo_trajectories(
    policy: Denoiser,
    reference: Denoiser,
    score: Callable,
    x: torch.Tensor,
    cond,
    null_cond,
    prompts: List[str],
    cfg: SPOConfig,
    generators: List[torch.Generator],
) -> Iterator[PoolStep]:
    """Samples B trajectories from pure noise ``x`` with the policy (DDIM with ``eta``) and yields a ``PoolStep`` at
    each trained level. ``score(latents, prompts, timesteps) -> [n]`` scores predicted clean latents.

    At a pool level i with shared ``x_i``: one guided policy call with grad gives the step's mean (which also
    samples the k candidates ``x_{i-1}^j = mean + sigma z_j``) and one guided reference call its reference mean; so
    the winner's and the loser's log-probabilities under both models come from those two calls, not four. Each
    candidate runs ``segment_steps - 1`` more plain steps and is scored on its predicted clean image at the end
    level's timestep (the decoded latent itself at level 0), or with ``lookahead_steps`` on the image those many
    deterministic steps make from it (``lookahead``). The pair is the best and the worst candidate; one
    candidate drawn at random continues. Every random draw of trajectory b comes from ``generators[b]`` (CPU), so a
    trajectory is a function of its own seed, whatever the batch it is sampled in or the process."""
    grid, B = cfg.grid, x.shape[0]
    alphas, timesteps = grid.alphas, grid.timesteps
    n = len(timesteps)
    pools = set(pool_levels(cfg))
    rows = torch.arange(B, device=x.device)

    def noise(copies: int) -> torch.Tensor:
        """[copies, B, ...]: trajectory b's draws from its own generator."""
        draws = [torch.randn((copies, *x.shape[1:]), generator=g) for g in generators]
        return torch.stack(draws, dim=1).to(x.device)

    def step(denoiser, x, level, cond, null_cond):
        out = guided_at(denoiser, x, int(timesteps[level - 1]), cond, null_cond, cfg.guidance_scale)
        return ddim_step_distribution(x, out, alphas[level], alphas[level - 1], cfg.eta, cfg.prediction_type)

    def plain_step(x, level, cond, null_cond):
        with torch.no_grad():
            mean, sigma = step(policy, x, level, cond, null_cond)
            return mean + sigma * noise(x.shape[0] // B).flatten(0, 1)  # rows copy-major: row j B + b is b's

    level = n
    k = cfg.pool_size
    cond_k, null_k = tile_cond(cond, k), tile_cond(null_cond, k)
    while level > 0:
        if level not in pools:
            x = plain_step(x, level, cond, null_cond)
            level -= 1
            continue
        mean_pol, sigma = step(policy, x, level, cond, null_cond)  # with grad when training
        with torch.no_grad():
            mean_ref, _ = step(reference, x, level, cond, null_cond)
        with torch.no_grad():
            first = mean_pol.detach().unsqueeze(0) + sigma * noise(k)  # [k, B, ...]
            ends, end = first.flatten(0, 1), level - 1
            while end > 0 and end > level - cfg.segment_steps:
                ends = plain_step(ends, end, cond_k, null_k)
                end -= 1
            if end > 0 and cfg.lookahead_steps:
                clean, end_t = lookahead(policy, ends, end, cond_k, null_k, cfg), 0
            elif end > 0:
                out = guided_at(policy, ends, int(timesteps[end - 1]), cond_k, null_k, cfg.guidance_scale)
                clean = clean_and_noise(ends, out, alphas[end], cfg.prediction_type)[0]
                end_t = int(timesteps[end - 1])
            else:
                clean, end_t = ends.float(), 0
            scores = torch.as_tensor(score(clean, prompts * k, [end_t] * (k * B)), dtype=torch.float32)
            scores = scores.to(x.device).reshape(k, B)
            winner, loser = scores.argmax(0), scores.argmin(0)
            gap = preference_gap(scores[winner, rows], scores[loser, rows])
            # a step without noise (sigma 0: eta 0, or a last step onto alpha 1) has no density to train
            kept = (gap > cfg.threshold) & (winner != loser) & (sigma.reshape(-1) > 0)
        x_w, x_l = first[winner, rows], first[loser, rows]
        loss, margin = spo_loss(
            transition_log_prob(x_w, mean_pol, sigma),
            transition_log_prob(x_w, mean_ref, sigma),
            transition_log_prob(x_l, mean_pol, sigma),
            transition_log_prob(x_l, mean_ref, sigma),
            cfg.beta,
            cfg.clip,
        )
        chosen = torch.cat([torch.randint(k, (1,), generator=g) for g in generators]).to(x.device)
        yield PoolStep(loss, kept, margin, gap, int(timesteps[level - 1]), x.detach(), first, winner, loser, chosen)
        x = ends.reshape(k, B, *x.shape[1:])[chosen, rows].to(x.dtype)
        level = end


# ---------------------------------------------------------------------------------------------------------------
# 4b. The step-aware preference model (SPM, arXiv 2406.04314 Sec. 4.2): PickScore v1 (a CLIP ViT-H/14) whose vision
#     tower is conditioned on the timestep, so that it judges the predicted clean image of an intermediate step. The
#     conditioning follows the official code (github.com/RockeyCoss/SPO, time_conditioned_clip.py):
#     - a DiT-style timestep embedder: sinusoid of the raw timestep (256 dims: cat[cos(t f), sin(t f)],
#       f_i = 10000 ** (-i / 128)) -> Linear(256, D) -> SiLU -> Linear(D, D), D the vision width;
#     - in every vision encoder layer adaLN: SiLU -> Linear(D, 6 D) of the time embedding, chunked as shift_msa,
#       scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, applied after the (affine) layer norms:
#       x = x + gate_msa * attn(LN1(x) * (1 + scale_msa) + shift_msa), likewise the MLP;
#     - the pooled CLS token after the post-layernorm: SiLU -> Linear(D, 2 D) as (shift, scale),
#       pooled * (1 + scale) + shift, then the visual projection;
#     - score = exp(logit_scale) * cos(image_embeds, text_embeds), the text side plain CLIP.
#     The published checkpoints are pickles: scripts/convert_step_aware_preference_model.py converts them once into
#     the folder this model loads (config.json, model.safetensors, the tokenizer).


# Copied from train_spo.SPM_CONFIG_KEY
SPM_CONFIG_KEY = "step_aware_preference_model"  # config.json's entry for what CLIPConfig does not hold
# Copied from train_spo.SPM_WEIGHTS_NAME
SPM_WEIGHTS_NAME = "model.safetensors"
# Copied from train_spo.SPM_CONFIG_NAME
SPM_CONFIG_NAME = "config.json"
# Copied from train_spo.OPENAI_CLIP_MEAN
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the ViT-H/14 processor's (laion/CLIP-ViT-H-14-laion2B)
# Copied from train_spo.OPENAI_CLIP_STD
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Copied from train_spo.timestep_sinusoid
def timestep_sinusoid(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32 ``cat[cos(t f), sin(t f)]``, ``f_i = max_period ** (-i / (dim // 2))``; a zero
    column is appended when ``dim`` is odd (the official ``TimestepEmbedder.timestep_embedding``, after GLIDE)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


# Copied from train_spo.StepAwarePreferenceModel
class StepAwarePreferenceModel(torch.nn.Module):
    """PickScore's CLIP with the SPM's timestep conditioning of the vision tower (arXiv 2406.04314, Sec. 4.2).

    ``clip`` is a transformers ``CLIPModel`` built from ``config`` (its weights are PickScore's layout, so a PickScore
    state dict loads into it); ``time_embedder`` is Linear(F, D) -> SiLU -> Linear(D, D) (F the sinusoid's size, 256),
    ``block_modulations[i]`` the Linear(D, 6 D) of vision layer i's adaLN and ``pooled_modulation`` the Linear(D, 2 D)
    of the pooled token (each applied to SiLU of the time embedding, as the official ``nn.Sequential(SiLU, Linear)``).
    """

    def __init__(
        self,
        config: CLIPConfig,
        frequency_embedding_size: int = 256,
        max_period: float = 10000.0,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        super().__init__()
        self.config = config
        self.frequency_embedding_size = int(frequency_embedding_size)
        self.max_period = float(max_period)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.clip = CLIPModel(config)
        width = config.vision_config.hidden_size
        self.time_embedder = torch.nn.Sequential(
            torch.nn.Linear(self.frequency_embedding_size, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
        )
        self.block_modulations = torch.nn.ModuleList(
            [torch.nn.Linear(width, 6 * width) for _ in range(config.vision_config.num_hidden_layers)]
        )
        self.pooled_modulation = torch.nn.Linear(width, 2 * width)
        # the official start of training: the modulations are the identity (gates 1), whatever the timestep
        for linear in [*self.block_modulations, self.pooled_modulation]:
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
        with torch.no_grad():
            for linear in self.block_modulations:
                linear.bias[2 * width : 3 * width] = 1.0
                linear.bias[5 * width :] = 1.0

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------

    def time_embedding(self, timesteps, batch_size: int, device) -> torch.Tensor:
        """[B, D]: the embedder applied to the raw timesteps (an int, a float, or a 0-d/1-d tensor, broadcast to
        ``batch_size``); the sinusoid is taken in fp32, as the official code does."""
        t = torch.as_tensor(timesteps, device=device)
        if t.dim() == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"timesteps: expected {batch_size} (one per image), got shape {tuple(t.shape)}")
        sinusoid = timestep_sinusoid(t, self.frequency_embedding_size, self.max_period)
        return self.time_embedder(sinusoid.to(self.time_embedder[0].weight.dtype))

    def image_embeds(self, pixel_values: torch.Tensor, timesteps) -> torch.Tensor:
        """[B, P] projected (not normalised) image embeddings of CLIP-normalised ``pixel_values`` at ``timesteps``."""
        vision = self.clip.vision_model
        condition = F.silu(self.time_embedding(timesteps, pixel_values.shape[0], pixel_values.device))
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer, modulation in zip(vision.encoder.layers, self.block_modulations):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(condition)[:, None].chunk(
                6, -1
            )
            attended = layer.self_attn(hidden_states=layer.layer_norm1(hidden) * (1 + scale_msa) + shift_msa)[0]
            hidden = hidden + gate_msa * attended
            hidden = hidden + gate_mlp * layer.mlp(layer.layer_norm2(hidden) * (1 + scale_mlp) + shift_mlp)
        pooled = vision.post_layernorm(hidden[:, 0])
        shift, scale = self.pooled_modulation(condition).chunk(2, -1)
        return self.clip.visual_projection(pooled * (1 + scale) + shift)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, P] projected (not normalised) text embeddings: plain CLIP (EOS token, final layer norm, projection).
        The official scorer passes no attention mask; with CLIP's causal mask and padding after the EOS token the
        mask changes nothing."""
        pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.clip.text_projection(pooled)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        timesteps: Union[int, float, torch.Tensor] = 0,
    ) -> torch.Tensor:
        """[B] scores ``exp(logit_scale) * cos(image_embeds, text_embeds)``, image i against prompt i."""
        image = self.image_embeds(pixel_values, timesteps)
        text = self.text_embeds(input_ids, attention_mask)
        image = image / image.norm(p=2, dim=-1, keepdim=True)
        text = text / text.norm(p=2, dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * (image * text).sum(-1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in [-1, 1] -> CLIP pixel values, as the official ``get_preference_score``: bicubic
        resize of the short side to the image size (``int(side * scale + 0.5)``), centre crop (torchvision's offsets:
        ``int(round((side - size) / 2))``), then ``(x / 2 + 0.5).clamp(0, 1)`` and the mean/std normalisation. Done in
        fp32 (the official code resizes in the images' dtype and casts after)."""
        size = self.config.vision_config.image_size
        height, width = images.shape[-2:]
        scale = size / min(height, width)
        new_size = (int(height * scale + 0.5), int(width * scale + 0.5))
        images = F.interpolate(images.float(), size=new_size, mode="bicubic", align_corners=False)
        top, left = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
        images = images[..., top : top + size, left : left + size]
        images = (images / 2 + 0.5).clamp(0, 1)
        mean = torch.tensor(self.image_mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], timesteps, tokenizer) -> torch.Tensor:
        """[B] fp32 scores of ``images`` ([B, 3, H, W] in [-1, 1], e.g. the VAE decoding of the predicted x0) for
        ``prompts`` at ``timesteps`` (the step's t; 0 for a final image, as the official sampler)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"score: {images.shape[0]} images but {len(prompts)} prompts")
        max_length = min(tokenizer.model_max_length, self.config.text_config.max_position_embeddings)
        tokens = tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        device = self.clip.logit_scale.device
        pixel_values = self.preprocess(images.to(device)).to(self.clip.visual_projection.weight.dtype)
        scores = self(
            pixel_values, tokens.input_ids.to(device), tokens.attention_mask.to(device), torch.as_tensor(timesteps)
        )
        return scores.float()

    # ------------------------------------------------------------------------------------------------------------
    # Saving and loading: config.json + model.safetensors
    # ------------------------------------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        """``config.json``: the CLIPConfig's dict plus ``step_aware_preference_model`` (time embedding, normalisation)."""
        config = self.config.to_dict()
        config[SPM_CONFIG_KEY] = {
            "frequency_embedding_size": self.frequency_embedding_size,
            "max_period": self.max_period,
            "time_embed_dim": self.config.vision_config.hidden_size,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }
        return config

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, SPM_CONFIG_NAME), "w") as f:
            json.dump(self.config_dict(), f, indent=2, sort_keys=True)
        state = {}
        for key, value in self.state_dict().items():
            value = value.detach().cpu().contiguous()
            if value.untyped_storage().nbytes() != value.numel() * value.element_size():
                value = value.clone()  # a view into a shared storage (DeepSpeed's fp32 files): safetensors refuses it
            state[key] = value
        save_file(state, os.path.join(folder, SPM_WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_config_dict(cls, config: dict) -> "StepAwarePreferenceModel":
        config = dict(config)
        extra = config.pop(SPM_CONFIG_KEY, None) or {}
        extra.pop("time_embed_dim", None)  # the vision width: CLIPConfig's
        return cls(CLIPConfig.from_dict(config), **extra)

    @classmethod
    def from_pretrained(cls, folder: str, device=None, dtype: Optional[torch.dtype] = None):
        """The model of a folder written by ``save_pretrained`` (or the converter script); weights from safetensors
        only. One-line ``ValueError`` naming the folder and file when something is missing or does not match."""
        what = f"step-aware preference model '{folder}'"
        if not os.path.isdir(folder):
            raise ValueError(f"{what}: no such folder")
        for name in (SPM_CONFIG_NAME, SPM_WEIGHTS_NAME):
            if not os.path.isfile(os.path.join(folder, name)):
                raise ValueError(f"{what}: no {name} in it")
        try:
            with open(os.path.join(folder, SPM_CONFIG_NAME)) as f:
                config = json.load(f)
            if SPM_CONFIG_KEY not in config:
                raise ValueError(f"no '{SPM_CONFIG_KEY}' entry")
            with torch.device("meta"):
                model = cls.from_config_dict(config)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"{what}: {SPM_CONFIG_NAME} is not a step-aware preference model config ({reason})"
            ) from None
        state = load_file(os.path.join(folder, SPM_WEIGHTS_NAME))
        model.check_state_dict(state, f"{what}: {SPM_WEIGHTS_NAME}")
        model.load_state_dict(state, assign=True)
        model._materialize_non_persistent_buffers()
        model.eval().requires_grad_(False)
        return model.to(device=device, dtype=dtype)

    def check_state_dict(self, state: dict, what: str, display=None) -> None:
        """One-line ``ValueError`` naming the first key of ``self.state_dict()`` missing from ``state``, the first key of
        ``state`` the model has not, or the first shape that differs (keys shown through ``display`` when given)."""
        display = display or (lambda key: key)
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(f"{what}: missing key '{display(missing[0])}' ({len(missing)} missing)")
        unexpected = [k for k in state if k not in expected]
        if unexpected:
            raise ValueError(f"{what}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected)")
        for key, value in expected.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"{what}: '{display(key)}' has shape {list(state[key].shape)}, the model's is {list(value.shape)}"
                )

    def _materialize_non_persistent_buffers(self) -> None:
        """After building on the meta device and loading with ``assign=True``: CLIP's ``position_ids`` (not in the
        state dict) become ``arange``."""
        for name, buffer in list(self.named_buffers()):
            if not buffer.is_meta:
                continue
            if not name.endswith("position_ids"):
                raise ValueError(f"step-aware preference model: buffer '{name}' has no value")
            module = self.get_submodule(name.rsplit(".", 1)[0])
            module.position_ids = torch.arange(buffer.shape[-1]).expand(tuple(buffer.shape))


# ----------------------------------------------------------------------------------------------------------------
# The published checkpoints
# ----------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# 4c. Preference models: (latents, prompts, timesteps) -> scores, higher preferred


# Copied from train_spo.decode_latents
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Images in [-1, 1], [n, 3, H, W] float32, of clean latents (times the VAE's scaling factor)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = []
    for chunk in latents.split(batch_size):
        z = (chunk / vae.config.scaling_factor + shift).to(vae.device, vae.dtype)
        images.append(vae.decode(z).sample.float().clamp(-1, 1))
    return torch.cat(images)


# Copied from train_spo.to_pil_images
def to_pil_images(images: torch.Tensor) -> List[Image.Image]:
    array = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


# Copied from train_spo.load_plugin
def load_plugin(spec: str, flag: str = "--preference_model") -> Callable:
    """``FILE.py:FUNCTION`` -> the function. A file inside a package (its folder has ``__init__.py``) is imported as
    ``package.module`` with the package's parent on the path, so that it can import its siblings."""
    path, _, name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise InputError(f"{flag} '{spec}': no such file '{path}'")
    root, module_name = os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0]
    while os.path.isfile(os.path.join(root, "__init__.py")):
        module_name = f"{os.path.basename(root)}.{module_name}"
        root = os.path.dirname(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise InputError(f"{flag} '{spec}': importing {path} failed ({type(e).__name__}: {first_line(e)})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"{flag} '{spec}': {path} has no function '{name}'")
    return function


# Copied from train_spo.hub_folder
def hub_folder(name: str, flag: str) -> str:
    """The local snapshot of a Hub repository (downloaded, or from the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name)
    except Exception as e:
        raise InputError(
            f"{flag}: '{name}' is not a local folder and cannot be fetched from the Hub: {first_line(e)}"
        ) from None


# Copied from train_spo.resolve_alias
def resolve_alias(kind: str) -> str:
    """``shapes`` -> the plugin beside this script (or under the working directory)."""
    relative = PLUGIN_ALIASES[kind]
    path, _, name = relative.rpartition(":")
    for folder in (os.path.dirname(os.path.abspath(__file__)), os.getcwd()):
        if os.path.isfile(os.path.join(folder, path)):
            return f"{os.path.join(folder, path)}:{name}"
    raise InputError(
        f"--preference_model {kind}: {path} is neither beside this script nor under the working directory (it comes "
        f"with the repository); pass its path as --preference_model path/to/{relative}"
    )


# Copied from train_spo.load_preference_model
def load_preference_model(args, vae, device, weight_dtype) -> Callable:
    """``score(latents, prompts, timesteps) -> [n] float tensor``: decodes the predicted clean latents and scores
    them with --preference_model, times --preference_score_scale."""
    kind, path, scale = args.preference_model, args.preference_model_path, args.preference_score_scale
    if kind == STEP_AWARE:
        folder = path if os.path.isdir(path) else hub_folder(path, "--preference_model_path")
        try:
            model = StepAwarePreferenceModel.from_pretrained(folder, device, weight_dtype)
        except ValueError as e:
            raise InputError(f"--preference_model_path: {first_line(e)}") from None
        tokenizer = load_model(CLIPTokenizer, folder, "--preference_model_path (tokenizer)")

        def score_images(images, prompts, timesteps):
            return model.score(images, prompts, timesteps, tokenizer)

    else:
        if kind in (STEP_AWARE, *SCORER_KINDS):
            if kind in ("pickscore", "hpsv2", "clip_score"):
                scorer = ClipScorer(kind, path, args.preference_model_processor, device)
            elif kind == "aesthetic":
                scorer = AestheticScorer(path, args.preference_model_head, device)
            else:
                scorer = ImageRewardScorer(path, device)
            function = lambda images, prompts, timesteps: scorer(images, prompts)  # noqa: E731 (not step-aware)
        else:
            function = load_plugin(resolve_alias(kind) if kind in PLUGIN_ALIASES else kind)

        def score_images(images, prompts, timesteps):
            pil = to_pil_images(images)
            values = function(pil, prompts, timesteps)
            if len(values) != len(pil):
                raise TrainingError(f"--preference_model {kind} returned {len(values)} scores for {len(pil)} images")
            return torch.as_tensor([float(v) for v in values])

    def score(latents, prompts, timesteps):
        with torch.no_grad():
            images = decode_latents(vae, latents)
            return score_images(images, list(prompts), list(timesteps)).float().cpu() * scale

    return score


# ---------------------------------------------------------------------------------------------------------------
# 5. Models. First what is particular to SDXL (train_spo.py has its own of each of these), then what both
#    scripts share.


# Copied from train_inversion_dpo_sdxl.TextEncoders
class TextEncoders(NamedTuple):
    """SDXL's text side: two CLIP tokenizers and text encoders, the second with a projection (the pooled embedding).
    Its null conditioning is all zeros (``force_zeros_for_empty_prompt``), so no empty-prompt embedding is kept."""

    tokenizers: list
    encoders: list


# Copied from train_inversion_dpo_sdxl.load_text_encoders
def load_text_encoders(args, device, weight_dtype) -> TextEncoders:
    model, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    tokenizers = [
        load_component(CLIPTokenizer, model, name, revision=revision) for name in ("tokenizer", "tokenizer_2")
    ]
    text_encoders = [
        load_component(cls, model, name, revision=revision, variant=variant)
        for cls, name in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
    ]
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
        text_encoder.to(device, dtype=weight_dtype)
    return TextEncoders(tokenizers, text_encoders)


# Copied from train_inversion_dpo_sdxl.encode_prompt
def encode_prompt(prompts: List[str], tokenizers, text_encoders) -> Tuple[torch.Tensor, torch.Tensor]:
    """As ``StableDiffusionXLPipeline.encode_prompt``: both encoders' penultimate hidden states side by side
    [B, L, D1 + D2], and the second encoder's pooled projection [B, P]."""
    hidden_states = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        hidden_states.append(out.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), out.text_embeds


def prompt_conditioning(prompts: List[str], text: TextEncoders, resolution: int):
    """``(cond, null_cond)``: the UNet's conditioning keyword arguments for the B prompts: both encoders' states,
    the pooled embedding and the time ids of a ``resolution`` square sampled whole (no crop)."""
    embeddings, pooled = encode_prompt(prompts, text.tokenizers, text.encoders)
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=pooled.dtype)
    ids = ids.to(pooled.device).expand(len(prompts), 6)
    cond = {"encoder_hidden_states": embeddings, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    return cond, null_conditioning(cond, text)


# Copied from train_inversion_dpo_sdxl.null_conditioning
def null_conditioning(cond, text: TextEncoders):
    """The null conditioning of ``cond``'s rows: text and pooled embeddings all zeros, the images' own time ids."""
    added = cond["added_cond_kwargs"]
    return {
        "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
        "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]},
    }


# Copied from train_inversion_dpo_sdxl.make_pipeline
def make_pipeline(text: TextEncoders, vae, unet, noise_scheduler):
    """A pipeline around the training UNet for validation samples, sampling with DDIM."""
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text.encoders[0],
        text_encoder_2=text.encoders[1],
        tokenizer=text.tokenizers[0],
        tokenizer_2=text.tokenizers[1],
        unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config),
        add_watermarker=False,
    )


# 5b. Shared by both scripts


# Copied from train_spo.load_component
def load_component(cls, model, subfolder, **kwargs):
    """``cls.from_pretrained`` with a one-line error naming the model when it is neither a folder nor reachable.
    Weights load from safetensors only: a ``.bin`` is a pickle, and unpickling runs code."""
    if issubclass(cls, torch.nn.Module):
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(model, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(model) else "Hub id (offline, or no such repository?)"
        raise DataError(f"could not load '{subfolder}' of model '{model}' as a {where}: {first_line(e)}") from None


# Copied from train_spo.weight_dtype_of
def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# Copied from train_spo.load_diffusion_models
def load_diffusion_models(args, device, weight_dtype):
    """The DDIM scheduler, the VAE and the UNet of the model, frozen and on ``device``. The UNet and a fp16-safe VAE
    hold ``weight_dtype``; a VAE whose config asks for ``force_upcast`` (SDXL's, which overflows in fp16) stays fp32.
    Weights load from safetensors only (``load_component``)."""
    model, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    # DDIM: the inversion and validation sampler; its schedule (alphas_cumprod) is the model's own
    noise_scheduler = load_component(DDIMScheduler, model, "scheduler", revision=revision)
    if args.pretrained_vae_model_name_or_path:
        vae = load_component(AutoencoderKL, args.pretrained_vae_model_name_or_path, None)
    else:
        vae = load_component(AutoencoderKL, model, "vae", revision=revision, variant=variant)
    unet = load_component(UNet2DConditionModel, model, "unet", revision=revision, variant=variant)
    for frozen in (vae, unet):
        frozen.requires_grad_(False)
    vae.to(device, dtype=torch.float32 if vae.config.force_upcast else weight_dtype)
    unet.to(device, dtype=weight_dtype)
    return noise_scheduler, vae, unet


# Copied from train_spo.lora_targets
def lora_targets(args) -> List[str]:
    return [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]


# Copied from train_spo.add_lora
def add_lora(unet, args, weight_dtype):
    """Adds the LoRA adapter ("default", alpha = rank) on ``--lora_target_modules``; its weights stay fp32 whatever
    the frozen weights' dtype (Adam's updates of fp16 weights underflow)."""
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=lora_targets(args))
    )
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if not torch.cuda.is_available():
            raise InputError("--enable_xformers_memory_efficient_attention needs a CUDA GPU")
        unet.enable_xformers_memory_efficient_attention()


# Copied from train_spo.make_optimizer
def make_optimizer(params, args):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


# Copied from train_spo.UNetCounter
class UNetCounter:
    """Rows (samples) the UNet was run on, with and without grad: the compute an objective spends."""

    def __init__(self):
        self.grad_rows, self.no_grad_rows = 0, 0

    def add(self, x):
        if torch.is_grad_enabled():
            self.grad_rows += x.shape[0]
        else:
            self.no_grad_rows += x.shape[0]

    def take(self):
        """(rows with grad, rows without) since the last call."""
        out = (self.grad_rows, self.no_grad_rows)
        self.grad_rows, self.no_grad_rows = 0, 0
        return out


# Copied from train_spo.prediction_type_of
def prediction_type_of(noise_scheduler) -> str:
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"the model's scheduler predicts {prediction_type!r}; only {PREDICTION_TYPES} can be trained")
    return prediction_type


# Copied from train_spo.make_denoisers
def make_denoisers(accelerator, unet, weight_dtype, noise_scheduler, counter: Optional[UNetCounter] = None):
    """``policy`` runs the prepared (possibly DDP-wrapped) UNet with the adapter on; ``reference`` the same
    weights with the adapter off: no second copy of the UNet is ever held. ``counter`` counts their rows.

    Both return the UNet's own output (float32): a noise prediction, or v for a v-prediction model
    (``noise_scheduler.config.prediction_type``, SD 2.x's 768-v models); the objectives convert it where they need
    the noise (``ObjectiveConfig.eps``) and measure errors in the space ``--loss_space`` says."""
    base = accelerator.unwrap_model(unet)
    counter = counter or UNetCounter()
    prediction_type_of(noise_scheduler)  # fails early on a type no objective can read

    def policy(x, t, cond):
        counter.add(x)
        return unet(x.to(weight_dtype), t, **cond, return_dict=False)[0].float()

    def reference(x, t, cond):
        counter.add(x)
        base.disable_adapters()
        try:
            return base(x.to(weight_dtype), t, **cond, return_dict=False)[0].float()
        finally:
            base.enable_adapters()

    return policy, reference


# Copied from train_spo.spo_config
def spo_config(args, noise_scheduler, device) -> SPOConfig:
    grid = ddim_grid(DDIMScheduler.from_config(noise_scheduler.config), args.num_inference_steps, device)
    return SPOConfig(
        grid=grid,
        eta=args.eta,
        guidance_scale=args.guidance_scale,
        pool_size=args.spo_pool_size,
        untrained_steps=args.spo_untrained_steps,
        segment_steps=args.spo_segment_steps,
        threshold=args.spo_threshold,
        beta=args.spo_beta,
        clip=args.spo_clip,
        prediction_type=prediction_type_of(noise_scheduler),
        lookahead_steps=args.spo_lookahead_steps,
    )


# Copied from train_spo.latent_shape
def latent_shape(unet, vae, resolution: int) -> Tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (unet.config.in_channels, resolution // factor, resolution // factor)


# ---------------------------------------------------------------------------------------------------------------
# 6. Scorers of evaluate.py, for --preference_model pickscore, hpsv2, clip_score, aesthetic, imagereward

# where the converter of the published HPSv2 and ImageReward checkpoints lies in the repository
# Copied from train_spo.CONVERTER
CONVERTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "convert_scorer_weights.py")

# Copied from train_spo.IMAGEREWARD_HEAD
IMAGEREWARD_HEAD = "imagereward_head.safetensors"  # layers.<i>.weight/bias, mean, std

# Copied from train_spo.IMAGEREWARD_MAX_LENGTH
IMAGEREWARD_MAX_LENGTH = 35  # ImageReward's prompt length

# Copied from train_spo.PUBLISHED
PUBLISHED = {"hpsv2": "HPS_v2.1_compressed.pt (xswu/HPSv2)", "imagereward": "ImageReward.pt (THUDM/ImageReward)"}


# Copied from train_spo.conversion_command
def conversion_command(kind: str, checkpoint: str):
    """The command that converts a published checkpoint into the folder ``--<kind>`` reads, and that folder (the
    checkpoint's path without its extension)."""
    output_dir = os.path.splitext(checkpoint)[0]
    script = os.path.relpath(CONVERTER)
    script = CONVERTER if script.startswith("..") else script
    command = " ".join(shlex.quote(a) for a in ("python", script, kind, checkpoint, "--output_dir", output_dir))
    return command, output_dir


# Copied from train_spo.refuse_checkpoint_file
def refuse_checkpoint_file(kind: str, path: str, layout: str):
    """``--hpsv2`` and ``--imagereward`` read a converted folder: a file (the published ``.pt``) is one line with the
    command that converts it."""
    if os.path.isfile(path):
        command, output_dir = conversion_command(kind, path)
        raise InputError(f"--preference_model_path: '{path}' is a checkpoint file, not a transformers {layout} folder: convert it "
                         f"with `{command}` and pass --preference_model_path {shlex.quote(output_dir)}")  # fmt: skip


# Copied from train_spo.conversion_hint
def conversion_hint(kind: str) -> str:
    script = os.path.relpath(CONVERTER)
    return (f" (the published {PUBLISHED[kind]} must be converted first: python "
            f"{CONVERTER if script.startswith('..') else script} {kind} --help)")  # fmt: skip


# Copied from train_spo.load_model
def load_model(cls, name_or_path: str, what: str, hint: str = ""):
    """``cls.from_pretrained`` (safetensors only) with a one-line error naming the flag and the model (and ``hint``)."""
    kwargs = {"use_safetensors": True} if issubclass(cls, torch.nn.Module) else {}
    if not os.path.isdir(name_or_path) and (os.path.isabs(name_or_path) or name_or_path.startswith(".")):
        raise InputError(f"{what}: no folder '{name_or_path}'{hint}")
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except Exception as e:  # missing, offline, another architecture's weights: all one line naming the model
        where = "local folder" if os.path.isdir(name_or_path) else "Hub id (offline, or no such repository?)"
        raise InputError(f"{what}: could not load '{name_or_path}' as a {where}: {first_line(e)}{hint}") from None


# Copied from train_spo.load_head
def load_head(path: str, what: str, hint: str = "") -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise InputError(f"{what}: no file '{path}'{hint}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{what}: could not read '{path}' ({type(e).__name__}: {first_line(e)})") from None


# Copied from train_spo.LinearHead
class LinearHead(torch.nn.Module):
    """``layers.<i>`` Linear layers applied in order of i, no activation (LAION's and ImageReward's MLP)."""

    def __init__(self, state: Dict[str, torch.Tensor], prefix: str = ""):
        super().__init__()
        indices = sorted(
            {int(m.group(1)) for k in state for m in [re.match(rf"{re.escape(prefix)}layers\.(\d+)\.weight$", k)] if m}
        )
        if not indices:
            raise ValueError(f"no '{prefix}layers.<i>.weight' in the head's keys ({', '.join(list(state)[:4])}, ...)")
        self.layers = torch.nn.ModuleList()
        for i in indices:
            weight = state[f"{prefix}layers.{i}.weight"].float()
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": state[f"{prefix}layers.{i}.bias"].float()})
            self.layers.append(layer)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# Copied from train_spo.ClipScorer
class ClipScorer:
    """PickScore, HPSv2 and CLIP score: one CLIP, three scales of the image-text cosine."""

    def __init__(self, kind: str, model: str, processor: str = None, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.kind, self.device = kind, device
        hint = ""
        if kind == "hpsv2":  # a converted folder: the published .pt is refused with the command that converts it
            refuse_checkpoint_file(kind, model, "CLIPModel")
            hint = conversion_hint(kind)
        self.model = load_model(CLIPModel, model, "--preference_model_path", hint).to(device).eval()
        self.processor = load_model(CLIPProcessor, processor or model, f"--{kind} (processor)")

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> List[float]:
        inputs = self.processor(
            text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        out = self.model(**inputs)
        cos = (out.image_embeds * out.text_embeds).sum(-1)  # both unit vectors
        if self.kind == "pickscore":
            cos = self.model.logit_scale.exp() * cos
        elif self.kind == "clip_score":
            cos = 100 * cos.clamp(min=0)
        return cos.float().cpu().tolist()


# Copied from train_spo.AestheticScorer
class AestheticScorer:
    def __init__(self, clip: str, head: str, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.device = device
        self.model = load_model(CLIPModel, clip, "--preference_model_path").to(device).eval()
        self.processor = load_model(CLIPProcessor, clip, "--preference_model_path (processor)")
        try:
            self.head = LinearHead(load_head(head, "--preference_model_head")).to(device).eval()
        except ValueError as e:
            raise InputError(f"--preference_model_head '{head}': {e}") from None

    @torch.no_grad()
    def __call__(self, images, prompts) -> List[float]:
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values.to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return self.head(features).squeeze(-1).cpu().tolist()


# Copied from train_spo.ImageRewardScorer
class ImageRewardScorer:
    """ImageReward's computation on transformers' BLIP: a folder with a ``BlipForImageTextRetrieval``, its
    ``BlipProcessor`` and ``imagereward_head.safetensors``."""

    def __init__(self, folder: str, device="cpu"):
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.device = device
        refuse_checkpoint_file("imagereward", folder, "BlipForImageTextRetrieval")
        hint = conversion_hint("imagereward")
        self.model = load_model(BlipForImageTextRetrieval, folder, "--preference_model_path", hint).to(device).eval()
        self.processor = load_model(BlipProcessor, folder, "--preference_model_path (processor)", hint)
        state = load_head(os.path.join(folder, IMAGEREWARD_HEAD), "--preference_model_path", hint)
        try:
            self.head = LinearHead(state).to(device).eval()
            self.mean, self.std = float(state["mean"]), float(state["std"])
        except (ValueError, KeyError) as e:
            raise InputError(f"--preference_model_path '{folder}': {IMAGEREWARD_HEAD}: {e}") from None

    @torch.no_grad()
    def __call__(self, images, prompts) -> List[float]:
        inputs = self.processor(
            images=list(images),
            text=list(prompts),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=IMAGEREWARD_MAX_LENGTH,
        ).to(self.device)
        image_embeds = self.model.vision_model(pixel_values=inputs.pixel_values)[0]
        text = self.model.text_encoder(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
        )[0]
        reward = self.head(text[:, 0].float()).squeeze(-1)
        return ((reward - self.mean) / self.std).cpu().tolist()


# ---------------------------------------------------------------------------------------------------------------
# 7. Checkpoints (as train_inversion_dpo.py's: safetensors and JSON, no pickles, written atomically)


# Copied from train_spo.OPTIMIZER_FILE
OPTIMIZER_FILE = "optimizer.safetensors"


# Copied from train_spo.TRAINING_STATE_FILE
TRAINING_STATE_FILE = "training_state.json"


# Copied from train_spo.LORA_FILE
LORA_FILE = "pytorch_lora_weights.safetensors"


# Copied from train_spo.CARD_FILE
CARD_FILE = "README.md"


# Copied from train_spo.METRICS_FILE
METRICS_FILE = "metrics.jsonl"


# Copied from train_spo.BAD_ROWS_FILE
BAD_ROWS_FILE = "bad_rows.jsonl"


# Copied from train_spo.TRACKER_PROJECT
TRACKER_PROJECT = "spo"


# Copied from train_spo.random_states_file
def random_states_file(process_index: int) -> str:
    return f"random_states_{process_index}.safetensors"


# Copied from train_spo.encode_tree
def encode_tree(obj, tensors: Dict[str, torch.Tensor], path: str = "s"):
    """A JSON-able description of ``obj``; its tensors go into ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, (int, str)) or isinstance(key, bool):
                raise TypeError(f"cannot store the key {key!r} at {path} without pickle")
        return {"dict": [[key, encode_tree(value, tensors, f"{path}.{key}")] for key, value in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [encode_tree(value, tensors, f"{path}.{i}") for i, value in enumerate(obj)]}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} at {path} without pickle")


# Copied from train_spo.decode_tree
def decode_tree(node, tensors: Dict[str, torch.Tensor]):
    ((kind, value),) = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {key: decode_tree(v, tensors) for key, v in value}
    if kind == "list":
        return [decode_tree(v, tensors) for v in value]
    if kind == "tuple":
        return tuple(decode_tree(v, tensors) for v in value)
    return value


# Copied from train_spo.save_tree
def save_tree(path: str, obj):
    tensors = {}
    tree = encode_tree(obj, tensors)
    save_file(tensors, path, metadata={"tree": json.dumps(tree)})


# Copied from train_spo.load_tree
def load_tree(path: str):
    with safe_open(path, framework="pt") as f:
        tree = json.loads(f.metadata()["tree"])
    return decode_tree(tree, load_file(path))


# Copied from train_spo.json_tree
def json_tree(obj):
    """``encode_tree`` for state with no tensors (a scheduler's, a gradient scaler's)."""
    tensors = {}
    tree = encode_tree(obj, tensors)
    if tensors:
        raise TypeError(f"state has tensors ({next(iter(tensors))}); store it with save_tree")
    return tree


# Copied from train_spo.random_states
def random_states() -> dict:
    """Every generator a step draws from: Python's, numpy's legacy global, torch's CPU and CUDA ones."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


# Copied from train_spo.set_random_states
def set_random_states(states: dict):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# Copied from train_spo.fsync_folder
def fsync_folder(folder: str):
    """Flushes every file of ``folder`` to disk, so that a machine that loses power after the rename that publishes
    the folder does not publish empty files."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Copied from train_spo._atomic_write
def _atomic_write(path: str, write, suffix: str = ""):
    """Writes through a temporary file renamed into place: a reader never sees half a file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{suffix}")
    write(tmp)
    os.replace(tmp, path)


# Copied from train_spo.CHECKPOINT_RE
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# Copied from train_spo.PARTIAL_PREFIX
PARTIAL_PREFIX = ".partial-checkpoint-"


# Copied from train_spo.lora_state_dict_of
def lora_state_dict_of(unet):
    """The adapter's weights under peft's key names (``...to_k.lora_A.weight``), which ``load_lora_weights`` reads for
    every module. Not ``convert_state_dict_to_diffusers``: it renames only the attention projections (to the old
    ``to_k.lora.down``), and a file that mixes both namings loses its attention half in stock pipelines whenever
    ``--lora_target_modules`` reaches further."""
    return get_peft_model_state_dict(unet)


# Copied from train_spo.load_lora_into_adapter
def load_lora_into_adapter(unet, folder):
    """Loads a saved LoRA into the unet's existing "default" adapter (not a second one, the diffusers DPO example's
    resume bug)."""
    # [0]: the state dict, whatever the pipeline's loader returns beside it (SD and SDXL: alphas; SD3: nothing)
    state_dict = PIPELINE_CLASS.lora_state_dict(folder, weight_name=LORA_FILE, return_lora_metadata=True)[0]
    unet_state = convert_unet_state_dict_to_peft(
        {k[len("unet.") :]: v for k, v in state_dict.items() if k.startswith("unet.")}
    )
    # checked before loading, in words: torch's own error for a shape lists every mismatch after a bare first line
    here = get_peft_model_state_dict(unet)
    for key, value in unet_state.items():
        if key in here and here[key].shape != value.shape:
            raise ValueError(
                f"the LoRA's {key} is {' x '.join(map(str, value.shape))}, this run's "
                f"{' x '.join(map(str, here[key].shape))}: another --rank or model"
            )
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"the LoRA has {unexpected[0]}, which this run's adapter lacks: other --lora_target_modules?")
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k and ".default." in k]
    if missing:  # a LoRA on fewer modules would leave the others as they were
        raise ValueError(f"the LoRA lacks {missing[0].replace('.default.', '.')}: other --lora_target_modules?")


# Copied from train_spo.register_lora_hooks
def register_lora_hooks(accelerator):
    """Under DeepSpeed or FSDP, where the engines shard the optimizer and checkpoints are theirs: accelerate's
    save_state/load_state write and read the adapter as pytorch_lora_weights.safetensors."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                PIPELINE_CLASS.save_lora_weights(
                    output_dir, unet_lora_layers=lora_state_dict_of(accelerator.unwrap_model(model))
                )
        while weights:  # nothing else of the frozen model goes into a checkpoint
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_lora_into_adapter(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# Copied from train_spo.list_checkpoints
def list_checkpoints(output_dir) -> List[str]:
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if CHECKPOINT_RE.match(d)]
    return sorted(names, key=lambda d: int(CHECKPOINT_RE.match(d).group(1)))


# Copied from train_spo.engine_checkpoints
def engine_checkpoints(accelerator) -> bool:
    """DeepSpeed and FSDP shard the optimizer state and write checkpoints in their own (pickled) formats."""
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


# Copied from train_spo.write_training_state
def write_training_state(folder, accelerator, unet, optimizer, lr_scheduler, step):
    """A checkpoint's files, none of them a pickle (see the top of section 7): the main process writes the
    adapter, optimizer, scheduler and step; every process its random states."""
    if accelerator.is_main_process:
        PIPELINE_CLASS.save_lora_weights(folder, unet_lora_layers=lora_state_dict_of(accelerator.unwrap_model(unet)))
        save_tree(os.path.join(folder, OPTIMIZER_FILE), optimizer.state_dict())
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {
            "step": step,
            "accelerator_step": accelerator.step,
            "scheduler": json_tree(lr_scheduler.state_dict()),
            "scaler": json_tree(scaler) if scaler is not None else None,
        }
        with open(os.path.join(folder, TRAINING_STATE_FILE), "w") as f:
            json.dump(state, f)
    save_tree(os.path.join(folder, random_states_file(accelerator.process_index)), random_states())


# Copied from train_spo.CheckpointError
class CheckpointError(InputError):
    """A checkpoint that cannot be read, or whose state does not fit this run; one line naming the folder."""


# Copied from train_spo.checkpoint_problem
def checkpoint_problem(folder: str, process_index: int = 0) -> Optional[str]:
    """What makes ``folder`` unreadable as a checkpoint (a missing, truncated or unparsable file), found without
    loading anything into the run; None when every file reads. Whether its state fits this run shows at the load."""
    missing = [
        f for f in (LORA_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE) if not os.path.isfile(os.path.join(folder, f))
    ]
    if missing:
        pickled = [f for f in sorted(os.listdir(folder)) if f.endswith((".bin", ".pkl", ".pt"))]
        return f"has no {missing[0]}" + (
            f"; it holds pickles ({', '.join(pickled)}), which this trainer does not load" if pickled else ""
        )
    try:
        with open(os.path.join(folder, TRAINING_STATE_FILE)) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step in it")
        missing = [k for k in ("accelerator_step", "scheduler", "scaler") if k not in state]
        if missing:
            raise KeyError(missing[0])
    except (OSError, ValueError, TypeError, KeyError) as e:  # json's decode error is a ValueError
        return f"has an unreadable {TRAINING_STATE_FILE} ({type(e).__name__}: {first_line(e)})"
    for name in (LORA_FILE, OPTIMIZER_FILE, random_states_file(process_index)):
        path = os.path.join(folder, name)
        if name.startswith("random_states") and not os.path.isfile(path):
            continue  # a run on more processes than the one that wrote it: read_training_state warns
        try:
            if name == LORA_FILE:
                load_file(path)
            else:
                load_tree(path)
        except Exception as e:  # safetensors' own error for a truncated file, json's or KeyError for the tree
            return (
                f"has an unreadable {name}, truncated or not written by this trainer "
                f"({type(e).__name__}: {first_line(e)})"
            )
    return None


# Copied from train_spo.read_training_state
def read_training_state(folder, accelerator, unet, optimizer, lr_scheduler) -> int:
    """Loads what ``write_training_state`` wrote; returns the step. Nothing is unpickled. A CheckpointError when a
    file cannot be read or the state does not fit this run (another model's LoRA, another rank or targets)."""
    problem = checkpoint_problem(folder, accelerator.process_index)
    if problem:
        raise CheckpointError(f"checkpoint '{folder}' {problem}")
    try:
        load_lora_into_adapter(accelerator.unwrap_model(unet), folder)
        optimizer.load_state_dict(load_tree(os.path.join(folder, OPTIMIZER_FILE)))
        with open(os.path.join(folder, TRAINING_STATE_FILE)) as f:
            state = json.load(f)
        lr_scheduler.load_state_dict(decode_tree(state["scheduler"], {}))
        if state["scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(decode_tree(state["scaler"], {}))
        accelerator.step = state["accelerator_step"]
        rng_file = os.path.join(folder, random_states_file(accelerator.process_index))
        if os.path.isfile(rng_file):
            set_random_states(load_tree(rng_file))
        else:
            logger.warning(
                f"{rng_file} missing (more processes than the run that wrote it?): random streams start anew"
            )
    except Exception as e:  # what was loaded before the failure is overwritten by the checkpoint loaded instead
        raise CheckpointError(
            f"checkpoint '{folder}' does not fit this run ({type(e).__name__}: {first_line(e)})"
        ) from None
    return int(state["step"])


# Copied from train_spo.load_checkpoint
def load_checkpoint(folder, accelerator, training_state) -> int:
    """Loads a checkpoint into the run (ours, or DeepSpeed's and FSDP's through accelerate); returns its step."""
    if not engine_checkpoints(accelerator):
        return read_training_state(folder, accelerator, *training_state)
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))
    if match is None:
        raise CheckpointError(f"checkpoint '{folder}' is not named checkpoint-<step>, which says its step")
    try:
        accelerator.load_state(folder)
    except Exception as e:
        raise CheckpointError(f"checkpoint '{folder}' cannot be read ({type(e).__name__}: {first_line(e)})") from None
    return int(match.group(1))


# Copied from train_spo.previous_complete_checkpoint
def previous_complete_checkpoint(folder: str) -> Optional[str]:
    """The last checkpoint-N beside ``folder`` with a smaller step whose files all read (``checkpoint_problem``)."""
    parent, name = os.path.split(os.path.normpath(folder))
    match = CHECKPOINT_RE.match(name)
    if match is None:
        return None
    for other in reversed(list_checkpoints(parent or ".")):
        if int(CHECKPOINT_RE.match(other).group(1)) < int(match.group(1)):
            if checkpoint_problem(os.path.join(parent, other)) is None:
                return os.path.join(parent, other)
    return None


# Copied from train_spo.resume_run
def resume_run(args, accelerator, training_state) -> Tuple[Optional[str], int]:
    """Loads the checkpoint --resume_from_checkpoint names; returns ``(folder, step)``, or ``(None, 0)`` to start
    anew. With ``latest`` an unreadable checkpoint is skipped, with a warning, for the one before it; a folder named
    explicitly that cannot be read is a one-line error naming the last complete checkpoint before it."""
    resume = args.resume_from_checkpoint
    if resume is None:
        return None, 0
    if resume == "latest":
        folders = [os.path.join(args.output_dir, d) for d in reversed(list_checkpoints(args.output_dir))]
        if not folders:
            logger.warning(f"no checkpoint in {args.output_dir}: starting a new run")
            return None, 0
    else:
        folders = [resume]
    problem = None
    for i, folder in enumerate(folders):
        problem, step = None, 0
        try:
            step = load_checkpoint(folder, accelerator, training_state)
        except CheckpointError as e:
            problem = str(e)
        if not any_process(accelerator, problem is not None):  # every process loads the same one, or none does
            return folder, step
        problem = problem or f"checkpoint '{folder}' cannot be read by another process"
        if resume != "latest":
            previous = previous_complete_checkpoint(folder)
            raise CheckpointError(
                problem
                + (
                    f"; the last complete checkpoint before it is '{previous}': pass that to --resume_from_checkpoint"
                    if previous
                    else "; no complete checkpoint precedes it"
                )
            )
        if i + 1 < len(folders) and accelerator.is_main_process:
            logger.warning(f"{problem}: skipped for {os.path.basename(folders[i + 1])}")
    raise CheckpointError(
        f"no checkpoint of '{args.output_dir}' can be read, down to the earliest: {problem}; start over with "
        "--overwrite_output_dir"
    )


# Copied from train_spo.save_checkpoint
def save_checkpoint(accelerator, output_dir, step, total_limit=None, training_state=None):
    """Writes checkpoint-<step> atomically: into a temporary folder, flushed to disk and renamed when complete, so
    that a crash or kill -9 mid-write never leaves a broken folder for --resume_from_checkpoint latest to pick. Then
    rotates. ``training_state``: (unet, optimizer, lr_scheduler) for ``write_training_state``."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f"{PARTIAL_PREFIX}{step}")
    if accelerator.is_main_process:
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    if training_state is None or engine_checkpoints(accelerator):
        accelerator.save_state(partial)
    else:
        write_training_state(partial, accelerator, *training_state, step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_folder(partial)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit] if total_limit > 0 else []:
                shutil.rmtree(os.path.join(output_dir, old))
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


# Copied from train_spo.remove_partial_checkpoints
def remove_partial_checkpoints(output_dir):
    """Removes what a save killed mid-write left behind (never picked by ``latest``)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name))
            logger.warning(f"removed {name}, a checkpoint whose save was interrupted")


# Copied from train_spo.previous_run
def previous_run(args) -> List[str]:
    """What ``--output_dir`` holds of a run (its last checkpoint, its metrics log, its adapter), relative to it."""
    found = list_checkpoints(args.output_dir)[-1:]
    for path in (os.path.join(args.logging_dir, METRICS_FILE), os.path.join(args.output_dir, LORA_FILE)):
        if os.path.isfile(path):
            found.append(os.path.relpath(path, args.output_dir))
    return found


# Copied from train_spo.remove_previous_run
def remove_previous_run(args) -> List[str]:
    """--overwrite_output_dir: removes what a run wrote into --output_dir (checkpoints, logs, the adapter and its
    card, the samples and validation images) and nothing else; returns what it removed, relative to the folder."""
    out, removed = args.output_dir, []

    def remove(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            return
        removed.append(os.path.relpath(path, out))

    if not os.path.isdir(out):
        return removed
    for name in sorted(os.listdir(out)):
        if CHECKPOINT_RE.match(name) or name.startswith(PARTIAL_PREFIX):
            remove(os.path.join(out, name))
    for name in (LORA_FILE, CARD_FILE, GRID_FILE):
        remove(os.path.join(out, name))
    for name in (METRICS_FILE, BAD_ROWS_FILE, TRACKER_PROJECT):
        remove(os.path.join(args.logging_dir, name))
    images = {SAMPLES_DIR: r"\d+\.png", VALIDATION_DIR: r"(validation|final)-\d+\.png"}
    for folder, pattern in images.items():
        path = os.path.join(out, folder)
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            if re.fullmatch(pattern, name):
                remove(os.path.join(path, name))
    for folder in (os.path.join(out, SAMPLES_DIR), os.path.join(out, VALIDATION_DIR), args.logging_dir):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# 8. Validation, model card, Hub


# Copied from train_spo.image_grid
def image_grid(images: List[Image.Image], cols: Optional[int] = None) -> Image.Image:
    cols = cols or len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


# Copied from train_spo.run_validation
def run_validation(pipeline, prompts, args, accelerator, step, tag="validation"):
    """Samples every prompt with a fixed seed (the same for every validation), logs and saves a grid."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed((args.seed or 0) + i)
        # autocast: the stock pipelines do not cast latents into a half-precision VAE themselves (bf16 fails
        # without it). Known risk, unchecked without a GPU: under fp16 it also runs an fp32 SDXL VAE in fp16; the
        # SDXL recipe uses the fp16-fix VAE.
        with accelerator.autocast():
            images.append(
                pipeline(
                    prompt,
                    num_inference_steps=args.validation_num_inference_steps,
                    guidance_scale=args.validation_guidance_scale,
                    height=args.resolution,
                    width=args.resolution,
                    generator=generator,
                ).images[0]
            )
    folder = os.path.join(args.output_dir, VALIDATION_DIR)
    os.makedirs(folder, exist_ok=True)
    grid = image_grid(images)
    grid.save(os.path.join(folder, f"{tag}-{step:06d}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)
    return images


# Copied from train_spo.validate
def validate(args, accelerator, text, vae, unet, noise_scheduler, step, tag="validation"):
    """``run_validation`` on a pipeline around the training UNet. The VAE and the text encoders that a run from the
    cache keeps on the CPU come to the UNet's device for the samples and go back after."""
    device = accelerator.device
    borrowed = [m for m in (vae, *text.encoders) if m.device != device]
    for module in borrowed:
        module.to(device)
    try:
        pipeline = make_pipeline(text, vae, unet, noise_scheduler)
        return run_validation(pipeline, args.validation_prompts, args, accelerator, step, tag=tag)
    finally:
        for module in borrowed:
            module.to("cpu")


# Copied from train_spo.SAMPLES_DIR
SAMPLES_DIR = "samples"


# Copied from train_spo.VALIDATION_DIR
VALIDATION_DIR = "validation"  # every validation's grid, <tag>-<step>.png


# Copied from train_spo.GRID_FILE
GRID_FILE = "validation.png"


# Copied from train_spo.UPLOADED
UPLOADED = [LORA_FILE, CARD_FILE, GRID_FILE, f"{SAMPLES_DIR}/*.png"]


# Copied from train_spo.HUB_COMMIT_MESSAGE
HUB_COMMIT_MESSAGE = "SPO LoRA"


# Copied from train_spo.is_hub_id
def is_hub_id(name: str) -> bool:
    """A Hub repository id (``owner/name``) rather than a local path: only those belong in card metadata."""
    return not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


# Copied from train_spo.hub_id_of
def hub_id_of(name: Optional[str], kind: str = "models") -> Optional[str]:
    """The Hub id that a model or dataset name stands for: the name itself when it is one, or the repository of a
    Hub cache folder (``.../models--owner--name/snapshots/<commit>/...``); None for any other local path."""
    if not name:
        return None
    if is_hub_id(name):
        return name
    found = re.search(rf"(?:^|/){kind}--([^/]+?)--([^/]+)/snapshots/", os.path.abspath(name).replace(os.sep, "/"))
    return f"{found.group(1)}/{found.group(2)}" if found else None


# Copied from train_spo.display_name
def display_name(name: str, kind: str = "models") -> str:
    """How the card names a model or dataset: its Hub id, else its folder's or file's name (never a local path)."""
    return hub_id_of(name, kind) or os.path.basename(os.path.normpath(name))


# Copied from train_spo.base_model_license
def base_model_license(model: str) -> Optional[str]:
    """The license in the base model's card, read without the network: a local folder's README.md or the Hub cache's
    copy. None when neither is at hand."""
    path = os.path.join(model, "README.md") if os.path.isdir(model) else None
    if path is None and is_hub_id(model):
        cached = try_to_load_from_cache(model, "README.md")
        path = cached if isinstance(cached, str) else None
    if not path or not os.path.isfile(path):
        return None
    try:
        return ModelCard.load(path).data.license
    except Exception:  # a card we cannot parse gives no license, not a failed run
        return None


# Copied from train_spo.save_samples
def save_samples(images, prompts, folder) -> List[tuple]:
    """The final validation's images as ``samples/<i>.png`` plus their grid; returns (prompt, file) pairs."""
    os.makedirs(os.path.join(folder, SAMPLES_DIR), exist_ok=True)
    samples = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        name = f"{SAMPLES_DIR}/{i:02d}.png"
        image.save(os.path.join(folder, name))
        samples.append((prompt, name))
    image_grid(images).save(os.path.join(folder, GRID_FILE))
    return samples


# Copied from train_spo.CARD_METRICS_WINDOW
CARD_METRICS_WINDOW = 50  # the card's headline metrics are means over the last this many steps


# Copied from train_spo.headline_metrics
def headline_metrics(records: List[dict], window: int = CARD_METRICS_WINDOW) -> dict:
    """Over the last ``window`` steps of ``records`` (metrics.jsonl's rows; the last row of a step logged twice
    wins): the pairs kept and skipped, and the kept pairs' mean loss and accuracy; ``steps``, how many steps."""
    by_step = {r["step"]: r for r in records if "pairs_kept" in r}
    last = [by_step[step] for step in sorted(by_step)][-window:]
    kept = sum(r["pairs_kept"] for r in last)
    means = {"steps": len(last), "pairs_kept": kept, "pairs_skipped": sum(r["pairs_skipped"] for r in last)}
    for key in ("loss", "accuracy"):
        weighted = [(r[key], r["pairs_kept"]) for r in last if key in r]
        if weighted and kept:
            means[key] = sum(v * n for v, n in weighted) / kept
    return means


# Copied from train_spo.adapter_repo_id
def adapter_repo_id(args, pushed: Optional[str] = None) -> str:
    """The adapter's Hub id for the card's snippet: the one a push created, --hub_model_id when it names an owner,
    else a placeholder owner and --hub_model_id or the output folder's name (what a push would create)."""
    if pushed:
        return pushed
    if args.hub_model_id and "/" in args.hub_model_id:
        return args.hub_model_id
    return f"<your-username>/{args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))}"


# Copied from train_spo.usage_snippet
def usage_snippet(args, repo_id: str, prompt: str) -> str:
    """Python that loads the base model (and the VAE trained with) from the Hub in fp16 on a GPU, then the adapter."""
    base_id = hub_id_of(args.pretrained_model_name_or_path)
    lines, kwargs = ["import torch"], ""
    if args.revision and base_id:
        kwargs += f", revision={json.dumps(args.revision)}"
    if args.variant:
        kwargs += f", variant={json.dumps(args.variant)}"
    vae = args.pretrained_vae_model_name_or_path
    if vae:
        lines += ["from diffusers import AutoencoderKL, DiffusionPipeline", ""]
        vae_id = hub_id_of(vae)
        vae_name = json.dumps(vae_id or f"path/to/{display_name(vae)}")
        note = "" if vae_id else f"  # trained with the local VAE folder '{display_name(vae)}': its path here"
        lines.append(f"vae = AutoencoderKL.from_pretrained({vae_name}, torch_dtype=torch.float16){note}")
        kwargs = ", vae=vae" + kwargs
    else:
        lines += ["from diffusers import DiffusionPipeline", ""]
    if base_id:
        lines.append(f'pipe = DiffusionPipeline.from_pretrained("{base_id}"{kwargs}, torch_dtype=torch.float16)')
    else:
        name = display_name(args.pretrained_model_name_or_path)
        lines.append(f"# trained on the local model folder '{name}': put its path (or its Hub id) here")
        lines.append(f'pipe = DiffusionPipeline.from_pretrained("path/to/{name}"{kwargs}, torch_dtype=torch.float16)')
    lines += [
        'pipe = pipe.to("cuda")',
        f'pipe.load_lora_weights("{repo_id}")',
        f"image = pipe({json.dumps(prompt, ensure_ascii=False)}).images[0]",
        'image.save("sample.png")',
    ]
    return "\n".join(lines)


# Copied from train_spo.preference_model_name
def preference_model_name(args) -> str:
    kind = args.preference_model
    if kind in (STEP_AWARE, *SCORER_KINDS):
        return f"{kind} (`{display_name(args.preference_model_path)}`)"
    return kind if kind in PLUGIN_ALIASES else f"`{os.path.basename(kind)}`"


# Copied from train_spo.write_model_card
def write_model_card(args, folder, num_prompts: int, global_step: int, samples=(), metrics=None, repo_id=None):
    """README.md as a huggingface_hub ModelCard: metadata the Hub validates (base_model, license, datasets, tags,
    pipeline_tag, library_name, a widget of the final samples) and a body saying how it was trained, its headline
    metrics (``metrics``: ``headline_metrics``) and how to use it (``repo_id``: the Hub id of a push)."""
    base = args.pretrained_model_name_or_path
    base_id, dataset_id = hub_id_of(base), hub_id_of(args.prompts, "datasets")
    data = ModelCardData(
        base_model=base_id,
        license=args.license or base_model_license(base) or "other",
        datasets=[dataset_id] if dataset_id else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["diffusers", "lora", "text-to-image", "spo", ARCHITECTURE],
        widget=[{"text": prompt, "output": {"url": name}} for prompt, name in samples] or None,
    )
    metrics = metrics or {}
    columns = [("prompts", f"{num_prompts}"), ("optimizer steps", f"{global_step}")]
    if metrics.get("steps"):
        columns += [("pairs kept", f"{metrics['pairs_kept']}"), ("pairs skipped", f"{metrics['pairs_skipped']}")]
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("accuracy", "preference accuracy", "{:.1%}")):
        if key in metrics:
            columns.append((label, fmt.format(metrics[key])))
    table = "| " + " | ".join(c for c, _ in columns) + " |\n|" + "---:|" * len(columns) + "\n"
    table += "| " + " | ".join(v for _, v in columns) + " |\n"
    if metrics.get("steps"):
        table += (
            f"\nOver the last {plural(metrics['steps'], 'step')}. A pool's pair is kept when its preference gap passes "
            f"{args.spo_threshold:g}; the loss (log 2 = 0.693 at the start) and the accuracy (the share of kept pairs "
            "whose winner the adapter makes more likely, relative to the base model, than the loser) are over the "
            "kept pairs.\n"
        )
    sample_lines = ""
    if samples:
        sample_lines = (
            f"\n## Samples\n\nFrom the final validation (seeds {args.seed}.., "
            f"{args.validation_num_inference_steps} steps, guidance {args.validation_guidance_scale:g}):\n\n"
            + "\n".join(f"- `{prompt}`\n\n  ![{prompt}](./{name})\n" for prompt, name in samples)
        )
    base_name = display_name(base)
    prompt = samples[0][0] if samples else (args.validation_prompts or ["a photo of a cat"])[0]
    summary = (
        f"A LoRA adapter (rank {args.rank}) of `{base_name}`, trained with SPO (step-aware preference optimization, "
        f"Liang et al. 2024, arXiv 2406.04314) on {plural(num_prompts, 'prompt')} from "
        f"`{display_name(args.prompts, 'datasets')}` for {plural(global_step, 'optimizer step')}: the model's own "
        f"samples ({args.num_inference_steps} DDIM steps, eta {args.eta:g}, guidance {args.guidance_scale:g}, "
        f"{args.resolution} px), {args.spo_pool_size} candidates per pool, pools every {args.spo_segment_steps} "
        f"step(s) after the first {args.spo_untrained_steps}, scored by {preference_model_name(args)}; threshold "
        f"{args.spo_threshold:g}, beta {args.spo_beta:g}, ratio clip {args.spo_clip:g}; batch "
        f"{args.train_batch_size} x accumulation {args.gradient_accumulation_steps}, learning rate "
        f"{args.learning_rate:g}."
    )
    content = f"""---
{data.to_yaml()}
---

# SPO LoRA for {base_name}

{summary}

## Training

{table}{sample_lines}
## Use

```python
{usage_snippet(args, repo_id or adapter_repo_id(args), prompt)}
```
"""
    card = ModelCard(content)  # parses the metadata back: a card that does not round-trip fails here, not on the Hub
    card.save(os.path.join(folder, CARD_FILE))
    return card


# Copied from train_spo.push_folder_to_hub
def push_folder_to_hub(args, folder):
    """Uploads the adapter, the card and the samples (``UPLOADED``); the Hub validates the card's metadata first. The
    card's snippet gets the id of the repository created (the owner a bare --hub_model_id lacked) before the upload."""
    if not hub_id_of(args.pretrained_model_name_or_path):
        logger.warning("the base model is a local path: the card names no base_model")
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id or os.path.basename(os.path.abspath(folder)), exist_ok=True).repo_id
    card_path = os.path.join(folder, CARD_FILE)
    if os.path.isfile(card_path):
        with open(card_path, encoding="utf-8") as f:
            text = f.read()
        # the snippet's one load_lora_weights call, which write_model_card wrote
        text = re.sub(r'load_lora_weights\("[^"\n]*"\)', lambda _: f'load_lora_weights("{repo_id}")', text)
        ModelCard(text).save(card_path)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=HUB_COMMIT_MESSAGE, allow_patterns=UPLOADED)
    return repo_id


# ---------------------------------------------------------------------------------------------------------------
# 9. Running: accelerator, signals, non-finite values, metrics


# Copied from train_spo.make_accelerator
def make_accelerator(args):
    report_to = None if args.report_to == "none" else args.report_to
    if report_to in ("wandb", "all"):
        from diffusers.utils import is_wandb_available

        if not is_wandb_available():
            raise InputError("--report_to wandb needs wandb: pip install wandb")
    stop_with_launcher()  # first: a launcher killed while the data is checked must not leave this process running
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.logging_dir),
        # the shuffle follows the seed and the epoch alone, so a resumed run sees the same order
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.WARNING)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            removed = remove_previous_run(args)
            named = [r for r in removed if os.path.dirname(r) not in (SAMPLES_DIR, VALIDATION_DIR)]
            images = len(removed) - len(named)
            if removed:
                logger.warning(
                    f"--overwrite_output_dir: removed the previous run's {', '.join(named)}"
                    + (f" and {plural(images, 'image')} of {SAMPLES_DIR}/ and {VALIDATION_DIR}/" if images else "")
                )
        os.makedirs(args.logging_dir, exist_ok=True)
    accelerator.wait_for_everyone()  # no process writes into the folder before it is cleared
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


# Copied from train_spo.MetricsLog
class MetricsLog:
    """One JSON object per optimizer step in <logging_dir>/metrics.jsonl (appended to on resume)."""

    def __init__(self, path, enabled):
        self.path, self.enabled = path, enabled

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> List[dict]:
        """The rows written so far; a line cut short by a kill mid-write is left out."""
        if not os.path.isfile(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        return [r for r in rows if isinstance(r, dict)]

    def drop_after(self, step: int):
        """On resume from ``step``: drops the rows of later steps (what the interrupted run logged after its last
        checkpoint, which this run logs again), so that each step appears once."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        rows = self.records()
        kept = [r for r in rows if r.get("step", 0) <= step]

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

        _atomic_write(self.path, write)
        if len(kept) < len(rows):
            logger.info(f"{self.path}: dropped {plural(len(rows) - len(kept), 'row')} of steps after {step}")


# Copied from train_spo.plural
def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# Copied from train_spo.any_process
def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: all processes take the same branch at a collective."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0


# Copied from train_spo.StopRequest
class StopRequest:
    """SIGTERM (pre-emption, ``kill``) and SIGINT (Ctrl-C) only set a flag, which the loop reads at the end of an
    optimizer step: it saves a checkpoint there and stops, never mid-step. A second Ctrl-C stops at once without
    saving (the last complete checkpoint stays)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name, self.previous = None, {}

    def handle(self, signum, frame):
        if self.name is not None and signum == signal.SIGINT:
            os.write(2, b"\nerror: interrupted again: stopped without saving; the last complete checkpoint stays\n")
            os._exit(130)
        self.name = signal.Signals(signum).name
        # os.write, not print: a handler can interrupt a print (tqdm's) and buffered writers are not reentrant
        os.write(2, f"\n{self.name}: stopping with a checkpoint at the end of this step ...\n".encode())

    def install(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# Copied from train_spo.stop_with_launcher
def stop_with_launcher():
    """accelerate's single-process launcher waits on the script without passing signals on, so ``kill`` of the
    launcher would leave the run going on alone. Linux can send the script SIGTERM when its parent dies: asked only
    when the parent is accelerate's launcher (a shell's exit under nohup must not stop a run)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            if b"accelerate" not in f.read():
                return
    except OSError:
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the launcher died before the request
        os.kill(os.getpid(), signal.SIGTERM)


# Copied from train_spo.non_finite
def non_finite(step, what, value, output_dir) -> TrainingError:
    found = list_checkpoints(output_dir)
    kept = f"{found[-1]} stays the latest checkpoint" if found else "no checkpoint had been written yet"
    return TrainingError(
        f"step {step}: {what} is {value} (not finite); stopped without saving this step, {kept}. "
        "Lower --learning_rate or --spo_beta, keep --max_grad_norm on, or use bf16 instead of fp16"
    )


# Copied from train_spo.sum_over_processes
def sum_over_processes(accelerator, values: Dict[str, float]) -> Dict[str, float]:
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    total = accelerator.reduce(torch.tensor([values[k] for k in keys], device=accelerator.device), reduction="sum")
    return dict(zip(keys, total.tolist()))


# Copied from train_spo.average_gradients
def average_gradients(accelerator, params):
    """The gradients' mean over the processes. The trajectories' pools keep different numbers of pairs on each
    process, so each backs up its own pairs without DDP's synchronisation (which needs the same backward calls
    everywhere) and the gradients meet here, once per optimizer step."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="mean")


# ---------------------------------------------------------------------------------------------------------------
# 10. main


# Copied from train_spo.main
def main(args):
    # 1. The paths given (models, prompts, checkpoint, output folder) checked at once; accelerator, logging, seeds
    check_paths(args)
    accelerator = make_accelerator(args)
    if engine_checkpoints(accelerator):
        raise InputError(
            "SPO trains on one process or with DDP (multi-GPU): its pools keep a different number of pairs on each "
            "process, which DeepSpeed's and FSDP's gradient handling does not allow; use a plain accelerate config"
        )
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)

    # 2. Prompts; without --validation_prompts, the first prompts are the validation prompts
    prompts, prompt_counts = load_prompts(args)
    if args.validation_prompts is None and args.num_validation_prompts:
        args.validation_prompts = prompts[: args.num_validation_prompts]
        logger.info(f"validation prompts, from --prompts: {args.validation_prompts}")

    # 3. Models: frozen VAE and text encoders, the UNet with a LoRA adapter (the reference is the same UNet with its
    #    adapter off), and the preference model that judges the candidates
    noise_scheduler, vae, unet = load_diffusion_models(args, device, weight_dtype)
    text = load_text_encoders(args, device, weight_dtype)
    add_lora(unet, args, weight_dtype)
    preference = load_preference_model(args, vae, device, weight_dtype)
    cfg = spo_config(args, noise_scheduler, device)
    shape = latent_shape(unet, vae, args.resolution)
    counter = UNetCounter()  # UNet rows with and without grad, the sampling's included

    # 4. Optimizer, learning-rate schedule, accelerate
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args)
    prompts_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.max_train_steps is None:
        args.max_train_steps = math.ceil(args.num_train_epochs * len(prompts) / prompts_per_step)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    training_state = (unet, optimizer, lr_scheduler)
    policy, reference = make_denoisers(accelerator, unet, weight_dtype, noise_scheduler, counter)
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(TRACKER_PROJECT, config=config)

    # 5. Resume: the same adapter, optimizer and schedule; the prompts and the sampling noise of a step are a function
    #    of the seed and the step, so the run goes on as if never stopped
    if accelerator.is_main_process:
        remove_partial_checkpoints(args.output_dir)
    resume_path, global_step = resume_run(args, accelerator, training_state)
    metrics_log = MetricsLog(os.path.join(args.logging_dir, METRICS_FILE), accelerator.is_main_process)
    if args.resume_from_checkpoint:
        metrics_log.drop_after(global_step)
    if resume_path:
        logger.info(f"resumed from {resume_path} at step {global_step}")
    pools = len(pool_levels(cfg))
    logger.info(
        f"SPO: {plural(len(prompts), 'prompt')}, {plural(args.max_train_steps, 'step')} of "
        f"{plural(prompts_per_step, 'trajectory')}, {plural(pools, 'pool')} of {args.spo_pool_size} candidates each"
    )

    # 6. The loop. A micro-step samples a batch of trajectories with the policy; at each pool the pair's loss is
    #    backed up at once (its graph is one guided policy call), so memory does not grow with the pools
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    last_saved, interrupted, last = global_step if resume_path else None, None, {}
    stop = StopRequest().install()
    unet.train()
    while global_step < args.max_train_steps:
        step_start = time.perf_counter()
        sums = dict.fromkeys(("loss", "correct", "margin", "gap", "pairs_kept", "pairs_skipped"), 0.0)
        bad_loss = None  # a non-finite pool loss of this process, checked on every process once the step's pools end
        for micro in range(args.gradient_accumulation_steps):
            # 6a. This micro-step's prompts and random stream (noise, candidates' noise, the continuing candidate)
            index = (global_step * args.gradient_accumulation_steps + micro) * accelerator.num_processes
            index += accelerator.process_index
            batch = prompt_stream(prompts, args.seed, index * args.train_batch_size, args.train_batch_size)
            first = index * args.train_batch_size  # the stream position of this micro-step's first prompt
            generators = [torch.Generator().manual_seed(args.seed * 1_000_003 + first + i) for i in range(len(batch))]
            with torch.no_grad():
                cond, null_cond = prompt_conditioning(batch, text, args.resolution)
            x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

            # 6b. The trajectories, a pool at a time: the pair's loss and its backward, normalised by the pairs the
            #     micro-step could have made, so that a skipped pair adds nothing
            with accelerator.no_sync(unet), accelerator.autocast():
                for pool in spo_trajectories(
                    policy, reference, preference, x, cond, null_cond, batch, cfg, generators
                ):
                    kept = pool.kept.float()
                    pool_loss = torch.where(pool.kept, pool.loss, torch.zeros_like(pool.loss))
                    if pool.kept.any():
                        pair_loss = pool_loss.sum() / (len(batch) * pools)
                        if not torch.isfinite(pair_loss).item():
                            bad_loss = pair_loss.item()
                        elif bad_loss is None:
                            accelerator.backward(pair_loss)
                    sums["loss"] += pool_loss.detach().sum().item()
                    sums["correct"] += ((pool.margin > 0).float() * kept).sum().item()
                    sums["margin"] += torch.where(pool.kept, pool.margin, 0).sum().item()
                    sums["gap"] += pool.gap.sum().item()
                    sums["pairs_kept"] += kept.sum().item()
                    sums["pairs_skipped"] += (1 - kept).sum().item()

        # 6c. The gradients' mean over the processes; clip and step. Processes keep different numbers of pairs, so a
        #     collective (this check, the mean) may only stand where every process reaches it
        if any_process(accelerator, bad_loss is not None):
            raise non_finite(
                global_step + 1,
                "the loss",
                bad_loss if bad_loss is not None else "nan or inf on another process",
                args.output_dir,
            )
        average_gradients(accelerator, params)
        max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf  # inf: measure only
        grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm) and accelerator.scaler is None:
            raise non_finite(global_step + 1, "the gradient norm", grad_norm, args.output_dir)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        if not all(torch.isfinite(p).all() for p in params):
            raise non_finite(global_step, "an adapter weight", "nan or inf", args.output_dir)

        # 6d. Metrics, over the micro-steps and the processes: the kept pairs' loss, accuracy and margin, the pairs
        #     kept and skipped, and the UNet rows spent (sampling, scoring and training)
        grad_rows, no_grad_rows = counter.take()
        sums.update(unet_grad_evals=float(grad_rows), unet_evals=float(no_grad_rows))
        totals = sum_over_processes(accelerator, sums)
        kept = totals["pairs_kept"]
        last = {"step": global_step}
        if kept:
            last.update(loss=totals["loss"] / kept, accuracy=totals["correct"] / kept, margin=totals["margin"] / kept)
        last.update(
            pairs_kept=int(kept),
            pairs_skipped=int(totals["pairs_skipped"]),
            preference_gap=totals["gap"] / max(totals["pairs_kept"] + totals["pairs_skipped"], 1),
            unet_grad_evals=int(totals["unet_grad_evals"]),
            unet_evals=int(totals["unet_evals"]),
        )
        if kept:
            last.update(
                unet_grad_evals_per_pair=totals["unet_grad_evals"] / kept,
                unet_evals_per_pair=totals["unet_evals"] / kept,
            )
        last.update(
            lr=lr_scheduler.get_last_lr()[0], grad_norm=grad_norm, step_seconds=time.perf_counter() - step_start
        )
        if torch.cuda.is_available():
            last["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        metrics_log.write(last)
        accelerator.log({k: v for k, v in last.items() if k != "step"}, step=global_step)
        progress.update(1)
        progress.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}", kept=f"{int(kept)}")

        # 6e. Checkpoint (the last step always gets one), validation, and a requested stop at the end of this step
        if global_step % args.checkpointing_steps == 0 or global_step >= args.max_train_steps:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, training_state)
            last_saved = global_step
        if (
            args.validation_prompts
            and global_step % args.validation_steps == 0
            and global_step < args.max_train_steps
            and accelerator.is_main_process
        ):
            validate(args, accelerator, text, vae, accelerator.unwrap_model(unet), noise_scheduler, global_step)
        if global_step < args.max_train_steps and any_process(accelerator, stop.name is not None):
            interrupted = stop.name or "a signal to another process"
            break
    stop.restore()  # from here a signal acts as usual: the last step's checkpoint is already on disk

    if interrupted:
        if last_saved != global_step:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, training_state)
        metrics_log.write({"interrupted": interrupted, "step": global_step, **prompt_counts})
        if accelerator.is_main_process:
            print(
                f"stopped by {interrupted} at step {global_step} of {args.max_train_steps}: "
                f"{os.path.join(args.output_dir, f'checkpoint-{global_step}')} is complete. To continue, run the same "
                "command with --resume_from_checkpoint latest",
                file=sys.stderr,
                flush=True,
            )
        accelerator.end_training()
        return last

    # 7. Save: the adapter in the diffusers LoRA format, samples of the final validation, the card, the Hub
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        PIPELINE_CLASS.save_lora_weights(args.output_dir, unet_lora_layers=lora_state_dict_of(final_unet))
        samples = []
        if args.validation_prompts:
            images = validate(args, accelerator, text, vae, final_unet, noise_scheduler, global_step, tag="final")
            samples = save_samples(images, args.validation_prompts, args.output_dir)
        means = headline_metrics(metrics_log.records())
        write_model_card(args, args.output_dir, len(prompts), global_step, samples, means)
        summary = {"final": True, "step": global_step, **prompt_counts}
        metrics_log.write(summary)
        logger.info(f"saved the LoRA adapter to {args.output_dir}: {summary}")
        if args.push_to_hub:
            repo_id = push_folder_to_hub(args, args.output_dir)
            logger.info(f"pushed to https://huggingface.co/{repo_id}")
    accelerator.end_training()
    return last


if __name__ == "__main__":
    try:
        main(parse_args())
    except (InputError, TrainingError) as e:  # bad input or a diverged run: one line naming it, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside the training loop (loading, the final save)
        print("error: interrupted outside a training step; the last complete checkpoint stays", file=sys.stderr)
        sys.exit(130)
