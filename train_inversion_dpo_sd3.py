#!/usr/bin/env python
# Copyright 2026 The Inversion-DPO authors. Licensed under the Apache License, Version 2.0.
"""Inversion-DPO (and Flow-DPO, InPO, SFT) LoRA training for Stable Diffusion 3 and 3.5, in flow space.

    accelerate launch train_inversion_dpo_sd3.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name yuvalkirstain/pickapic_v2 --objective inversion_dpo --max_sequence_length 77 \\
        --use_8bit_adam --mixed_precision bf16 --gradient_checkpointing --output_dir sd35-inversion-dpo

The adapter lands in ``sd35-inversion-dpo/pytorch_lora_weights.safetensors``;
``StableDiffusion3Pipeline.load_lora_weights("sd35-inversion-dpo")`` loads it.

One file, as the diffusers training examples are: it imports installed packages only, so it can be copied out of
the repository and changed. What it shares with ``train_inversion_dpo.py`` (flags, data, the objectives' common
parts, the cache, checkpoints, validation, ``main``) is copied from there and marked
``# Copied from train_inversion_dpo.<name>`` (``python scripts/check_copies.py`` checks the copies, ``--fix``
rewrites them). What is particular to SD3: section 3 (rectified flow and its Euler inversion, copied from
``pipeline_inversion_sd3.py``), the objectives in flow space (section 4: velocity errors, sigma levels drawn by
``--weighting_scheme``), and section 5: an MMDiT transformer, three text encoders (CLIP-L and CLIP-G penultimate
states and pooled projections, T5-XXL optional) whose caption embeddings are computed once before training, and the
VAE's shift and scale.
"""

import argparse
import contextlib
import ctypes
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union


# Known-harmless messages of the libraries below, each dropped by a filter on the logger that emits it (so nothing
# else they say is lost). Installed before the imports (hence the file's E402 exemption): the first two are logged
# while diffusers and peft import.
# ruff: noqa: E402
# Copied from train_inversion_dpo.HARMLESS_MESSAGES
HARMLESS_MESSAGES = {
    # bitsandbytes' CPU backend looks for the optional `kernels` package at import; only 4-bit layers would use it
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    # without torchvision, transformers' image processors fall back to their PIL versions; the trainers use none
    "transformers.utils.import_utils": r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back",
    # `.to(dtype)` lists the modules a model keeps in float32: an empty list leaves nothing to keep
    "diffusers.models.modeling_utils": r"There are modules in \w+ that should be kept in float32: \[\]\.",
}


# Copied from train_inversion_dpo.silence_harmless_messages
def silence_harmless_messages():
    for name, pattern in HARMLESS_MESSAGES.items():
        logging.getLogger(name).addFilter(lambda record, p=re.compile(pattern): not p.match(record.getMessage()))


silence_harmless_messages()

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, cpu_offload
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_density_for_timestep_sampling

# (the shared LoRA loader's name: it converts any diffusers LoRA state dict to peft's keys, a transformer's too)
from diffusers.utils import convert_unet_state_dict_to_peft as convert_transformer_state_dict_to_peft
from huggingface_hub import HfApi, ModelCard, ModelCardData, is_offline_mode, try_to_load_from_cache
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast


logger = logging.getLogger(__name__)

# What differs between this script and train_inversion_dpo.py, besides sections 3 to 5
PIPELINE_CLASS = StableDiffusion3Pipeline  # saves and loads the LoRA, samples the validation images
ARCHITECTURE = "sd3"  # the model card's tag
DEFAULT_RESOLUTION = 1024

# the joint attention's projections of both streams (image: to_*, caption: add_*), SD3.5's second (image-only)
# attention included: a name matches every module whose name ends with it
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]

# Copied from train_inversion_dpo.LR_SCHEDULERS
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


# Copied from train_inversion_dpo.InputError
class InputError(ValueError):
    """Bad input (a flag, a path, the data): the run stops with this one line, exit code 2, before any training."""


# Copied from train_inversion_dpo.TrainingError
class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, gradient or weight); the message is one line naming the step."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Flags


# Copied from train_inversion_dpo.parse_args
def parse_args(input_args=None):
    return check_args(make_parser().parse_args(input_args))


# Copied from train_inversion_dpo.make_parser with make_parser->make_common_parser
def make_common_parser() -> argparse.ArgumentParser:
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
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset_name",
        required=True,
        help="Hub id, or a local parquet/json/jsonl/csv file, a folder of them, an imagefolder with "
        "metadata, or a save_to_disk folder, in the Pick-a-Pic schema (see the column flags).",
    )
    g.add_argument("--dataset_config_name", default=None, help="The dataset's configuration, if it has several.")
    g.add_argument("--dataset_split_name", default="train", help="The split to train on.")
    g.add_argument("--cache_dir", default=None, help="Where datasets caches downloads (its default cache if unset).")
    g.add_argument("--image_column_0", default="jpg_0", help="First image: bytes, a path or a decoded image.")
    g.add_argument("--image_column_1", default="jpg_1", help="Second image.")
    g.add_argument(
        "--label_column",
        default="label_0",
        help="1 if the first image is preferred, 0 if the second, 0.5 for a tie (dropped and counted).",
    )
    g.add_argument("--caption_column", default="caption", help="The prompt both images answer.")
    g.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Use only the first N usable pairs (after ties and bad rows).",
    )
    g.add_argument(
        "--max_bad_fraction",
        type=float,
        default=0.05,
        help="Rows that cannot make a pair (unreadable, truncated, tiny or huge image, bad label, missing or empty "
        "caption) are skipped and counted; more than this fraction of the rows checked stops the run with an error.",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=DEFAULT_RESOLUTION,
        help="Square training size in pixels (a multiple of 8): the shorter side is resized to it, then cropped.",
    )
    g.add_argument("--random_crop", action="store_true", help="Random instead of center crops.")
    g.add_argument(
        "--random_flip",
        action="store_true",
        help="Random horizontal flips (one flip shared by both images of a pair). Off by default: a flip makes a "
        "caption that says left or right wrong.",
    )
    g.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Processes that decode images (and check rows) beside the main one; 0 decodes in the main process.",
    )
    g = p.add_argument_group("objective")
    g.add_argument(
        "--objective",
        default="inversion_dpo",
        choices=sorted(OBJECTIVES),
        help="inversion_dpo: DPO on the reference's DDIM inversion of each image (the paper's); diffusion_dpo: DPO at "
        "one noised step per pair (Wallace et al. 2023); inpo: DDIM-InPO, on a coarse inversion grid; sft: "
        "supervised fine-tuning on the winners alone.",
    )
    g.add_argument(
        "--loss_type",
        default="sigmoid",
        choices=LOSS_TYPES,
        help="Link applied to -beta_dpo/2 * margin: -log sigmoid, hinge relu(1 - z), or ipo (z - 1/2)^2.",
    )
    g.add_argument(
        "--beta_dpo",
        type=float,
        default=5000.0,
        help="KL strength. Diffusion-DPO's T is folded in and the 1/2 is applied inside: the logit is "
        "-beta_dpo/2 * margin, as in the Diffusion-DPO authors' code and diffusers' SDXL DPO example (diffusers' SD 1.5 "
        "example leaves the 1/2 out: its 2500 is this 5000).",
    )
    g.add_argument(
        "--sft_weight",
        type=float,
        default=0.0,
        help="Pair objectives: add this times the sft loss on the winners (fresh noise, see the next two flags), a "
        "supervised anchor on the preferred images as RPO adds the winner's NLL to DPO; one more policy call per pair. "
        "0: the preference alone.",
    )
    g.add_argument(
        "--sft_min_timestep",
        type=int,
        default=0,
        help="The sft loss (the sft objective, or the --sft_weight term) draws t from [this, T): 600 trains the levels "
        "where a sample's layout is decided.",
    )
    g.add_argument(
        "--sft_caption_dropout",
        type=float,
        default=0.0,
        help="Share of the sft loss's rows trained on the null caption, keeping the unconditional branch that "
        "guidance subtracts in step.",
    )
    g.add_argument(
        "--anchor_weight",
        type=float,
        default=0.0,
        help="Add this times the policy's squared distance to the reference (the frozen model) on the winners at "
        "t < --anchor_max_timestep, fresh noise: it keeps the levels the --sft_weight term (or the sft objective) does "
        "not train where they were, since one LoRA serves every level. One more policy call with grad and one "
        "reference call per pair. 0: off.",
    )
    g.add_argument(
        "--anchor_max_timestep",
        type=int,
        default=None,
        help="The anchor draws t from [0, this); default: --sft_min_timestep.",
    )
    g.add_argument("--inversion_steps", type=int, default=20, help="N, the DDIM inversion grid of inversion_dpo.")
    g.add_argument(
        "--inversion_guidance_scale",
        type=float,
        default=1.0,
        help="Guidance of the reference's inversion (1 = conditional alone; the official code uses 2).",
    )
    g.add_argument(
        "--inversion_target",
        default="x0",
        choices=INVERSION_TARGETS,
        help="x0 (default) and step: this project's extensions, the noise landing one step on the image or on the "
        "trajectory's next latent (see docs/method.md); reference: the paper's figure (zero gradient at initialisation: "
        "a LoRA never moves).",
    )
    g.add_argument(
        "--loss_space",
        default="prediction",
        choices=LOSS_SPACES,
        help="Where errors are measured: prediction = the model's own output (v for a v-prediction model, as the "
        "diffusers training examples compute their loss; the noise otherwise), epsilon = always the noise. On a "
        "zero-terminal-SNR v model the noise is blind at the top level (eps = x_t there), where the layout is decided.",
    )
    g.add_argument(
        "--timestep_weighting",
        default="uniform",
        choices=TIMESTEP_WEIGHTINGS,
        help="Weight of inversion step i: uniform, or the official code's 1/(2 a_t).",
    )
    g.add_argument(
        "--inversion_grad_steps",
        type=int,
        default=None,
        help="Back-propagate k random steps of the N, scaled N/k: an unbiased gradient (the margin itself still "
        "uses every step). Default: all N (exact).",
    )
    g.add_argument(
        "--inversion_chunk_steps",
        type=int,
        default=1,
        help="Inversion steps per policy call with grad. Below N: two passes (the margin from every step without "
        "grad, then the gradient chunk by chunk, one backward each): the exact gradient with the activation memory "
        "of this many steps whatever N, for about 4/3 the compute. N or more: all steps in one graph.",
    )
    g.add_argument(
        "--inversion_margin",
        default="trajectory",
        choices=INVERSION_MARGINS,
        help="trajectory: every step inside one sigmoid (the paper). step (this project's extension): each pair "
        "samples one step and the sigmoid takes w_i m_i, whose mean is the trajectory margin (Diffusion-DPO's "
        "per-timestep form, a Jensen upper bound of the trajectory loss): 2 policy rows with grad per pair.",
    )
    g.add_argument(
        "--inversion_cache",
        default=None,
        help="Folder of reference-side caches: the trajectory inputs, targets and reference errors of every pair, "
        "computed once (missing shards are built first, sharded over the processes) and reused by every run with the "
        "same model, data and inversion settings; a training step then runs the policy alone.",
    )
    g.add_argument("--inversion_cache_only", action="store_true", help="Build the cache, then exit.")
    g.add_argument(
        "--cache_steps",
        type=int,
        default=None,
        help="Store K evenly spaced of the N steps (bounds the disk; the margin then sums over those K). Default: all.",
    )
    g.add_argument("--inversion_cache_shard_size", type=int, default=64, help="Pairs per cache file.")
    g.add_argument(
        "--inversion_cache_dtype",
        default="float16",
        choices=["float16", "float32"],
        help="Storage of the cached latents and targets (reference errors are float32 either way); float32 "
        "reproduces an uncached run to float precision at twice the disk.",
    )
    g.add_argument("--inpo_inversion_steps", type=int, default=10, help="The coarse grid of inpo (official 10).")
    g.add_argument(
        "--inpo_eta",
        type=float,
        default=0.0,
        help="inpo: fresh noise after each inversion step, times the DDPM posterior std (official 0.1).",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--output_dir",
        default="inversion-dpo-lora",
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
        default=None,
        help="Seeds the noise, the data order and the augmentation (unset: 0 for the data order, random noise).",
    )
    g.add_argument("--train_batch_size", type=int, default=1, help="Pairs per device per micro-step.")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the pairs (unless --max_train_steps).")
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-steps whose gradients make one optimizer step.",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute the UNet's activations in the backward: less memory, about a third more compute.",
    )
    g.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW's learning rate of the LoRA weights.")
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
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW's decoupled weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon.")
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="Clip the gradient's norm to this; 0 measures it (logged as grad_norm) without clipping.",
    )
    g.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank).")
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
        "card. Unset: the first --num_validation_prompts distinct captions of the data.",
    )
    g.add_argument(
        "--num_validation_prompts",
        type=int,
        default=4,
        help="Without --validation_prompts: validate on this many distinct captions of the data; 0 turns validation "
        "off.",
    )
    g.add_argument(
        "--validation_steps", type=int, default=200, help="Sample the validation prompts every this many steps."
    )
    g.add_argument(
        "--validation_num_inference_steps", type=int, default=25, help="DDIM steps of the validation samples."
    )
    g.add_argument("--validation_guidance_scale", type=float, default=7.5, help="Guidance of the validation samples.")
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


def make_parser() -> argparse.ArgumentParser:
    """The flags of the SD trainer, with the help texts whose meaning differs in flow space rewritten, and SD3's own
    (text encoders, how sigma levels are drawn)."""
    p = make_common_parser()
    for action in p._actions:  # argparse offers no public way to edit a defined flag
        if action.dest in FLOW_HELP:
            action.help = FLOW_HELP[action.dest]
    p.set_defaults(beta_dpo=DEFAULT_BETA)
    g = p.add_argument_group("SD3")
    g.add_argument(
        "--max_sequence_length",
        type=int,
        default=77,
        help="T5 tokens per caption (the pipeline's default is 256; 77 keeps the embeddings small). Sample with the "
        "same value.",
    )
    g.add_argument(
        "--no_t5",
        action="store_true",
        help="Leave T5-XXL out: its embeddings are zeros, as StableDiffusion3Pipeline runs with text_encoder_3=None "
        "(load the pipeline that way to sample with the adapter).",
    )
    g.add_argument(
        "--sequential_offload_t5",
        action="store_true",
        help="While the captions are embedded (once, before training), keep T5-XXL's weights on the CPU and move each "
        "layer to the GPU only for its own computation (accelerate's cpu_offload, as diffusers' "
        "enable_sequential_cpu_offload): that phase then needs about 2.3 GiB instead of 11 GiB for SD3.5, at the "
        "price of moving T5's 9.5 GB of weights once per 16 captions. The embeddings are the same.",
    )
    g.add_argument(
        "--weighting_scheme",
        default="none",
        choices=WEIGHTING_SCHEMES,
        help="How the sigma levels of Flow-DPO, InPO and the winner terms are drawn over the model's 1000 training "
        "levels (diffusers' compute_density_for_timestep_sampling): none = uniform, logit_normal (SD3's training), "
        "mode. Every level's loss weight is 1.",
    )
    g.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: the mean.")
    g.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: the standard deviation.")
    g.add_argument("--mode_scale", type=float, default=1.29, help="mode: the scale.")
    return p


# On velocity errors 500, not the SD trainers' 5000: on the SD3 shapes twin at equal budget over 3 seeds Inversion-DPO
# gained +4.9 points at 500 and -0.9 at 5000, Flow-DPO +3.1 and +2.8 (docs/experiments/sd3-twin.md)
DEFAULT_BETA = 500.0

# what the flags mean in flow space, where it differs from the SD trainer's help text
FLOW_HELP = {
    "resolution": "Square training size in pixels (a multiple of 16: the VAE's 8 times the transformer's patch 2): "
    "the shorter side is resized to it, then cropped.",
    "objective": "inversion_dpo: DPO on the reference's Euler inversion of each image (the paper's, in flow space); "
    "diffusion_dpo: Flow-DPO, DPO at one noised level per pair on velocity errors; inpo: DDIM-InPO carried to flow, "
    "on a coarse inversion grid; sft: flow matching on the winners alone.",
    "lora_target_modules": "Comma-separated transformer module names (peft suffix match) that get LoRA: by default "
    "the joint attention's projections of both streams, image (to_q, to_k, to_v, to_out.0) and caption (add_q_proj, "
    "add_k_proj, add_v_proj, to_add_out), SD3.5's second attention (attn2) included; add e.g. ff.net.0.proj,ff.net.2 "
    "for the feed-forward layers.",
    "validation_num_inference_steps": "Flow-matching Euler steps of the validation samples.",
    "beta_dpo": "beta of the preference link, on errors that are means over the latent's elements of the squared "
    "velocity error (beta/2 inside the sigmoid, as the SD trainers).",
    "inversion_steps": "N, the Euler inversion grid of inversion_dpo: the model's own N-step sampling grid of "
    "shifted sigmas.",
    "inversion_target": "x0 (default): the velocity that carries the trajectory's latent x_i to the clean latent in "
    "one step, (x_i - z0) / s_i; step: the velocity whose Euler step lands on the trajectory's next latent x_{i-1}; "
    "reference: the reference's own velocity (the paper's figure; zero gradient at initialisation).",
    "loss_space": "Errors are measured on the transformer's own output, the velocity.",
    "timestep_weighting": "Weight of inversion step i: uniform (velocity errors), or x0 = s_i^2, the error of the "
    "clean latent the velocity implies.",
    "sft_min_timestep": "The sft loss draws its level from [this, 1000) of the model's 1000 training levels, "
    "ascending in noise (level t has sigma = the scheduler's shifted sigma of timestep t + 1).",
    "anchor_max_timestep": "The anchor draws its level from [0, this) of the 1000 training levels; default: "
    "--sft_min_timestep.",
    "inpo_inversion_steps": "The coarse Euler grid of inpo.",
    "inpo_eta": "Not defined for flow models: must stay 0.",
}


# Copied from train_inversion_dpo.check_args with check_args->check_common_args
def check_common_args(args):
    """One-line errors (exit 2) for flags that cannot work together; fills defaults that follow from others."""
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "inversion_steps",
        "inpo_inversion_steps",
        "inversion_chunk_steps",
        "inversion_cache_shard_size",
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
    for name in ("num_validation_prompts", "lr_warmup_steps", "dataloader_num_workers", "inpo_eta"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must be at least 0, got {getattr(args, name):g}")
    for name in ("learning_rate", "beta_dpo"):
        if not getattr(args, name) > 0:  # also refuses nan
            raise InputError(f"--{name} must be above 0, got {getattr(args, name):g}")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise InputError(
            "--overwrite_output_dir starts the run over, --resume_from_checkpoint continues it: pass one of them"
        )
    if args.inversion_grad_steps is not None and args.inversion_grad_steps < 1:
        raise InputError(f"--inversion_grad_steps must be at least 1, got {args.inversion_grad_steps}")
    if args.inversion_grad_steps is not None and args.inversion_margin == "step":
        raise InputError("--inversion_grad_steps samples steps of the trajectory margin; --inversion_margin step "
                         "back-propagates its one step already")  # fmt: skip
    if args.sft_weight < 0:
        raise InputError(f"--sft_weight must be at least 0, got {args.sft_weight:g}")
    if args.sft_weight and args.objective == "sft":
        raise InputError("--sft_weight adds the sft loss to a pair objective; --objective sft is that loss alone")
    if not 0 <= args.sft_caption_dropout < 1:
        raise InputError(f"--sft_caption_dropout must be in [0, 1), got {args.sft_caption_dropout:g}")
    if args.sft_min_timestep < 0:
        raise InputError(f"--sft_min_timestep must be at least 0, got {args.sft_min_timestep}")
    if args.anchor_weight < 0:
        raise InputError(f"--anchor_weight must be at least 0, got {args.anchor_weight:g}")
    if args.anchor_max_timestep is None:
        args.anchor_max_timestep = args.sft_min_timestep
    if args.anchor_weight and args.anchor_max_timestep < 1:
        raise InputError(
            "--anchor_weight needs --anchor_max_timestep (or --sft_min_timestep) above 0: the levels to keep"
        )
    unused = [f"--{n}" for n in ("sft_min_timestep", "sft_caption_dropout") if getattr(args, n)]
    if unused and not (args.sft_weight or args.anchor_weight) and args.objective != "sft":
        raise InputError(
            f"{' and '.join(unused)} shape the sft loss, which --objective {args.objective} only uses with "
            "--sft_weight > 0 (or the anchor, with --anchor_weight > 0)"
        )
    if args.inversion_cache:
        if args.objective != "inversion_dpo":
            raise InputError(
                f"--inversion_cache holds inversion_dpo's reference side; --objective is {args.objective}"
            )
        if args.random_crop:
            raise InputError("--random_crop cannot be cached (the crops are not enumerable); drop one of the two")
    elif args.inversion_cache_only or args.cache_steps is not None:
        raise InputError("--inversion_cache_only and --cache_steps need --inversion_cache DIR")
    if args.cache_steps is not None and args.cache_steps < 1:
        raise InputError(f"--cache_steps must be at least 1, got {args.cache_steps}")
    if args.resolution % 8:
        raise InputError(f"--resolution must be a multiple of 8, got {args.resolution}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise InputError(f"--max_bad_fraction must be between 0 and 1, got {args.max_bad_fraction}")
    args.logging_dir = os.path.join(args.output_dir, args.logging_dir)
    return args


def check_args(args):
    """The SD trainer's checks, and SD3's own."""
    args = check_common_args(args)
    if args.inpo_eta:
        raise InputError("--inpo_eta adds DDPM posterior noise, which a flow model has no counterpart of: leave it 0")
    if args.max_sequence_length < 1 or args.max_sequence_length > 512:
        raise InputError(f"--max_sequence_length must be between 1 and 512, got {args.max_sequence_length}")
    if args.resolution % 16:
        raise InputError(f"--resolution must be a multiple of 16 (VAE 8 x patch 2), got {args.resolution}")
    if args.sequential_offload_t5 and args.no_t5:
        raise InputError("--sequential_offload_t5 offloads T5, which --no_t5 leaves out: pass one of them")
    return args


# Copied from train_inversion_dpo.local_path_like
def local_path_like(name: str) -> bool:
    """A string that can only name a local path: absolute, starting with ``.`` or ``~``, with more than one ``/``, or
    an existing file (a Hub id is ``name`` or ``owner/name``)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.isfile(name)


# Copied from train_inversion_dpo.check_model_path
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


# Copied from train_inversion_dpo.check_paths
def check_paths(args):
    """One-line errors (exit 2) for the paths and names a user typed, before anything is written or decoded: the
    models, the dataset, the checkpoint to resume, and an --output_dir that holds a run."""
    check_model_path(
        "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "model_index.json", args.revision
    )
    if args.pretrained_vae_model_name_or_path:
        check_model_path("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, "config.json")
    if local_path_like(args.dataset_name) and not os.path.exists(args.dataset_name):
        raise InputError(f"--dataset_name: no such file or folder: '{args.dataset_name}'")
    resume = args.resume_from_checkpoint
    if resume not in (None, "latest") and not os.path.isdir(resume):
        raise InputError(f"--resume_from_checkpoint: no such folder: '{resume}'")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir: '{args.output_dir}' is a file; pass a folder (it is created if missing)")
    found = previous_run(args)
    if found and not (resume or args.overwrite_output_dir or args.inversion_cache_only):
        raise InputError(
            f"--output_dir '{args.output_dir}' holds a run ({', '.join(found)}): continue it with "
            "--resume_from_checkpoint latest, or start over with --overwrite_output_dir"
        )


# ---------------------------------------------------------------------------------------------------------------
# 2. Preference pairs: loading, checking every row once, the winner first, shared augmentation


# Copied from train_inversion_dpo.DataError
class DataError(InputError):
    """Bad input data; the message is one line naming the dataset, the column or the row."""


# Copied from train_inversion_dpo.first_line
def first_line(error: Exception, limit: int = 300) -> str:
    """An exception's message cut to its first line, for one-line errors; a line over ``limit`` characters is cut at
    a space, never inside a word or a path, and ends in an ellipsis."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0].strip()
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit)
    return (line[:cut] if cut > 0 else line).rstrip(" ,;:") + " ..."


# Copied from train_inversion_dpo.LOCAL_FORMATS
LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


# Copied from train_inversion_dpo.PairColumns
@dataclass
class PairColumns:
    image_0: str = "jpg_0"
    image_1: str = "jpg_1"
    label_0: str = "label_0"
    caption: str = "caption"


# Copied from train_inversion_dpo.load_pairs_dataset
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


# Copied from train_inversion_dpo._parquet_rows
def _parquet_rows(path: str):
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None


# Copied from train_inversion_dpo.check_columns
def check_columns(dataset, columns: PairColumns, source: str):
    missing = [c for c in vars(columns).values() if c not in dataset.column_names]
    if missing:
        flags = {
            v: "--"
            + k.replace("image_", "image_column_")
            .replace("label_0", "label_column")
            .replace("caption", "caption_column")
            for k, v in vars(columns).items()
        }
        raise DataError(
            f"dataset '{source}' has no column '{missing[0]}' (columns: {', '.join(dataset.column_names)}); "
            f"name the right one with {flags[missing[0]]}"
        )


# a row is skipped (and counted under this reason) when it cannot make a training pair
# Copied from train_inversion_dpo.BAD_REASONS
BAD_REASONS = ("bad_label", "bad_caption", "bad_image", "small_image", "large_image")


# an image whose shorter side is under resolution / MIN_SIDE_DIVISOR would be upscaled past recognition
# Copied from train_inversion_dpo.MIN_SIDE_DIVISOR
MIN_SIDE_DIVISOR = 4


# Copied from train_inversion_dpo.BadRow
class BadRow(ValueError):
    """One row that cannot be used; ``reason`` is one of BAD_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# Copied from train_inversion_dpo.parse_label
def parse_label(value) -> float:
    """``label_0`` as 0.0, 0.5 or 1.0; anything else raises BadRow."""
    try:
        label = float(value)
    except (TypeError, ValueError):
        label = math.nan
    if label not in (0.0, 0.5, 1.0):
        raise BadRow("bad_label", f"is {value!r}; expected 0, 0.5 or 1")
    return label


# Copied from train_inversion_dpo.parse_caption
def parse_caption(value) -> str:
    """The caption as a string (the first of a list); a missing or blank one raises BadRow: a pair trained on the
    empty prompt would teach a preference to the unconditional model that classifier-free guidance subtracts."""
    if isinstance(value, (list, tuple)):  # some datasets keep several captions per image
        value = value[0] if value else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise BadRow("bad_caption", "is missing")
    caption = str(value)
    if not caption.strip():
        raise BadRow("bad_caption", "is empty")
    return caption


# Copied from train_inversion_dpo.to_rgb
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode PIL decodes: EXIF rotation applied, transparency (RGBA, LA, palette with a transparent
    colour) composited on white rather than dropped to black, 16/32-bit integer and float greyscale scaled to 8 bits,
    CMYK and the rest through PIL's conversion."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and array.max(initial=0.0) <= 1.0:
            array = array * 255.0  # floats in [0, 1]
        elif image.mode.startswith("I;16") or array.max(initial=0.0) > 255:
            array = array / 257.0  # 16-bit range onto 8 bits
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


# Copied from train_inversion_dpo.to_pil
def to_pil(value, base_dir: str = ".", where: str = "") -> Image.Image:
    """An RGB image (see ``to_rgb``) from JPEG/PNG/... bytes, a ``{"bytes", "path"}`` dict (datasets' Image
    storage), a path (absolute or relative to ``base_dir``), a numpy array or a PIL image. Raises DataError naming
    ``where`` (and the file) when it cannot be read, is truncated, or is larger than PIL's decompression-bomb limit."""
    try:
        return decode_image(value, base_dir)
    except BadRow as e:
        raise DataError(f"{where}: {e}") from None


# Copied from train_inversion_dpo.decode_image
def decode_image(value, base_dir: str = ".") -> Image.Image:
    """``to_pil`` raising BadRow ("bad_image" or "large_image") instead of DataError."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    name = ""
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that: both are a skipped row here, before
            # any pixel is decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, str):
                name = f" '{value}'"
                image = Image.open(value if os.path.isabs(value) else os.path.join(base_dir, value))
            elif isinstance(value, np.ndarray):
                image = Image.fromarray(value)
            elif isinstance(value, Image.Image):
                image = value
            elif value is None:
                raise BadRow("bad_image", "no image (empty value)")
            else:
                raise BadRow("bad_image", f"cannot read an image from a {type(value).__name__}")
            image.load()
            return to_rgb(image)
    except BadRow:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRow("large_image", f"image{name} too large ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadRow("bad_image", f"unreadable image{name} (not an image format PIL can decode)") from None
    except Exception as e:
        raise BadRow("bad_image", f"unreadable image{name} ({type(e).__name__}: {e})") from None


# Copied from train_inversion_dpo.check_row
def check_row(row: dict, columns: "PairColumns", base_dir: str, min_side: int) -> float:
    """Checks one row as training will read it (label, caption, both images decoded in full). Returns the label;
    raises BadRow whose message names the column."""
    where = ""
    try:
        where = f"column '{columns.label_0}' "
        label = parse_label(row[columns.label_0])
        if label == 0.5:
            return label
        where = f"column '{columns.caption}' "
        parse_caption(row[columns.caption])
        for name in (columns.image_0, columns.image_1):
            where = f"column '{name}': "
            image = decode_image(row[name], base_dir)
            if min(image.size) < min_side:
                raise BadRow("small_image", f"image of {image.width} x {image.height} pixels, under {min_side}")
    except BadRow as e:
        raise BadRow(e.reason, where + str(e)) from None
    return label


# Copied from train_inversion_dpo.RowCheck
@dataclass
class RowCheck:
    """What checking a dataset's rows found: the rows to train on, the ties and the skipped rows."""

    keep: List[int] = field(default_factory=list)
    ties: int = 0
    bad: List[Tuple[int, str, str]] = field(default_factory=list)  # (row, reason, message)
    rows: int = 0  # rows checked

    def counts(self) -> Dict[str, int]:
        out = {"rows": self.rows, "ties_dropped": self.ties, "bad_rows": len(self.bad)}
        out.update({reason: sum(b[1] == reason for b in self.bad) for reason in BAD_REASONS})
        out["pairs"] = len(self.keep)
        return out


# Copied from train_inversion_dpo._check_batch
def _check_batch(batch, columns, base_dir, min_side):
    status, message = [], []
    for k in range(len(next(iter(batch.values())))):
        try:
            label = check_row({name: batch[name][k] for name in batch}, columns, base_dir, min_side)
            status.append("tie" if label == 0.5 else "ok")
            message.append("")
        except BadRow as e:
            status.append(e.reason)
            message.append(str(e))
    return {"status": status, "message": message}


# Copied from train_inversion_dpo.check_rows
def check_rows(
    dataset,
    columns: PairColumns,
    resolution: int,
    base_dir: str = ".",
    max_pairs: Optional[int] = None,
    num_proc: Optional[int] = None,
) -> RowCheck:
    """Decodes every row once, before training, so that training never meets a bad row and a resumed run sees the
    same rows (datasets caches the result for file-backed datasets). With ``max_pairs``, rows are checked in chunks
    from the top until that many pairs are found."""
    check = RowCheck()
    min_side = max(1, resolution // MIN_SIDE_DIVISOR)
    start = 0
    while start < len(dataset) and (max_pairs is None or len(check.keep) < max_pairs):
        stop = len(dataset) if max_pairs is None else min(len(dataset), start + max(max_pairs - len(check.keep), 256))
        chunk = dataset if (start, stop) == (0, len(dataset)) else dataset.select(range(start, stop))
        result = chunk.map(
            _check_batch,
            batched=True,
            remove_columns=chunk.column_names,
            num_proc=num_proc if num_proc and len(chunk) > num_proc else None,
            fn_kwargs={"columns": columns, "base_dir": base_dir, "min_side": min_side},
            desc="checking rows",
        )
        for i, (status, message) in enumerate(zip(result["status"], result["message"])):
            row = start + i
            if status == "ok":
                if max_pairs is None or len(check.keep) < max_pairs:
                    check.keep.append(row)
            elif status == "tie":
                check.ties += 1
            else:
                check.bad.append((row, status, message))
        start = stop
    check.rows = start
    return check


# Copied from train_inversion_dpo.select_pairs
def select_pairs(dataset, columns: PairColumns, check: RowCheck, source: str, max_bad_fraction: float):
    """The usable rows of ``dataset``; a one-line DataError when too many rows are bad or none is usable."""
    if check.bad and len(check.bad) > max_bad_fraction * check.rows:
        row, _, message = check.bad[0]
        raise DataError(
            f"dataset '{source}': {len(check.bad)} of {check.rows} rows are bad "
            f"({100 * len(check.bad) / check.rows:.1f}%, more than --max_bad_fraction {max_bad_fraction:g}); "
            f"the first, row {row}: {message}"
        )
    if not check.keep:
        raise DataError(
            f"dataset '{source}' has no usable pair ({check.rows} rows: {check.ties} ties, {len(check.bad)} bad)"
        )
    return dataset.select(check.keep) if len(check.keep) < len(dataset) else dataset


# Copied from train_inversion_dpo.raw_images
def raw_images(dataset, columns: PairColumns):
    """The dataset with its image columns left undecoded, so that a broken image reaches ``decode_image`` (and is
    counted) instead of failing inside datasets."""
    for name in (columns.image_0, columns.image_1):
        if isinstance(dataset.features.get(name), datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


# Copied from train_inversion_dpo.resize_and_crop
def resize_and_crop(image: Image.Image, resolution: int, rng: Optional[random.Random] = None, flip: bool = False):
    """Resizes the shorter side to ``resolution``, crops a square and optionally mirrors it. Returns the crop and its
    top-left corner (y, x) in the resized image as SDXL's time ids need it: after a flip, the corner of the mirrored
    crop within the mirrored image."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    if rng is not None:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    else:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    crop = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        return crop.transpose(Image.FLIP_LEFT_RIGHT), (top, new_w - resolution - left)
    return crop, (top, left)


# Copied from train_inversion_dpo.to_tensor
def to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# Copied from train_inversion_dpo.PreferencePairs
class PreferencePairs(torch.utils.data.Dataset):
    """Items: ``pixel_values`` [2, 3, R, R] (winner, loser), ``caption``, ``original_sizes`` [2, 2] (h, w) and
    ``crop_top_lefts`` [2, 2] (y, x). One horizontal flip is shared by both images of a pair, so the pair still
    differs only in what the labeller judged. Rows are expected to have passed ``check_rows``; ``row_ids`` are their
    numbers in the source, for error messages."""

    def __init__(
        self,
        dataset,
        columns: PairColumns,
        resolution: int,
        base_dir: str = ".",
        source: str = "",
        random_crop: bool = False,
        seed: int = 0,
        hflip: bool = False,
        row_ids: Optional[List[int]] = None,
    ):
        self.dataset, self.columns, self.resolution = dataset, columns, resolution
        self.base_dir, self.source, self.random_crop, self.hflip = base_dir, source, random_crop, hflip
        self.seed, self.epoch = seed, 0  # the trainer sets epoch before each pass
        self.row_ids = row_ids

    def augmentation_rng(self, index) -> random.Random:
        """Flips and crops are a function of (seed, epoch, row), not of a global stream: a resumed run, a prefetching
        loader and any number of workers all see the same augmentation."""
        return random.Random(f"{self.seed}/{self.epoch}/{index}")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        rng = self.augmentation_rng(index)
        return self.load(index, self.draw_flip(rng), rng)

    def draw_flip(self, rng: random.Random) -> bool:
        """The pair's shared flip: the first draw of its augmentation stream (a cache picks its stored flip so)."""
        return self.hflip and rng.random() < 0.5

    def load(self, index, flip: bool, rng: Optional[random.Random] = None):
        """Pair ``index`` with the given flip; ``rng`` draws the random crop (center crop without it)."""
        row = self.dataset[index]
        c = self.columns
        where = f"dataset '{self.source}', row {index if self.row_ids is None else self.row_ids[index]}"
        try:  # a row that passed check_rows fails here only if its files changed since
            winner_first = parse_label(row[c.label_0]) == 1.0
            caption = parse_caption(row[c.caption])
        except BadRow as e:
            raise DataError(f"{where}: {e}") from None
        names = (c.image_0, c.image_1) if winner_first else (c.image_1, c.image_0)
        pixels, sizes, crops = [], [], []
        for name in names:
            image = to_pil(row[name], self.base_dir, f"{where}, column '{name}'")
            sizes.append((image.height, image.width))
            image, crop = resize_and_crop(image, self.resolution, rng if self.random_crop else None, flip)
            pixels.append(to_tensor(image))
            crops.append(crop)
        return {
            "pixel_values": torch.stack(pixels),
            "caption": caption,
            "original_sizes": torch.tensor(sizes),
            "crop_top_lefts": torch.tensor(crops),
        }


# Copied from train_inversion_dpo.collate_pairs
def collate_pairs(items):
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),  # [B, 2, 3, R, R]
        "captions": [i["caption"] for i in items],
        "original_sizes": torch.stack([i["original_sizes"] for i in items]),  # [B, 2, 2]
        "crop_top_lefts": torch.stack([i["crop_top_lefts"] for i in items]),  # [B, 2, 2]
    }


# Copied from train_inversion_dpo.load_pairs
def load_pairs(args, accelerator):
    """Loads the pairs and checks every row once (before the models, so bad data fails fast). Skipped rows are
    counted by reason and listed in <logging_dir>/bad_rows.jsonl. Returns the dataset and the counts."""
    columns = PairColumns(args.image_column_0, args.image_column_1, args.label_column, args.caption_column)
    error = None
    with accelerator.main_process_first():
        # the main process goes first (the others then read datasets' cache of a file-backed dataset's check); an
        # error is raised after the barrier, so that the others are not left waiting at it
        try:
            dataset, base_dir = load_pairs_dataset(
                args.dataset_name, args.dataset_config_name, args.dataset_split_name, args.cache_dir
            )
            check_columns(dataset, columns, args.dataset_name)
            dataset = raw_images(dataset, columns)
            check = check_rows(
                dataset,
                columns,
                args.resolution,
                base_dir,
                max_pairs=args.max_train_samples,
                num_proc=args.dataloader_num_workers or None,
            )
        except DataError as e:
            error = e
    if error is not None:
        raise error
    counts = check.counts()
    if accelerator.is_main_process:
        with open(os.path.join(args.logging_dir, BAD_ROWS_FILE), "w") as f:
            for row, reason, message in check.bad:
                f.write(json.dumps({"row": row, "reason": reason, "message": message}) + "\n")
        for row, _, message in check.bad[:5]:
            logger.warning(f"{args.dataset_name}, row {row} skipped: {message}")
    dataset = select_pairs(dataset, columns, check, args.dataset_name, args.max_bad_fraction)
    logger.info(f"{args.dataset_name}: {counts}")
    pairs = PreferencePairs(
        dataset,
        columns,
        args.resolution,
        base_dir=base_dir,
        source=args.dataset_name,
        random_crop=args.random_crop,
        hflip=args.random_flip,
        seed=args.seed or 0,
        row_ids=check.keep,
    )
    return pairs, counts


# ---------------------------------------------------------------------------------------------------------------
# 3. Rectified flow (docs/method.md, "Flow matching"), both ways
#
# diffusers' convention: x_s = (1 - s) x0 + s n for s in [0, 1], clean to noise; the transformer, called with
# timestep 1000 s, predicts the velocity v = n - x0. Sampling steps x_{s'} = x_s + (s' - s) v(x_s, s) down the
# scheduler's grid of shifted sigmas; inversion is the same Euler step up it, with the velocity at the lower latent and
# the upper label (as DDIM inversion takes its noise). The functions are copies of pipeline_inversion_sd3.py's, so
# the inversion a model is trained on and the one the pipeline computes cannot drift apart.


# Copied from pipeline_inversion_sd3.FlowGrid
class FlowGrid(NamedTuple):
    """The N-step grid of a flow-matching Euler scheduler, ascending in noise.

    ``sigmas[0] = 0`` is the clean level (where sampling ends and inversion starts), ``sigmas[i + 1]`` the level of
    step ``i``, whose label (what the velocity is evaluated at) is ``timesteps[i] = sigmas[i + 1]``, a sigma in
    [0, 1]: the transformer is called with ``1000 * timesteps[i]``, the scheduler's ``num_train_timesteps`` times it.
    """

    timesteps: torch.Tensor  # [N] float32, ascending: the sigma labels of levels 1 .. N
    sigmas: torch.Tensor  # [N + 1] float32, ascending, sigmas[0] = 0


# Copied from pipeline_inversion_sd3.flow_grid
def flow_grid(
    scheduler, num_steps: int, device: Union[str, torch.device] = "cpu", mu: Optional[float] = None
) -> FlowGrid:
    """Reads the grid from a (copy of a) ``FlowMatchEulerDiscreteScheduler``, so the shift and spacing are the
    model's own (``mu``: the dynamic shift, for a scheduler configured with ``use_dynamic_shifting``)."""
    if mu is None:
        scheduler.set_timesteps(num_steps)
    else:
        scheduler.set_timesteps(num_steps, mu=mu)
    sigmas = scheduler.sigmas.to(torch.float32).flip(0)
    if sigmas[0] != 0:  # a scheduler whose grid stops short of the clean level: inversion starts at 0 all the same
        sigmas = torch.cat([sigmas.new_zeros(1), sigmas])
    return FlowGrid(sigmas[1:].to(device), sigmas.to(device))


# Copied from pipeline_inversion_sd3.euler_move
def euler_move(x: torch.Tensor, v: torch.Tensor, s_from, s_to) -> torch.Tensor:
    """One Euler step of the flow ODE from level ``s_from`` to ``s_to`` (either way): ``x + (s_to - s_from) v``.
    Per-sample levels of shape [B] broadcast over the remaining dims of ``x``; computed in float32."""

    def level(s):
        s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
        return s.reshape(s.shape + (1,) * (x.ndim - s.ndim)) if s.ndim else s

    return (x.float() + (level(s_to) - level(s_from)) * v.float()).to(x.dtype)


# Copied from pipeline_inversion_sd3.InversionTrajectory
class InversionTrajectory(NamedTuple):
    latents: List[torch.Tensor]  # x_1 .. x_N, x_i at level i
    velocities: List[torch.Tensor]  # v_1 .. v_N, v_i = v(x_{i-1}, s_i) moved x_{i-1} to x_i


# Copied from pipeline_inversion_sd3.flow_invert
def flow_invert(velocity_fn: Callable, z0: torch.Tensor, grid: FlowGrid) -> InversionTrajectory:
    """Walks ``z0`` up the whole grid with first-order Euler steps and keeps every latent and velocity used."""
    x, latents, velocities = z0, [], []
    for i, s in enumerate(grid.timesteps):
        v = velocity_fn(x, s)
        x = euler_move(x, v, grid.sigmas[i], grid.sigmas[i + 1])
        latents.append(x)
        velocities.append(v)
    return InversionTrajectory(latents, velocities)


def add_noise(z0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x_s = (1 - s) z0 + s n`` with one level per row (float32)."""
    s = s.reshape(-1, *([1] * (z0.ndim - 1)))
    return (1 - s) * z0.float() + s * noise.float()


# ---------------------------------------------------------------------------------------------------------------
# 4. Objectives, in flow space
#
# Each objective reads a batch of preference pairs and returns per-pair losses plus what it logs. It never sees
# `args` or the accelerator: the transformer reaches it as two denoisers, policy(x, s, cond) (the transformer with the
# LoRA adapter on, with grad) and reference(x, s, cond) (the adapter off, under no_grad), where x stacks winners then
# losers, s holds each row's sigma level in [0, 1] (float) and cond is a dict of per-row conditioning tensors. A
# denoiser returns the velocity v (float32); every error is a squared velocity error, the mean over a latent's
# elements (``mse``), and the formulas of the shared functions below that write eps read v here.
#
# All pair objectives share Diffusion-DPO's form (Wallace et al. 2023, arXiv 2311.12908, eq. 14), as in the SD
# trainer:
#
#     loss = link(-beta / 2 * margin)        link(z) = -log sigmoid(z)   ("sigmoid", default)
#                                                      relu(1 - z)       ("hinge")
#                                                      (z - 1/2)^2       ("ipo", Azar et al. 2023, times beta^2)
#
# margin < 0 means the policy prefers the winner more than the reference does: that pair counts as correct in
# `accuracy`. With policy == reference every margin is exactly 0 and the sigmoid loss is log 2. Levels: the model's
# 1000 training levels t = 0 .. 999, ascending in noise, have the scheduler's shifted sigmas (``ObjectiveConfig.
# sigmas``); the objectives that draw a level draw t by --weighting_scheme and run the model at its sigma.


# Copied from train_inversion_dpo.Denoiser
Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

# Copied from train_inversion_dpo.LOSS_TYPES
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
# Copied from train_inversion_dpo.INVERSION_TARGETS
INVERSION_TARGETS = ("reference", "step", "x0")
TIMESTEP_WEIGHTINGS = ("uniform", "x0")
# Copied from train_inversion_dpo.INVERSION_MARGINS
INVERSION_MARGINS = ("trajectory", "step")
LOSS_SPACES = ("prediction",)  # the velocity

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode")


# Copied from train_inversion_dpo.mse
def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b||^2`` as the mean over every element of one sample: shape [B]."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# Copied from train_inversion_dpo.preference_loss
def preference_loss(margin: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """The link applied to ``-beta / 2 * margin``; see the top of this section."""
    z = -0.5 * beta * margin
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return F.relu(1 - z)
    if loss_type == "ipo":
        return (z - 0.5) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


# Copied from train_inversion_dpo.dpo_margin
def dpo_margin(
    eps_pol_w: torch.Tensor,
    eps_ref_w: torch.Tensor,
    target_w: torch.Tensor,
    eps_pol_l: torch.Tensor,
    eps_ref_l: torch.Tensor,
    target_l: torch.Tensor,
) -> torch.Tensor:
    """Diffusion-DPO's margin: how much more the policy improved on the winner's target than on the loser's.

    ``(||tau_w - eps_pol_w||^2 - ||tau_w - eps_ref_w||^2) - (||tau_l - eps_pol_l||^2 - ||tau_l - eps_ref_l||^2)``
    """
    return (mse(target_w, eps_pol_w) - mse(target_w, eps_ref_w)) - (
        mse(target_l, eps_pol_l) - mse(target_l, eps_ref_l)
    )


# Copied from train_inversion_dpo.reference_distance_margin
def reference_distance_margin(eps_pol_w, eps_ref_w, eps_pol_l, eps_ref_l) -> torch.Tensor:
    """Inversion-DPO's per-step term with the reference as target (the paper's figure):
    ``||eps_pol_w - eps_ref_w||^2 - ||eps_pol_l - eps_ref_l||^2`` ("winner fitting, loser diverging").

    Every distance is 0 at policy == reference, so its gradient at initialisation is exactly zero.
    """
    return mse(eps_pol_w, eps_ref_w) - mse(eps_pol_l, eps_ref_l)


def inversion_step_weights(sigmas: torch.Tensor, weighting: str) -> torch.Tensor:
    """Weights of the inversion steps from their levels' sigmas: uniform 1 (velocity errors), or ``x0``: ``s^2``,
    which turns a velocity error into the error of the clean latent it implies (``x0_hat = x_s - s v``), so that the
    levels near ``s = 0`` weigh as little as they change the image."""
    if weighting == "uniform":
        return torch.ones_like(sigmas)
    if weighting == "x0":
        return sigmas**2
    raise ValueError(f"unknown timestep weighting {weighting!r}; expected one of {TIMESTEP_WEIGHTINGS}")


# Copied from train_inversion_dpo.map_cond
def map_cond(cond, fn):
    if isinstance(cond, dict):
        return {k: map_cond(v, fn) for k, v in cond.items()}
    return fn(cond) if isinstance(cond, torch.Tensor) else cond


# Copied from train_inversion_dpo.tile_cond
def tile_cond(cond, k: int):
    """Repeats every row block ``k`` times: conditioning for ``k`` stacked copies of the batch."""
    return cond if k == 1 else map_cond(cond, lambda v: v.repeat(k, *([1] * (v.ndim - 1))))


# Copied from train_inversion_dpo.take_cond
def take_cond(cond, rows: slice):
    return map_cond(cond, lambda v: v[rows])


# Copied from train_inversion_dpo.map_cond_pair
def map_cond_pair(a, b, fn):
    """``fn(a_leaf, b_leaf)`` over two conditionings of the same structure (tensor leaves; others from ``a``)."""
    if isinstance(a, dict):
        return {k: map_cond_pair(a[k], b[k], fn) for k in a}
    return fn(a, b) if isinstance(a, torch.Tensor) else a


# Copied from train_inversion_dpo.guided
def guided(denoiser: Denoiser, cond, null_cond, guidance_scale: float) -> Callable:
    """``eps(x, t)`` with classifier-free guidance: ``eps(null) + g (eps(c) - eps(null))``; g = 1 is one call."""
    if guidance_scale == 1.0:
        return lambda x, t: denoiser(x, t, cond)

    stacked_cond = _cat_cond(null_cond, cond)

    def eps(x, t):
        e_null, e_cond = denoiser(torch.cat([x, x]), torch.cat([t, t]), stacked_cond).chunk(2)
        return e_null + guidance_scale * (e_cond - e_null)

    return eps


# Copied from train_inversion_dpo._cat_cond
def _cat_cond(a, b):
    return map_cond_pair(a, b, lambda x, y: torch.cat([x, y]))


@dataclass
class ObjectiveConfig:
    sigmas: torch.Tensor  # [T] float32, ascending: the sigma of each training level (the scheduler's, shifted)
    beta: float = DEFAULT_BETA
    loss_type: str = "sigmoid"
    inversion_grid: Optional[FlowGrid] = None  # inversion_dpo: the N-step grid
    inversion_guidance_scale: float = 1.0
    inversion_target: str = "x0"
    inversion_grad_steps: Optional[int] = None  # k of N steps back-propagated (unbiased); None = all (exact)
    inversion_chunk_steps: Optional[int] = None  # steps per policy call with grad; None or >= N: one graph
    inversion_margin: str = "trajectory"  # or "step": one sampled step per pair (this project's extension)
    timestep_weighting: str = "uniform"
    inpo_grid: Optional[FlowGrid] = None  # inpo: the coarse grid
    weighting_scheme: str = "none"  # how levels are drawn: diffusers' compute_density_for_timestep_sampling
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sft_weight: float = 0.0  # pair objectives: + sft_weight x the sft loss on the winners (``with_winner_sft``)
    sft_min_timestep: int = 0  # the sft loss draws its level from [sft_min_timestep, T)
    sft_caption_dropout: float = 0.0  # share of the sft loss's rows conditioned on the null caption instead
    anchor_weight: float = 0.0  # + anchor_weight x the policy's distance to the reference below anchor_max_timestep
    anchor_max_timestep: int = 0  # the anchor draws its level from [0, anchor_max_timestep)

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def levels(self, n: int, device, low: int = 0, high: Optional[int] = None) -> torch.Tensor:
        """[n] long: training levels in [low, high) drawn by ``weighting_scheme``. diffusers' density ``u`` in [0, 1]
        indexes the scheduler's descending timesteps (u near 0 is the noisiest), as its SD3 training example does."""
        high = self.num_train_timesteps if high is None else high
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=n,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
        )
        index = (u * (high - low)).long().clamp(0, high - low - 1)
        return (high - 1 - index).to(device)

    def pred(self, out: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """A denoiser's output in the space where errors are measured: the velocity itself."""
        return out.float()


# Copied from train_inversion_dpo.ObjectiveOutput
@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # [B], with grad
    margin: Optional[torch.Tensor] = None  # [B], detached; None for sft
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, detached
    # two-pass objectives: ``loss`` carries no grad; each callable recomputes one chunk with grad and returns a [B]
    # surrogate, and back-propagating every chunk in turn accumulates exactly the gradient of ``loss``
    grad_chunks: Optional[List[Callable[[], torch.Tensor]]] = None

    def backward_terms(self) -> List[Callable[[], torch.Tensor]]:
        """What to back-propagate (each ``.mean()``), in order: the chunks, or the loss itself."""
        return self.grad_chunks or [lambda: self.loss]


# Copied from train_inversion_dpo._pair_output
def _pair_output(margin: torch.Tensor, cfg: ObjectiveConfig, **logs) -> ObjectiveOutput:
    loss = preference_loss(margin, cfg.beta, cfg.loss_type)
    return ObjectiveOutput(loss, margin.detach(), {k: v.detach() for k, v in logs.items()})


def diffusion_dpo(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """Flow-DPO, Diffusion-DPO for rectified flow (Wallace et al. 2023, arXiv 2311.12908, in the velocity form of
    VideoAlign, arXiv 2501.13918): one level ``t`` (sigma ``s``) drawn by ``--weighting_scheme`` and one noise ``n``
    shared by winner and loser, ``x_s = (1 - s) z0 + s n``, target velocity ``n - z0``:

    ``margin = (||v_pol^w - (n - z0^w)||^2 - ||v_ref^w - (n - z0^w)||^2) - (same for the loser)``

    ``z0`` is [2B, ...], winners then losers. Cost: 2 policy rows with grad + 2 reference rows per pair.
    """
    B = z0.shape[0] // 2
    s = cfg.sigmas[cfg.levels(B, z0.device)].repeat(2)
    noise = torch.randn_like(z0[:B]).repeat(2, *([1] * (z0.ndim - 1)))
    x = add_noise(z0, noise, s)
    v_pol = policy(x, s, cond)
    with torch.no_grad():
        v_ref = reference(x, s, cond)
    target = noise.float() - z0.float()
    margin = dpo_margin(v_pol[:B], v_ref[:B], target[:B], v_pol[B:], v_ref[B:], target[B:])
    return _pair_output(margin, cfg, sigma=s[:B].mean())


# Copied from train_inversion_dpo.InversionSteps
class InversionSteps(NamedTuple):
    """The reference side of ``inversion_dpo`` for a batch: everything the policy side needs and nothing more. It
    depends only on the frozen reference, so it can be computed once per dataset and cached (section 6).

    Rows stack winners then losers, as everywhere; ``K`` is the number of trajectory steps held for each row (all N,
    the cache's stored subset, or one sampled step per pair), and a pair's two rows always hold the same steps.
    """

    steps: torch.Tensor  # [K, 2B] long: the grid index of each row's step (0 = the step to timesteps[0])
    x: torch.Tensor  # [K, 2B, C, H, W]: the policy's inputs, x_i (x_{i-1} for the reference target)
    target: Optional[torch.Tensor]  # [K, 2B, C, H, W]: tau_i; None for the reference target
    ref_error: Optional[torch.Tensor]  # [K, 2B]: ||tau_i - eps_ref(x_i, t_i)||^2; None for the reference target
    eps_ref: Optional[torch.Tensor]  # [K, 2B, C, H, W]: eps_ref(x_{i-1}, t_i), the reference target's target

    def take(self, index: torch.Tensor) -> "InversionSteps":
        """The steps ``index`` ([K', 2B], positions along K) of every row."""
        rows = torch.arange(index.shape[1], device=index.device)
        return InversionSteps(*(None if v is None else v[index, rows] for v in self))


def invert_pairs(reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig, steps=None, round_to=None):
    """The reference's Euler inversion of each image (with the caption, at the inversion guidance scale) and what the
    policy side needs at the grid ``steps`` ([K, 2B] long, default every step): the inputs, the target velocities and
    the reference's errors. The inversion walks only as far as the highest step asked for.

    The ``x0`` target at level ``s_i``, ``(x_i - z0) / s_i``, is computed as the inversion's velocities averaged over
    the steps below, ``sum_{j <= i} (s_j - s_{j-1}) v_j / s_i`` (the same value, since ``x_i - z0`` is that sum): a
    weighted mean of velocities, bounded at the lowest level (about 0.009 on SD3's grid) where a difference of
    latents divided by ``s`` would amplify their rounding a hundredfold.

    ``round_to``: the dtype a cache stores inputs and targets in. They are rounded before the reference is evaluated
    on them, so that a policy reading them back sees exactly what the reference saw: margin 0 at initialisation.
    """
    grid = cfg.inversion_grid
    N, B2 = len(grid.timesteps), z0.shape[0]
    if steps is None:
        steps = torch.arange(N, device=z0.device)[:, None].expand(N, B2)
    rows = torch.arange(B2, device=z0.device)

    def rounded(v):
        return v if round_to is None else v.to(round_to).float()

    with torch.no_grad():
        # walk only as far as needed: the grid up to the highest step asked for (a sub-grid keeps the same levels)
        top = N if steps.device.type == "meta" else int(steps.max()) + 1  # meta: shapes only, for counting memory
        invert_v = guided(reference, cond, null_cond, cfg.inversion_guidance_scale)
        sub_grid = FlowGrid(grid.timesteps[:top], grid.sigmas[: top + 1])
        trajectory = flow_invert(lambda x, s: invert_v(x, s.expand(B2)), z0, sub_grid)
        latents = torch.stack(trajectory.latents)  # [top, 2B, C, H, W]: x_i
        if cfg.inversion_target in ("reference", "step"):
            inputs = torch.cat([z0[None], latents[:-1]])  # x_{i-1}: the inversion's own inputs
        x = rounded((inputs if cfg.inversion_target == "reference" else latents)[steps, rows])  # [K, 2B, C, H, W]
        s = grid.timesteps[steps]

        # in chunks, as the policy side: one no-grad forward of all K steps would hold K steps' activations
        def reference_rows(c):  # the steps at positions c, their rows flattened step-major as tile_cond repeats cond
            x_c, s_c = x[c].flatten(0, 1), s[c].flatten()
            return cfg.pred(reference(x_c, s_c, tile_cond(cond, len(c))), x_c, s_c)

        chunks = _chunks(list(range(len(steps))), cfg.inversion_chunk_steps or len(steps))
        v_ref = torch.cat([reference_rows(c) for c in chunks]).view_as(x)
        if cfg.inversion_target == "reference":
            return InversionSteps(steps, x, None, None, v_ref)
        velocities = torch.stack(trajectory.velocities).float()  # [top, 2B, C, H, W]: v_i moved x_{i-1} to x_i
        if cfg.inversion_target == "step":
            # the Euler step from x_i with v_i lands exactly on x_{i-1}
            target = velocities[steps, rows]
        elif cfg.inversion_target == "x0":
            gaps = sub_grid.sigmas[1:] - sub_grid.sigmas[:-1]
            shape = (-1,) + (1,) * (velocities.ndim - 1)
            mean_velocity = torch.cumsum(gaps.reshape(shape) * velocities, 0) / sub_grid.sigmas[1:].reshape(shape)
            target = mean_velocity[steps, rows]
        else:
            raise ValueError(f"unknown inversion_target {cfg.inversion_target!r}; expected one of {INVERSION_TARGETS}")
        target = rounded(target)
        ref_error = mse(target.flatten(0, 1), v_ref.flatten(0, 1)).view(steps.shape)
    return InversionSteps(steps, x, target, ref_error, None)


def inversion_dpo(
    policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig, inverted=None
) -> "ObjectiveOutput":
    """Inversion-DPO (Li et al. 2025, arXiv 2507.11554) for rectified flow: the noisy latents are the reference's
    deterministic Euler inversion ``x_1 .. x_N`` of each image (with the caption, at the inversion guidance scale)
    on the model's own N-step grid of shifted sigmas, not random draws.

    ``margin = (1/N) sum_i w_i m_i`` over every step of the trajectory, inside one link (exact, not a sampled
    step), with ``w_i = 1`` ("uniform") or ``s_i^2`` ("x0"), and per-step term ``m_i`` by ``inversion_target``:

    - ``reference`` (the paper's figure): ``||v_pol - v_ref||^2`` of winner minus loser at the inversion's own inputs
      ``(x_{i-1}, s_i)``, both conditional. Zero gradient at initialisation.
    - ``step``: ``dpo_margin`` at ``(x_i, s_i)`` with target ``v_i``, the velocity with which one Euler step from
      ``x_i`` lands exactly on ``x_{i-1}``: "fit the winner's trajectory".
    - ``x0``: ``dpo_margin`` at ``(x_i, s_i)`` with target ``(x_i - z0) / s_i``, the velocity with which one step
      lands on ``z0`` (along an ODE-inverted path it is not ``x_N - z0``: the path is not straight).

    ``inversion_margin = "step"`` samples one step i per pair instead and takes ``margin = w_i m_i``, whose
    expectation is the trajectory margin. The inversion then walks only up to the sampled steps.

    Cost per pair: N (x2 with guidance) reference inversion rows and N reference rows (the reference side, which
    ``invert_pairs`` computes and a cache can hold), then the policy side: see ``inversion_policy``.

    ``inverted``: the reference side read from the cache (``InversionSteps``); then no reference call is made here.
    """
    if inverted is not None:
        return inversion_policy(policy, inverted, cond, cfg)
    steps = None
    if cfg.inversion_margin == "step":
        steps = _one_step_per_pair(len(cfg.inversion_grid.timesteps), z0.shape[0] // 2, z0.device)
    return inversion_policy(policy, invert_pairs(reference, z0, cond, null_cond, cfg, steps), cond, cfg)


# Copied from train_inversion_dpo._one_step_per_pair
def _one_step_per_pair(num_steps: int, B: int, device) -> torch.Tensor:
    """[1, 2B]: one position in 0..num_steps-1 per pair, shared by its winner and loser."""
    return torch.randint(0, num_steps, (1, B), device=device).repeat(1, 2)


# Copied from train_inversion_dpo.inversion_policy with grid.alphas->grid.sigmas
def inversion_policy(policy: Denoiser, ref: InversionSteps, cond, cfg: ObjectiveConfig) -> ObjectiveOutput:
    """The policy side of ``inversion_dpo`` on the reference side ``ref`` (computed now or read from a cache).

    - ``inversion_margin = "step"``: one held step per pair, sampled here (unless only one is held); one policy
      call with grad.
    - ``"trajectory"`` with ``inversion_chunk_steps >= K`` and no ``inversion_grad_steps``: all K held steps in one
      policy call with grad (one pass; activation memory grows with K).
    - otherwise the two-pass scheme of docs/method.md, exact and with activation memory of ``inversion_chunk_steps``
      steps whatever K: pass 1 evaluates every step without grad, giving the margin and the link's slope; the
      returned ``grad_chunks`` recompute steps with grad, a chunk at a time, as ``slope * (1/K) sum w_i m_i``, whose
      gradients add up to the loss's. With ``inversion_grad_steps = k < K`` only k random steps are recomputed,
      scaled K/k: an unbiased gradient (the sum sits inside the link, so sampling steps for the loss itself would be
      biased; sampling them only for d margin is not). Cost: K policy rows without grad, then k (or K) with grad.
    """
    if cfg.inversion_margin == "step" and ref.steps.shape[0] > 1:  # (one held step: already sampled)
        ref = ref.take(_one_step_per_pair(ref.steps.shape[0], ref.steps.shape[1] // 2, ref.steps.device))
    K, B = ref.steps.shape[0], ref.steps.shape[1] // 2
    grid = cfg.inversion_grid
    weights = inversion_step_weights(grid.sigmas[1:], cfg.timestep_weighting)[ref.steps[:, :B]]  # [K, B]

    def weighted_terms(chunk):  # [len(chunk), B]: w_i m_i of the held steps at positions `chunk`, one policy call
        x = ref.x[chunk]
        t = grid.timesteps[ref.steps[chunk]].flatten()
        eps_pol = cfg.pred(policy(x.flatten(0, 1), t, tile_cond(cond, len(chunk))), x.flatten(0, 1), t).view_as(x)
        if ref.eps_ref is not None:
            pw, pl, rw, rl = eps_pol[:, :B], eps_pol[:, B:], ref.eps_ref[chunk, :B], ref.eps_ref[chunk, B:]
            terms = reference_distance_margin(pw.flatten(0, 1), rw.flatten(0, 1), pl.flatten(0, 1), rl.flatten(0, 1))
            terms = terms.view(len(chunk), B)
        else:
            errors = mse(ref.target[chunk].flatten(0, 1), eps_pol.flatten(0, 1)).view(len(chunk), 2 * B)
            errors = errors - ref.ref_error[chunk]
            terms = errors[:, :B] - errors[:, B:]
        return weights[chunk] * terms

    everything = list(range(K))
    chunk_size, k = cfg.inversion_chunk_steps or K, cfg.inversion_grad_steps or K
    if cfg.inversion_margin == "step" or (chunk_size >= K and k >= K):
        return _pair_output(weighted_terms(everything).mean(0), cfg)

    with torch.no_grad():
        margin = torch.cat([weighted_terms(c) for c in _chunks(everything, chunk_size)]).mean(0)
    slope = _link_slope(margin, cfg)
    grad_steps = everything if k >= K else torch.randperm(K).tolist()[:k]

    def grad_chunk(chunk):
        return lambda: slope * weighted_terms(chunk).sum(0) / len(grad_steps)

    grad_chunks = [grad_chunk(c) for c in _chunks(grad_steps, chunk_size)]
    return ObjectiveOutput(preference_loss(margin, cfg.beta, cfg.loss_type), margin, {}, grad_chunks)


# Copied from train_inversion_dpo._chunks
def _chunks(items: list, size: int) -> List[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# Copied from train_inversion_dpo._link_slope
def _link_slope(margin: torch.Tensor, cfg) -> torch.Tensor:
    """d loss / d margin at ``margin``, per pair."""
    with torch.enable_grad():
        m = margin.detach().clone().requires_grad_(True)
        (slope,) = torch.autograd.grad(preference_loss(m, cfg.beta, cfg.loss_type).sum(), m)
    return slope


def inpo(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """DDIM-InPO (Lu et al., CVPR 2025, arXiv 2503.18454) carried to rectified flow: one level ``s`` per pair (drawn
    as Flow-DPO draws it); each image is inverted without grad by the *current policy* (conditional, guidance 1)
    with Euler steps on the coarse grid up to its last level below ``s``, then one step to ``s`` itself; the target
    is the velocity that lands one step on the image, ``(x_s - z0) / s`` (InPO's implied noise, in velocity form,
    computed as the steps' velocities averaged), and the margin is ``dpo_margin`` with it in place of Flow-DPO's
    ``n - z0``. InPO's ``eta`` (DDPM posterior noise after each step) has no flow counterpart and is left out.
    """
    grid = cfg.inpo_grid
    B = z0.shape[0] // 2
    s = cfg.sigmas[cfg.levels(B, z0.device)].repeat(2)

    def velocity(x, label):
        return policy(x, label, cond)

    with torch.no_grad():
        x, s_cur = z0.float(), torch.zeros_like(s)
        moved = torch.zeros_like(x)  # x - z0, as a sum of (gap x velocity)
        for i, label in enumerate(grid.timesteps):
            active = label < s  # [2B]
            if not active.any():
                break
            v = velocity(x, label.expand_as(s))
            gap = (grid.sigmas[i + 1] - s_cur).reshape(-1, *([1] * (x.ndim - 1)))
            keep = active.view(-1, *([1] * (x.ndim - 1)))
            x = torch.where(keep, x + gap * v, x)
            moved = torch.where(keep, moved + gap * v, moved)
            s_cur = torch.where(active, grid.sigmas[i + 1], s_cur)
        v = velocity(x, s)
        gap = (s - s_cur).reshape(-1, *([1] * (x.ndim - 1)))
        x_s, moved = x + gap * v, moved + gap * v
        target = moved / s.reshape(-1, *([1] * (x.ndim - 1)))
        v_ref = reference(x_s, s, cond)
    v_pol = policy(x_s, s, cond)
    margin = dpo_margin(v_pol[:B], v_ref[:B], target[:B], v_pol[B:], v_ref[B:], target[B:])
    return _pair_output(margin, cfg, sigma=s[:B].mean())


def winner_sft_loss(policy: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig) -> torch.Tensor:
    """[B]: the flow-matching loss ``||v_pol(x_s^w, s) - (n - z0^w)||^2`` of the winners (rows ``:B`` of the stacked
    batch), with fresh noise and levels drawn by ``--weighting_scheme`` from ``[sft_min_timestep, T)``; a
    ``sft_caption_dropout`` share of the rows is conditioned on the null caption instead, as text-to-image
    fine-tuning drops captions to keep the unconditional branch that classifier-free guidance subtracts in step."""
    return _winner_losses(policy, [_sft_rows(z0, cond, null_cond, cfg)], cfg)[0]


# Copied from train_inversion_dpo.reference_anchor_loss
def reference_anchor_loss(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """[B]: ``||pred_pol(x_t^w, t) - pred_ref(x_t^w, t)||^2`` on the winners with fresh noise and
    ``t ~ U{0 .. anchor_max_timestep-1}`` (the same ``sft_caption_dropout`` share on the null caption): it holds the
    policy to the reference at the levels below the ones the sft term trains. One LoRA serves every level, so a
    change learnt where the layout is decided also moves the levels that draw the objects' shapes; this keeps them."""
    return _winner_losses(policy, [_anchor_rows(reference, z0, cond, null_cond, cfg)], cfg)[0]


# Copied from train_inversion_dpo._WinnerRows
@dataclass
class _WinnerRows:
    """Noisy winner rows for the policy and what its prediction there is regressed on (no grad)."""

    x: torch.Tensor
    t: torch.Tensor
    cond: object
    target: torch.Tensor


# Copied from train_inversion_dpo._winner_rows
def _winner_rows(z0, cond, null_cond, dropout):
    """The winners' latents and conditioning (rows ``:B``), a ``dropout`` share of the rows on the null caption."""
    B = z0.shape[0] // 2
    z0_w, cond_w = z0[:B], take_cond(cond, slice(0, B))
    if dropout > 0:
        drop = torch.rand(B, device=z0.device) < dropout
        null_w = take_cond(null_cond, slice(0, B))
        cond_w = map_cond_pair(cond_w, null_w, lambda c, n: torch.where(drop.view(-1, *([1] * (c.ndim - 1))), n, c))
    return z0_w, cond_w


def _sft_rows(z0, cond, null_cond, cfg: ObjectiveConfig) -> _WinnerRows:
    z0_w, cond_w = _winner_rows(z0, cond, null_cond, cfg.sft_caption_dropout)
    s = cfg.sigmas[cfg.levels(z0_w.shape[0], z0.device, low=cfg.sft_min_timestep)]
    noise = torch.randn_like(z0_w)
    return _WinnerRows(add_noise(z0_w, noise, s), s, cond_w, noise.float() - z0_w.float())


def _anchor_rows(reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig) -> _WinnerRows:
    z0_w, cond_w = _winner_rows(z0, cond, null_cond, cfg.sft_caption_dropout)
    s = cfg.sigmas[cfg.levels(z0_w.shape[0], z0.device, high=cfg.anchor_max_timestep)]
    x_s = add_noise(z0_w, torch.randn_like(z0_w), s)
    with torch.no_grad():
        ref = cfg.pred(reference(x_s, s, cond_w), x_s, s)
    return _WinnerRows(x_s, s, cond_w, ref)


# Copied from train_inversion_dpo._winner_losses
def _winner_losses(policy: Denoiser, rows: List[_WinnerRows], cfg: ObjectiveConfig) -> List[torch.Tensor]:
    """``mse(target, pred_pol)`` per row, [B] per entry of ``rows``, from one policy call on all of them: the sft
    and anchor rows together cost one batched call instead of two (on the tiny CPU model: 0.79 s a step against
    0.90 s, ``N = 3``, batch 16)."""
    x, t = torch.cat([r.x for r in rows]), torch.cat([r.t for r in rows])
    cond = rows[0].cond
    for r in rows[1:]:
        cond = _cat_cond(cond, r.cond)
    pred = cfg.pred(policy(x, t, cond), x, t)
    errors = mse(torch.cat([r.target for r in rows]), pred)
    return list(errors.split([r.x.shape[0] for r in rows]))


# Copied from train_inversion_dpo.sft
def sft(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """Supervised fine-tuning on the winners only (``winner_sft_loss``), plus ``anchor_weight`` times the reference
    anchor when set: the pair objectives' two terms on the winners (``with_winner_sft``, the sft term at weight 1)
    without a preference term, with the same draws and one policy call."""
    no_preference = lambda: ObjectiveOutput(z0.new_zeros(z0.shape[0] // 2))  # noqa: E731
    return with_winner_sft(no_preference, policy, z0, cond, null_cond, replace(cfg, sft_weight=1.0), reference)


# Copied from train_inversion_dpo.with_winner_sft
def with_winner_sft(
    objective: Callable[[], ObjectiveOutput], policy: Denoiser, z0, cond, null_cond, cfg, reference=None
):
    """A pair objective's output plus ``sft_weight`` times the winners' sft loss (``winner_sft_loss``): a supervised
    anchor on the preferred images, as RPO (Pang et al. 2024) adds the winner's NLL to DPO. The preference term
    moves what the pair's images differ in; the anchor keeps the policy's likelihood of the winners from falling,
    and with fresh noise at high ``t`` it reaches the layout a sample decides from pure noise, which inverted
    latents (that already hold their image's layout) do not train. One more policy call with grad, on B rows.
    In the two-pass scheme the term is one more gradient chunk; its gradient adds to the preference's.

    ``objective()`` computes the preference term. The sft term draws its t and noise first, so that they are the
    same whatever the objective draws (Diffusion-DPO and InPO draw theirs; a run from the cache draws none).

    With ``anchor_weight`` (and ``reference``) it adds ``anchor_weight`` times ``reference_anchor_loss`` too, drawn
    after the sft term: one reference call without grad on B rows, and B more rows in the sft term's policy call."""
    terms = []  # (name, weight, rows), drawn in this order
    if cfg.sft_weight:
        terms.append(("sft", cfg.sft_weight, _sft_rows(z0, cond, null_cond, cfg)))
    if cfg.anchor_weight:
        terms.append(("anchor", cfg.anchor_weight, _anchor_rows(reference, z0, cond, null_cond, cfg)))
    losses = _winner_losses(policy, [rows for _, _, rows in terms], cfg) if terms else []
    out = objective()
    logs = dict(out.logs)
    if out.margin is not None:  # a pair objective: its own loss, logged beside the unweighted sft and anchor terms
        logs["preference_loss"] = out.loss.detach().mean()
    if not terms:
        return replace(out, logs=logs)
    logs.update({name: loss.detach().mean() for (name, _, _), loss in zip(terms, losses)})
    term = sum(weight * loss for (_, weight, _), loss in zip(terms, losses))
    if out.grad_chunks is None:
        return ObjectiveOutput(out.loss + term, out.margin, logs)
    return ObjectiveOutput(out.loss + term.detach(), out.margin, logs, out.grad_chunks + [lambda: term])


# Copied from train_inversion_dpo.OBJECTIVES
OBJECTIVES: Dict[str, Callable[..., ObjectiveOutput]] = {
    "diffusion_dpo": diffusion_dpo,
    "inversion_dpo": inversion_dpo,
    "inpo": inpo,
    "sft": sft,
}


# Copied from train_inversion_dpo.training_loss
def training_loss(objective: str, policy, reference, z0, cond, null_cond, cfg, inverted=None) -> ObjectiveOutput:
    """What a training step back-propagates: ``OBJECTIVES[objective]`` on each pair, plus ``cfg.sft_weight`` times the
    winners' sft loss and ``cfg.anchor_weight`` times the reference anchor (``with_winner_sft``); for ``sft`` those
    winner terms are the objective itself. ``inverted``: inversion_dpo's reference side, read from the cache."""
    if objective == "sft":
        return sft(policy, reference, z0, cond, null_cond, cfg)
    if inverted is not None:
        return with_winner_sft(
            lambda: inversion_dpo(policy, reference, z0, cond, null_cond, cfg, inverted),
            policy, z0, cond, null_cond, cfg, reference,
        )  # fmt: skip
    pair_objective = OBJECTIVES[objective]
    return with_winner_sft(
        lambda: pair_objective(policy, reference, z0, cond, null_cond, cfg),
        policy,
        z0,
        cond,
        null_cond,
        cfg,
        reference,
    )


# ---------------------------------------------------------------------------------------------------------------
# 5. Models. First what is particular to SD3 (train_inversion_dpo.py has its own of each of these), then what the
#    scripts share.


class CaptionTable:
    """caption -> (``[L, D]`` embeddings, ``[P]`` pooled), kept on disk: safetensors shards of ``TEXT_SHARD`` captions
    in a temporary folder (removed with the table), read back a row at a time. At ``--max_sequence_length 77`` a
    caption's bf16 embeddings are 1.3 MB, so a dataset's 20,000 distinct captions would hold 25 GB of RAM."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="sd3-text-embeddings-")
        self.index: Dict[str, Tuple[int, int]] = {}
        self.num_bytes, self._shards, self._pending = 0, 0, []
        self._open: Dict[int, object] = {}

    def add(self, captions: List[str], embeds: torch.Tensor, pooled: torch.Tensor):
        self._pending += list(zip(captions, embeds.cpu(), pooled.cpu()))
        while len(self._pending) >= TEXT_SHARD:
            self._write(self._pending[:TEXT_SHARD])
            self._pending = self._pending[TEXT_SHARD:]

    def close(self):
        """Writes what is pending: the table is complete."""
        if self._pending:
            self._write(self._pending)
            self._pending = []

    def _write(self, rows):
        tensors = {"embeds": torch.stack([e for _, e, _ in rows]), "pooled": torch.stack([p for _, _, p in rows])}
        save_file(tensors, self._path(self._shards))
        for row, (caption, _, _) in enumerate(rows):
            self.index[caption] = (self._shards, row)
        self.num_bytes += sum(v.nbytes for v in tensors.values())
        self._shards += 1

    def _path(self, shard: int) -> str:
        return os.path.join(self._folder.name, f"shard-{shard:05d}.safetensors")

    def __contains__(self, caption: str) -> bool:
        return caption in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, caption: str) -> Tuple[torch.Tensor, torch.Tensor]:
        shard, row = self.index[caption]
        if shard not in self._open:
            self._open[shard] = safe_open(self._path(shard), framework="pt")
        handle = self._open[shard]
        return handle.get_slice("embeds")[row], handle.get_slice("pooled")[row]


class TextEncoders(NamedTuple):
    """SD3's text side, as ``StableDiffusion3Pipeline.encode_prompt`` computes it: CLIP-L and CLIP-G (penultimate
    hidden states side by side, zero-padded to T5's width, and their pooled projections side by side) and T5-XXL
    (last hidden states; zeros without it), the caption tokens first. The embeddings of every caption the run needs
    are computed once, before training, and kept on disk (``CaptionTable``); the encoders are then let go: T5-XXL
    alone is 4.7 B parameters, more than SD3.5-medium's transformer."""

    tokenizers: list  # CLIP-L, CLIP-G, T5 (None without it)
    encoders: list  # the encoders still loaded (none once the table is complete)
    table: CaptionTable
    max_sequence_length: int
    device: torch.device  # where looked-up embeddings go

    def lookup(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise KeyError(f"caption {missing[0]!r} was not encoded before training")
        rows = [self.table.get(p) for p in prompts]
        embeds = torch.stack([e for e, _ in rows]).to(self.device)
        pooled = torch.stack([p for _, p in rows]).to(self.device)
        return embeds, pooled


def dataset_captions(pairs) -> List[str]:
    """The distinct captions of the checked pairs, in order."""
    column = pairs.columns.caption
    return list(dict.fromkeys(parse_caption(row[column]) for row in pairs.dataset.select_columns([column])))


def load_text_encoders(pairs, transformer, args, device, weight_dtype) -> TextEncoders:
    """Loads the three text encoders, embeds every caption of ``pairs``, the validation prompts, the empty prompt (the
    null conditioning) and the cache's probe once, then releases the encoders (``TextEncoders``). Meanwhile the
    transformer waits on the CPU: the encoders and the transformer are never on the device together (SD3.5-large's
    transformer and T5-XXL are 16 and 9.5 GB in bf16)."""
    model, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    transformer.to("cpu")
    tokenizers = [load_component(CLIPTokenizer, model, f, revision=revision) for f in ("tokenizer", "tokenizer_2")]
    encoders = [
        load_component(CLIPTextModelWithProjection, model, f, revision=revision, variant=variant)
        for f in ("text_encoder", "text_encoder_2")
    ]
    # T5's width: the caption tokens are padded to it, and it is the zeros' width without T5 (as in the pipeline)
    t5_width = load_config_of(SD3Transformer2DModel, model, "transformer", revision)["joint_attention_dim"]
    if args.no_t5:
        tokenizers.append(None)
    else:
        tokenizers.append(load_component(T5TokenizerFast, model, "tokenizer_3", revision=revision))
        encoders.append(load_component(T5EncoderModel, model, "text_encoder_3", revision=revision, variant=variant))
    for encoder in encoders:
        encoder.requires_grad_(False)
        encoder.to(dtype=weight_dtype)
        if args.sequential_offload_t5 and isinstance(encoder, T5EncoderModel):
            # the weights stay in CPU memory; hooks bring each layer to the device for its own forward only
            cpu_offload(encoder, execution_device=torch.device(device))
        else:
            encoder.to(device)
    captions = [""] + (args.validation_prompts or []) + probe_batch(args.resolution)["captions"]
    captions = list(dict.fromkeys(captions + dataset_captions(pairs)))
    table = CaptionTable()
    with torch.no_grad():
        for start in range(0, len(captions), TEXT_BATCH):
            chunk = captions[start : start + TEXT_BATCH]
            table.add(chunk, *encode_prompt(chunk, tokenizers, encoders, args.max_sequence_length, t5_width))
    table.close()
    logger.info(
        f"text embeddings: {plural(len(table), 'caption')}, {_size(table.num_bytes)} on disk; encoders released"
    )
    encoders.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    transformer.to(device)
    return TextEncoders(tokenizers, encoders, table, args.max_sequence_length, torch.device(device))


TEXT_BATCH = 16  # captions per text-encoder call while the table is built
TEXT_SHARD = 256  # captions per file of the table


def load_config_of(cls, model, subfolder, revision=None) -> dict:
    """A component's config without its weights, with ``load_component``'s one-line error."""
    try:
        return cls.load_config(model, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(model) else "Hub id (offline, or no such repository?)"
        raise DataError(f"could not load '{subfolder}' of model '{model}' as a {where}: {first_line(e)}") from None


def encode_prompt(prompts: List[str], tokenizers, text_encoders, max_sequence_length: int, t5_width: int):
    """As ``StableDiffusion3Pipeline.encode_prompt`` (no clip skip): ``([B, 77 + L, D], [B, P])``, the CLIP
    penultimate states side by side and zero-padded to ``t5_width``, then T5's ``max_sequence_length`` states (as
    many zero rows without T5, as the pipeline); the two pooled projections side by side."""
    states, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], text_encoders[:2]):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(states, dim=-1)
    clip = F.pad(clip, (0, t5_width - clip.shape[-1]))
    if tokenizers[2] is None:
        t5 = clip.new_zeros(len(prompts), max_sequence_length, t5_width)
    else:
        ids = tokenizers[2](prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
        # CLIP's device, not T5's: an offloaded T5's parameters sit on the meta device between its calls
        t5 = text_encoders[2](ids.to(clip.device))[0].to(clip.dtype)
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def pair_conditioning(batch, text: TextEncoders, resolution: int):
    """``(cond, null_cond)``: the transformer's conditioning keyword arguments for 2B rows, the B winners then their B
    losers (a pair's two images share their caption), read from the table of caption embeddings."""
    embeds, pooled = text.lookup(batch["captions"])
    cond = {"encoder_hidden_states": torch.cat([embeds, embeds]), "pooled_projections": torch.cat([pooled, pooled])}
    return cond, null_conditioning(cond, text)


def null_conditioning(cond, text: TextEncoders):
    """The null conditioning of ``cond``'s rows, the empty prompt's embeddings (runs from the cache need it too)."""
    embeds, pooled = text.table.get("")
    device = cond["encoder_hidden_states"].device
    return {
        "encoder_hidden_states": embeds.to(device)[None].expand_as(cond["encoder_hidden_states"]),
        "pooled_projections": pooled.to(device)[None].expand_as(cond["pooled_projections"]),
    }


def make_pipeline(text: TextEncoders, vae, transformer, noise_scheduler):
    """A pipeline around the training transformer for validation samples; it reads prompt embeddings from the table
    (``run_validation``), so it holds no text encoder."""
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipeline.text_table = text
    return pipeline


# 5b. Shared by both scripts


# Copied from train_inversion_dpo.load_component
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


# Copied from train_inversion_dpo.weight_dtype_of
def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_diffusion_models(args, device, weight_dtype):
    """The flow-matching scheduler, the VAE and the MMDiT transformer of the model, frozen and on ``device``. The
    transformer and a fp16-safe VAE hold ``weight_dtype``; a VAE whose config asks for ``force_upcast`` stays fp32.
    Weights load from safetensors only (``load_component``)."""
    model, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    noise_scheduler = load_component(FlowMatchEulerDiscreteScheduler, model, "scheduler", revision=revision)
    if args.pretrained_vae_model_name_or_path:
        vae = load_component(AutoencoderKL, args.pretrained_vae_model_name_or_path, None)
    else:
        vae = load_component(AutoencoderKL, model, "vae", revision=revision, variant=variant)
    transformer = load_component(SD3Transformer2DModel, model, "transformer", revision=revision, variant=variant)
    # the transformer's position embedding is cropped from a pos_embed_max_size square: larger latents fail mid-step
    pixels_per_patch = 2 ** (len(vae.config.block_out_channels) - 1) * transformer.config.patch_size
    most = transformer.config.pos_embed_max_size
    if most and args.resolution // pixels_per_patch > most:
        raise InputError(
            f"--resolution {args.resolution} is {args.resolution // pixels_per_patch} patches a side, more than the "
            f"transformer's pos_embed_max_size {most}: at most {most * pixels_per_patch} px for this model"
        )
    for frozen in (vae, transformer):
        frozen.requires_grad_(False)
    vae.to(device, dtype=torch.float32 if vae.config.force_upcast else weight_dtype)
    transformer.to(device, dtype=weight_dtype)
    return noise_scheduler, vae, transformer


# Copied from train_inversion_dpo.lora_targets
def lora_targets(args) -> List[str]:
    return [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]


# Copied from train_inversion_dpo.add_lora with unet->transformer
def add_lora(transformer, args, weight_dtype):
    """Adds the LoRA adapter ("default", alpha = rank) on ``--lora_target_modules``; its weights stay fp32 whatever
    the frozen weights' dtype (Adam's updates of fp16 weights underflow)."""
    transformer.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=lora_targets(args))
    )
    if weight_dtype != torch.float32:
        cast_training_params(transformer, dtype=torch.float32)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if not torch.cuda.is_available():
            raise InputError("--enable_xformers_memory_efficient_attention needs a CUDA GPU")
        transformer.enable_xformers_memory_efficient_attention()


# Copied from train_inversion_dpo.make_optimizer
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


# Copied from train_inversion_dpo.encode_latents
def encode_latents(vae, pixel_values):
    """Deterministic latents (the distribution's mean, docs/method.md) of [B, 2, 3, R, R] pairs, as [2B, C, h, w]:
    winners then losers. Contiguous: the mean is a channel slice of the encoder's moments, and ``randn_like`` on a
    strided tensor draws in memory order, so the objectives' noise would otherwise differ from a cached run's."""
    images = torch.cat([pixel_values[:, 0], pixel_values[:, 1]]).to(vae.device, dtype=vae.dtype)
    # At most a megapixel a call: the encoder's activations for one 1024 px image in fp32 are ~2.5 GiB, the largest
    # item of a checkpointed LoRA step at that size (benchmarks/memory_at_scale*.py); small images still go together.
    per_call = max(1, 1024 * 1024 // (images.shape[-2] * images.shape[-1]))
    latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(per_call)])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float().contiguous()


def objective_config(args, noise_scheduler, device) -> ObjectiveConfig:
    def grid(n):
        found = flow_grid(FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config), n, "cpu", mu=mu)
        if not bool((found.timesteps > 0).all()):  # the x0 target divides by each level's sigma
            raise InputError(f"the model's {n}-step grid has a level at sigma 0 above the clean one")
        return FlowGrid(*(v.to(device) for v in found))

    mu = None
    if noise_scheduler.config.get("use_dynamic_shifting"):
        raise InputError("the model's scheduler shifts its sigmas by image size (use_dynamic_shifting), which SD3 "
                         "and SD3.5 do not: this trainer reads a fixed shift")  # fmt: skip
    T = noise_scheduler.config.num_train_timesteps
    if args.sft_min_timestep >= T:
        raise InputError(f"--sft_min_timestep must be below the model's {T} levels, got {args.sft_min_timestep}")
    if args.anchor_max_timestep > T:
        raise InputError(
            f"--anchor_max_timestep must be at most the model's {T} levels, got {args.anchor_max_timestep}"
        )
    # the training levels' sigmas, ascending: the scheduler holds them descending, shifted, before any set_timesteps
    sigmas = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config).sigmas.flip(0)
    return ObjectiveConfig(
        sigmas=sigmas.to(device, torch.float32),
        beta=args.beta_dpo,
        loss_type=args.loss_type,
        inversion_grid=grid(args.inversion_steps) if args.objective == "inversion_dpo" else None,
        inversion_guidance_scale=args.inversion_guidance_scale,
        inversion_target=args.inversion_target,
        inversion_grad_steps=args.inversion_grad_steps,
        inversion_chunk_steps=args.inversion_chunk_steps,
        inversion_margin=args.inversion_margin,
        timestep_weighting=args.timestep_weighting,
        inpo_grid=grid(args.inpo_inversion_steps) if args.objective == "inpo" else None,
        weighting_scheme=args.weighting_scheme,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
        sft_weight=args.sft_weight,
        sft_min_timestep=args.sft_min_timestep,
        sft_caption_dropout=args.sft_caption_dropout,
        anchor_weight=args.anchor_weight,
        anchor_max_timestep=args.anchor_max_timestep,
    )


# Copied from train_inversion_dpo.UNetCounter with UNet->Transformer
class TransformerCounter:
    """Rows (samples) the Transformer was run on, with and without grad: the compute an objective spends."""

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


def make_denoisers(
    accelerator, transformer, weight_dtype, noise_scheduler, counter: Optional[TransformerCounter] = None
):
    """``policy`` runs the prepared (possibly DDP-wrapped) transformer with the adapter on; ``reference`` the same
    weights with the adapter off: no second copy of the transformer is ever held. ``counter`` counts their rows.

    Both take each row's sigma ``s`` and return the velocity (float32); the transformer is called with timestep
    ``s`` times the scheduler's ``num_train_timesteps``, as the pipeline calls it."""
    base = accelerator.unwrap_model(transformer)
    counter = counter or TransformerCounter()
    scale = float(noise_scheduler.config.num_train_timesteps)

    def call(model, x, s, cond):
        return model(hidden_states=x.to(weight_dtype), timestep=s * scale, **cond, return_dict=False)[0].float()

    def policy(x, s, cond):
        counter.add(x)
        return call(transformer, x, s, cond)

    def reference(x, s, cond):
        counter.add(x)
        base.disable_adapters()
        try:
            return call(base, x, s, cond)
        finally:
            base.enable_adapters()

    return policy, reference


# ---------------------------------------------------------------------------------------------------------------
# 6. The reference-side cache (--inversion_cache DIR)
#
# The reference side of ``inversion_dpo``, computed once per dataset and stored (``--inversion_cache DIR``).
#
# Everything the policy needs from the frozen reference (docs/method.md, "Costs") depends only on the reference and the
# data: the trajectory inputs ``x_i``, the targets ``tau_i`` and the reference's errors ``||tau_i - eps_ref||^2`` (the
# reference target stores ``eps_ref`` itself), and the UNet's conditioning. With them stored, a training step runs
# the policy alone: no VAE encode, no text encoder, no inversion, no reference pass.
#
# Layout: ``DIR/<key hash>/cache.json`` holds the key (model, data, inversion settings) in full, and
# ``shard-NNNNN.safetensors`` the pairs ``[s * shard_size, (s + 1) * shard_size)``. Each process of an ``accelerate
# launch`` builds the shards ``s % num_processes == process_index`` that are missing and writes each to a temporary
# file renamed when complete, so an interrupted build resumes where it stopped, and shards do not depend on the number
# of processes that wrote them. A different key is a different folder; ``DIR`` pointing at one cache folder whose key
# differs from the run's is a one-line error naming the first field that differs.
#
# What is stored, per pair, flip and image (winner, loser), for the K stored steps:
#
# - ``x`` and ``target`` in float16 (``--inversion_cache_dtype``); the reference is evaluated on the rounded values,
#   so a policy reading them back sees exactly what the reference saw (margin 0 at initialisation, as without the
#   cache). Later margins move by the rounding (about 1e-6 on the tiny test model, a logit change of 2.5e-3 at
#   beta 5000); float32 storage matches an uncached run to float precision at twice the disk;
# - ``ref_error`` in float32 (one number per step), or for the reference target ``eps_ref`` in float32: a rounded
#   target would give its zero-gradient-at-initialisation objective a gradient of pure rounding noise;
# - the conditioning in float32, once where it is shared (SD 1.x: one caption embedding per pair for both images and
#   flips; SDXL's time ids differ by image and flip).
#
# Augmentation: flips are kept. With ``--random_flip`` both flips of every pair are stored (twice the disk and build
# time; without it, only the unflipped images), and a run picks one by the same (seed, epoch, row) draw as an uncached
# run, so the two see the same data. Random crops cannot be enumerated: ``--random_crop`` with a cache
# is an error.


# Copied from train_inversion_dpo.CACHE_FORMAT
CACHE_FORMAT = 3  # 2: one tensor per pair in a shard; 3: with each image's clean latent z0


# Copied from train_inversion_dpo.STORAGE_DTYPES
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# Copied from train_inversion_dpo.KEY_FILE
KEY_FILE = "cache.json"


# Copied from train_inversion_dpo.CacheError
class CacheError(DataError):
    """A cache that cannot serve this run; the message is one line naming what differs."""


# Copied from train_inversion_dpo.stored_step_indices
def stored_step_indices(num_steps: int, num_stored: Optional[int]) -> List[int]:
    """``num_stored`` of the grid's ``num_steps`` steps, evenly spaced (the middle of K equal runs); all by default."""
    if num_stored is None or num_stored >= num_steps:
        return list(range(num_steps))
    return [int((j + 0.5) * num_steps / num_stored) for j in range(num_stored)]


# Copied from train_inversion_dpo.module_fingerprint with UNet->Transformer
def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's frozen weights: every tensor's name, shape and dtype, and the bytes of up to 4096 evenly
    strided elements of it (any fine-tune changes those). LoRA weights are left out and peft's ``base_layer`` names
    read as the plain ones, so the same Transformer hashes the same with and without an adapter."""
    h = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for name in sorted(tensors):
        if "lora_" in name:
            continue
        flat = tensors[name].detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 4096), device=flat.device).long()
        sample = flat[index].cpu().contiguous()
        h.update(f"{name.replace('.base_layer', '')}|{tuple(flat.shape)}|{flat.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# Copied from train_inversion_dpo.probe_batch
def probe_batch(resolution: int) -> dict:
    """One caption and an image size: what ``pair_conditioning`` needs to show which text encoders it runs."""
    return {
        "captions": ["a probe of the text encoders"],
        "original_sizes": torch.full((1, 2, 2), resolution),
        "crop_top_lefts": torch.zeros(1, 2, 2, dtype=torch.long),
    }


# Copied from train_inversion_dpo.tensors_fingerprint
def tensors_fingerprint(tensors) -> str:
    """Hash of tensor values rounded to 4 significant digits (stable across kernels and devices)."""
    h = hashlib.sha256()
    for v in tensors:
        h.update(f"{tuple(v.shape)}".encode())
        h.update(" ".join(f"{x:.3e}" for x in v.detach().float().reshape(-1)[:4096].tolist()).encode())
    return h.hexdigest()[:16]


# Copied from train_inversion_dpo._name
def _name(path_or_id: Optional[str]) -> Optional[str]:
    return os.path.abspath(path_or_id) if path_or_id and os.path.exists(path_or_id) else path_or_id


def cache_key(
    args, transformer, vae, pairs, cfg: ObjectiveConfig, conditioning_fingerprint: str, weight_dtype
) -> dict:
    """Everything the stored values depend on, and nothing the policy side alone uses (beta, links, chunks...)."""
    grid = cfg.inversion_grid
    return {
        "format": CACHE_FORMAT,
        "model": {
            "name": _name(args.pretrained_model_name_or_path),
            "revision": args.revision,
            "variant": args.variant,
            "vae": _name(args.pretrained_vae_model_name_or_path),
            "transformer_weights": module_fingerprint(transformer),
            "vae_weights": module_fingerprint(vae),
            "conditioning": conditioning_fingerprint,
            "weights_dtype": str(weight_dtype),
        },
        "data": {
            "name": _name(args.dataset_name),
            "config": args.dataset_config_name,
            "split": args.dataset_split_name,
            "columns": [args.image_column_0, args.image_column_1, args.label_column, args.caption_column],
            "fingerprint": getattr(pairs.dataset, "_fingerprint", None),
            "pairs": len(pairs),
            "resolution": args.resolution,
            "flips": [False, True] if pairs.hflip else [False],
        },
        "inversion": {
            "steps": len(grid.timesteps),
            "guidance_scale": cfg.inversion_guidance_scale,
            "target": cfg.inversion_target,
            "sigmas": tensors_fingerprint([grid.sigmas]),
            "stored_steps": stored_step_indices(len(grid.timesteps), args.cache_steps),
        },
        "storage": args.inversion_cache_dtype,
    }


# Copied from train_inversion_dpo.key_hash
def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# Copied from train_inversion_dpo.first_difference
def first_difference(found: dict, expected: dict, prefix: str = "") -> Optional[str]:
    """``"inversion.steps: the cache has 10, this run 20"`` for the first differing field in the key's own order (the
    settings a user chose come before what follows from them), or None."""
    for name in list(expected) + [n for n in found if n not in expected]:
        a, b = found.get(name), expected.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = first_difference(a, b, f"{prefix}{name}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{name}: the cache has {json.dumps(a)}, this run {json.dumps(b)}"
    return None


# Copied from train_inversion_dpo.InversionCache
class InversionCache:
    def __init__(self, folder: str, key: dict, shard_size: int):
        self.folder, self.key, self.shard_size = folder, key, shard_size
        self.hash = key_hash(key)
        self.num_pairs = key["data"]["pairs"]
        self.flips = key["data"]["flips"]
        self.steps = key["inversion"]["stored_steps"]
        self.dtype = STORAGE_DTYPES[key["storage"]]

    @classmethod
    def locate(cls, root: str, key: dict, shard_size: int) -> "InversionCache":
        """``root/<key hash>``, or ``root`` itself when it is one cache's folder (then its key must be this run's)."""
        own = os.path.join(root, KEY_FILE)
        if os.path.exists(own):
            return cls._checked(root, key, own)
        folder = os.path.join(root, key_hash(key))
        path = os.path.join(folder, KEY_FILE)
        if os.path.exists(path):
            return cls._checked(folder, key, path)
        return cls(folder, key, shard_size)

    @classmethod
    def _checked(cls, folder, key, path) -> "InversionCache":
        with open(path) as f:
            found = json.load(f)
        diff = first_difference(found["key"], key)
        if diff:
            raise CacheError(f"inversion cache '{folder}' was built for other settings ({diff}); pass its parent folder "
                             "to build one for this run next to it")  # fmt: skip
        return cls(folder, key, found["shard_size"])

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_pairs / self.shard_size)

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.folder, f"shard-{shard:05d}.safetensors")

    def missing_shards(self) -> List[int]:
        return [s for s in range(self.num_shards) if not os.path.exists(self.shard_path(s))]

    def write_key(self):
        os.makedirs(self.folder, exist_ok=True)
        _atomic_write(os.path.join(self.folder, KEY_FILE), lambda tmp: _dump_json(tmp, self.meta()))

    def meta(self) -> dict:
        return {"key": self.key, "hash": self.hash, "shard_size": self.shard_size}

    def bytes_per_pair(self, latent_shape, cond_numel: int) -> int:
        """At most: the conditioning counted for every flip and image, as if nothing were shared."""
        size = self.dtype.itemsize
        if self.key["inversion"]["target"] == "reference":  # x, and eps_ref in float32
            per_step = math.prod(latent_shape) * (size + 4)
        else:  # x and target, and ref_error one float32
            per_step = math.prod(latent_shape) * 2 * size + 4
        return len(self.flips) * 2 * (len(self.steps) * per_step + math.prod(latent_shape) * size + 4 * cond_numel)


# Copied from train_inversion_dpo._size
def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


# Copied from train_inversion_dpo._dump_json
def _dump_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)


# Copied from train_inversion_dpo._atomic_write
def _atomic_write(path: str, write, suffix: str = ""):
    """Writes through a temporary file renamed into place: a reader never sees half a file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{suffix}")
    write(tmp)
    os.replace(tmp, path)


# Copied from train_inversion_dpo.flatten_cond with UNet->Transformer
def flatten_cond(cond, prefix="cond.") -> Dict[str, torch.Tensor]:
    """``{"cond.encoder_hidden_states": ..., "cond.added_cond_kwargs.time_ids": ...}`` from the Transformer's kwargs."""
    flat = {}
    for name, value in cond.items():
        if isinstance(value, dict):
            flat.update(flatten_cond(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


# Copied from train_inversion_dpo.unflatten_cond
def unflatten_cond(flat: Dict[str, torch.Tensor]) -> dict:
    cond = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")[1:]
        node = cond
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cond


# Copied from train_inversion_dpo._pair_major
def _pair_major(v: torch.Tensor, B: int) -> torch.Tensor:
    """[K, 2B, ...] (steps, winners then losers) -> [B, 2, K, ...]."""
    return v.reshape(v.shape[0], 2, B, *v.shape[2:]).transpose(0, 2).contiguous()


# Copied from train_inversion_dpo._shared
def _shared(v: torch.Tensor) -> torch.Tensor:
    """[S, F, 2, ...] -> the same with the flip and/or image dim cut to 1 where every copy is equal."""
    for dim in (1, 2):
        if all(torch.equal(v.select(dim, 0), v.select(dim, j)) for j in range(1, v.shape[dim])):
            v = v.narrow(dim, 0, 1)
    return v.contiguous()


# Copied from train_inversion_dpo.per_pair
def per_pair(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``{"x.3": [F, 2, ...], ...}``: one tensor per pair, so that reading a pair reads that pair alone (safetensors
    materialises a whole tensor to slice it)."""
    return {f"{name}.{j}": v[j].clone() for name, v in tensors.items() for j in range(v.shape[0])}


# Copied from train_inversion_dpo.build_shard
@torch.no_grad()
def build_shard(cache: InversionCache, shard: int, pairs, encode, reference, cfg, batch_size: int, autocast):
    """Inverts the shard's pairs (every stored flip) and writes them; ``encode(batch) -> (z0, cond, null_cond)``."""
    first, last = shard * cache.shard_size, min((shard + 1) * cache.shard_size, cache.num_pairs)
    per_flip = []
    for flip in cache.flips:
        parts = []
        for start in range(first, last, batch_size):
            rows = range(start, min(start + batch_size, last))
            z0, cond, null_cond = encode(collate_pairs([pairs.load(i, flip) for i in rows]))
            B = len(rows)
            steps = torch.tensor(cache.steps, device=z0.device)[:, None].expand(-1, 2 * B)
            with autocast():
                inv = invert_pairs(reference, z0, cond, null_cond, cfg, steps, round_to=cache.dtype)
            part = {
                "x": _pair_major(inv.x, B).to(cache.dtype),
                "z0": z0.reshape(2, B, *z0.shape[1:]).transpose(0, 1).to(cache.dtype),  # for --sft_weight
                **{f: _pair_major(getattr(inv, f), B).float() for f in ("ref_error", "eps_ref") if getattr(inv, f) is not None},
                **{k: v.reshape(2, B, *v.shape[1:]).transpose(0, 1).float() for k, v in flatten_cond(cond).items()},
            }  # fmt: skip
            if inv.target is not None:
                part["target"] = _pair_major(inv.target, B).to(cache.dtype)
            parts.append({k: v.cpu() for k, v in part.items()})
        per_flip.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    tensors = {k: torch.stack([f[k] for f in per_flip], dim=1) for k in per_flip[0]}  # [S, F, 2, ...]
    tensors.update({k: _shared(v) for k, v in tensors.items() if k.startswith("cond.")})
    tensors = per_pair(tensors)
    metadata = {"hash": cache.hash, "first_pair": str(first), "num_pairs": str(last - first)}
    _atomic_write(cache.shard_path(shard), lambda tmp: save_file(tensors, tmp, metadata), suffix=f"-{os.getpid()}")


# Copied from train_inversion_dpo.build_inversion_cache
def build_inversion_cache(
    cache: InversionCache, accelerator, pairs, encode, reference, cfg, batch_size: int, bytes_per_pair: int
):
    """Builds this process's missing shards (``s % num_processes == process_index``); every process returns once all
    shards exist."""
    missing = cache.missing_shards()
    if accelerator.is_main_process:
        if not os.path.exists(os.path.join(cache.folder, KEY_FILE)):
            cache.write_key()
        total = bytes_per_pair * cache.num_pairs
        logger.info(
            f"inversion cache {cache.folder}: {plural(cache.num_pairs, 'pair')} x {plural(len(cache.flips), 'flip')} "
            f"x {plural(len(cache.steps), 'step')}, {_size(total)} at most on disk; "
            + (f"building {len(missing)} of {plural(cache.num_shards, 'shard')}" if missing else "complete, reused")
        )
    accelerator.wait_for_everyone()
    mine = [s for s in missing if s % accelerator.num_processes == accelerator.process_index]
    for i, shard in enumerate(mine):
        build_shard(cache, shard, pairs, encode, reference, cfg, batch_size, accelerator.autocast)
        logger.info(f"inversion cache: shard {shard} written ({i + 1}/{len(mine)} of this process)")
    accelerator.wait_for_everyone()
    still_missing = cache.missing_shards()
    if still_missing:
        raise CacheError(f"inversion cache '{cache.folder}': shard {still_missing[0]} is missing after the build")


# Copied from train_inversion_dpo.CachedPairs
class CachedPairs(torch.utils.data.Dataset):
    """The cached reference side of each pair, with the flip an uncached run would draw for it this epoch. Items
    hold ``[2, K, ...]`` tensors (winner, loser) and the conditioning; ``collate_cached`` batches them."""

    def __init__(self, cache: InversionCache, pairs):
        self.cache, self.pairs = cache, pairs
        self._open = (None, None)

    @property
    def epoch(self):
        return self.pairs.epoch

    @epoch.setter
    def epoch(self, value):
        self.pairs.epoch = value

    def __len__(self):
        return self.cache.num_pairs

    def _handle(self, shard: int):
        path = self.cache.shard_path(shard)
        if self._open[0] != path:
            handle = safe_open(path, framework="pt")
            if handle.metadata().get("hash") != self.cache.hash:
                raise CacheError(f"inversion cache shard '{path}' belongs to another cache (hash "
                                 f"{handle.metadata().get('hash')}, expected {self.cache.hash})")  # fmt: skip
            self._open = (path, handle)
        return self._open[1]

    def __getitem__(self, index):
        flip = self.pairs.draw_flip(self.pairs.augmentation_rng(index))
        shard, row = divmod(index, self.cache.shard_size)
        handle = self._handle(shard)
        f = self.cache.flips.index(flip)
        item = {"cond": {}}
        suffix = f".{row}"
        for key in handle.keys():
            if not key.endswith(suffix):
                continue
            name, value = key[: -len(suffix)], handle.get_tensor(key)  # [F, 2, ...], or 1 where shared
            value = value[min(f, value.shape[0] - 1)]
            value = value.expand(2, *value.shape[1:])
            if name.startswith("cond."):
                item["cond"][name] = value
            else:
                item[name] = value
        return item


# Copied from train_inversion_dpo.collate_cached
def collate_cached(items) -> dict:
    batch = {k: torch.stack([i[k] for i in items]) for k in items[0] if k != "cond"}  # [B, 2, K, ...]
    batch["cond"] = {k: torch.stack([i["cond"][k] for i in items]) for k in items[0]["cond"]}  # [B, 2, ...]
    return batch


# Copied from train_inversion_dpo.cached_inversion_steps
def cached_inversion_steps(batch: dict, stored_steps: List[int]):
    """A collated batch as ``(InversionSteps, cond, z0)``: rows winners then losers, as an uncached batch."""

    def rows(v):  # [B, 2, ...] -> [2B, ...]
        return torch.cat([v[:, 0], v[:, 1]])

    def steps_first(v):  # [B, 2, K, ...] -> [K, 2B, ...]
        return rows(v).transpose(0, 1).float().contiguous()

    x = steps_first(batch["x"])
    steps = torch.tensor(stored_steps, device=x.device)[:, None].expand(-1, x.shape[1])
    fields = {f: steps_first(batch[f]) if f in batch else None for f in ("target", "ref_error", "eps_ref")}
    cond = unflatten_cond({k: rows(v) for k, v in batch["cond"].items()})
    return InversionSteps(steps, x, **fields), cond, rows(batch["z0"]).float()


# Copied from train_inversion_dpo.prepare_inversion_cache with unet->transformer
def prepare_inversion_cache(args, accelerator, pairs, cfg, reference, transformer, vae, text):
    """Finds (or builds, sharded over the processes) the cache of this run's key; returns the cached dataset."""
    with torch.no_grad():
        probe, _ = pair_conditioning(probe_batch(args.resolution), text, args.resolution)
    probe = flatten_cond(probe)
    fingerprint = tensors_fingerprint(probe.values())
    key = cache_key(args, transformer, vae, pairs, cfg, fingerprint, weight_dtype_of(accelerator))
    cache = InversionCache.locate(args.inversion_cache, key, args.inversion_cache_shard_size)
    size = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, size, size)
    bytes_per_pair = cache.bytes_per_pair(latent_shape, sum(v[0].numel() for v in probe.values()))

    def encode(batch):
        return encode_latents(vae, batch["pixel_values"]), *pair_conditioning(batch, text, args.resolution)

    build_inversion_cache(cache, accelerator, pairs, encode, reference, cfg, args.train_batch_size, bytes_per_pair)
    return CachedPairs(cache, pairs)


# ---------------------------------------------------------------------------------------------------------------
# 7. Checkpoints
#
# Training state on disk without pickles: tensors in safetensors files, everything else in JSON.
#
# accelerate's ``save_state`` pickles the optimizer, the scheduler and the random states (``optimizer.bin``,
# ``random_states_0.pkl``), and loading a pickle runs whatever code it names. A checkpoint here is instead:
#
#     pytorch_lora_weights.safetensors   the adapter (diffusers LoRA format, written by the trainer)
#     optimizer.safetensors              the optimizer's tensors; its structure in the file's metadata
#     random_states_<process>.safetensors  torch's CPU and CUDA generator states; Python's and numpy's in metadata
#     training_state.json                step, the learning-rate scheduler, the gradient scaler
#
# A state dict is stored as a tree (dicts with int or str keys, lists, tuples, numbers, strings, None) whose tensor
# leaves live in the safetensors file under their path, so that it comes back with the same keys and types.


# Copied from train_inversion_dpo.OPTIMIZER_FILE
OPTIMIZER_FILE = "optimizer.safetensors"


# Copied from train_inversion_dpo.TRAINING_STATE_FILE
TRAINING_STATE_FILE = "training_state.json"


# Copied from train_inversion_dpo.LORA_FILE
LORA_FILE = "pytorch_lora_weights.safetensors"


# what else a run writes into --output_dir: the card, and in --logging_dir its metrics, its skipped rows and the
# trackers' project folder (tensorboard's events); SAMPLES_DIR, GRID_FILE and VALIDATION_DIR hold images (section 8)
# Copied from train_inversion_dpo.CARD_FILE
CARD_FILE = "README.md"


# Copied from train_inversion_dpo.METRICS_FILE
METRICS_FILE = "metrics.jsonl"


# Copied from train_inversion_dpo.BAD_ROWS_FILE
BAD_ROWS_FILE = "bad_rows.jsonl"


# Copied from train_inversion_dpo.TRACKER_PROJECT
TRACKER_PROJECT = "inversion-dpo"


# Copied from train_inversion_dpo.random_states_file
def random_states_file(process_index: int) -> str:
    return f"random_states_{process_index}.safetensors"


# Copied from train_inversion_dpo.encode_tree
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


# Copied from train_inversion_dpo.decode_tree
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


# Copied from train_inversion_dpo.save_tree
def save_tree(path: str, obj):
    tensors = {}
    tree = encode_tree(obj, tensors)
    save_file(tensors, path, metadata={"tree": json.dumps(tree)})


# Copied from train_inversion_dpo.load_tree
def load_tree(path: str):
    with safe_open(path, framework="pt") as f:
        tree = json.loads(f.metadata()["tree"])
    return decode_tree(tree, load_file(path))


# Copied from train_inversion_dpo.json_tree
def json_tree(obj):
    """``encode_tree`` for state with no tensors (a scheduler's, a gradient scaler's)."""
    tensors = {}
    tree = encode_tree(obj, tensors)
    if tensors:
        raise TypeError(f"state has tensors ({next(iter(tensors))}); store it with save_tree")
    return tree


# Copied from train_inversion_dpo.random_states
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


# Copied from train_inversion_dpo.set_random_states
def set_random_states(states: dict):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# Copied from train_inversion_dpo.fsync_folder
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


# Copied from train_inversion_dpo.CHECKPOINT_RE
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# Copied from train_inversion_dpo.PARTIAL_PREFIX
PARTIAL_PREFIX = ".partial-checkpoint-"


# Copied from train_inversion_dpo.lora_state_dict_of with unet->transformer
def lora_state_dict_of(transformer):
    """The adapter's weights under peft's key names (``...to_k.lora_A.weight``), which ``load_lora_weights`` reads for
    every module. Not ``convert_state_dict_to_diffusers``: it renames only the attention projections (to the old
    ``to_k.lora.down``), and a file that mixes both namings loses its attention half in stock pipelines whenever
    ``--lora_target_modules`` reaches further."""
    return get_peft_model_state_dict(transformer)


# Copied from train_inversion_dpo.load_lora_into_adapter with unet->transformer
def load_lora_into_adapter(transformer, folder):
    """Loads a saved LoRA into the transformer's existing "default" adapter (not a second one, the diffusers DPO example's
    resume bug)."""
    # [0]: the state dict, whatever the pipeline's loader returns beside it (SD and SDXL: alphas; SD3: nothing)
    state_dict = PIPELINE_CLASS.lora_state_dict(folder, weight_name=LORA_FILE, return_lora_metadata=True)[0]
    transformer_state = convert_transformer_state_dict_to_peft(
        {k[len("transformer.") :]: v for k, v in state_dict.items() if k.startswith("transformer.")}
    )
    # checked before loading, in words: torch's own error for a shape lists every mismatch after a bare first line
    here = get_peft_model_state_dict(transformer)
    for key, value in transformer_state.items():
        if key in here and here[key].shape != value.shape:
            raise ValueError(
                f"the LoRA's {key} is {' x '.join(map(str, value.shape))}, this run's "
                f"{' x '.join(map(str, here[key].shape))}: another --rank or model"
            )
    result = set_peft_model_state_dict(transformer, transformer_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"the LoRA has {unexpected[0]}, which this run's adapter lacks: other --lora_target_modules?")
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k and ".default." in k]
    if missing:  # a LoRA on fewer modules would leave the others as they were
        raise ValueError(f"the LoRA lacks {missing[0].replace('.default.', '.')}: other --lora_target_modules?")


# Copied from train_inversion_dpo.register_lora_hooks with unet->transformer
def register_lora_hooks(accelerator):
    """Under DeepSpeed or FSDP, where the engines shard the optimizer and checkpoints are theirs: accelerate's
    save_state/load_state write and read the adapter as pytorch_lora_weights.safetensors."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                PIPELINE_CLASS.save_lora_weights(
                    output_dir, transformer_lora_layers=lora_state_dict_of(accelerator.unwrap_model(model))
                )
        while weights:  # nothing else of the frozen model goes into a checkpoint
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_lora_into_adapter(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# Copied from train_inversion_dpo.list_checkpoints
def list_checkpoints(output_dir) -> List[str]:
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if CHECKPOINT_RE.match(d)]
    return sorted(names, key=lambda d: int(CHECKPOINT_RE.match(d).group(1)))


# Copied from train_inversion_dpo.engine_checkpoints
def engine_checkpoints(accelerator) -> bool:
    """DeepSpeed and FSDP shard the optimizer state and write checkpoints in their own (pickled) formats."""
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


# Copied from train_inversion_dpo.write_training_state with unet->transformer
def write_training_state(folder, accelerator, transformer, optimizer, lr_scheduler, step):
    """A checkpoint's files, none of them a pickle (see the top of section 7): the main process writes the
    adapter, optimizer, scheduler and step; every process its random states."""
    if accelerator.is_main_process:
        PIPELINE_CLASS.save_lora_weights(
            folder, transformer_lora_layers=lora_state_dict_of(accelerator.unwrap_model(transformer))
        )
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


# Copied from train_inversion_dpo.CheckpointError
class CheckpointError(InputError):
    """A checkpoint that cannot be read, or whose state does not fit this run; one line naming the folder."""


# Copied from train_inversion_dpo.checkpoint_problem
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


# Copied from train_inversion_dpo.read_training_state with unet->transformer
def read_training_state(folder, accelerator, transformer, optimizer, lr_scheduler) -> int:
    """Loads what ``write_training_state`` wrote; returns the step. Nothing is unpickled. A CheckpointError when a
    file cannot be read or the state does not fit this run (another model's LoRA, another rank or targets)."""
    problem = checkpoint_problem(folder, accelerator.process_index)
    if problem:
        raise CheckpointError(f"checkpoint '{folder}' {problem}")
    try:
        load_lora_into_adapter(accelerator.unwrap_model(transformer), folder)
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


# Copied from train_inversion_dpo.load_checkpoint
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


# Copied from train_inversion_dpo.previous_complete_checkpoint
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


# Copied from train_inversion_dpo.resume_run
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


# Copied from train_inversion_dpo.save_checkpoint with unet->transformer
def save_checkpoint(accelerator, output_dir, step, total_limit=None, training_state=None):
    """Writes checkpoint-<step> atomically: into a temporary folder, flushed to disk and renamed when complete, so
    that a crash or kill -9 mid-write never leaves a broken folder for --resume_from_checkpoint latest to pick. Then
    rotates. ``training_state``: (transformer, optimizer, lr_scheduler) for ``write_training_state``."""
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


# Copied from train_inversion_dpo.remove_partial_checkpoints
def remove_partial_checkpoints(output_dir):
    """Removes what a save killed mid-write left behind (never picked by ``latest``)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name))
            logger.warning(f"removed {name}, a checkpoint whose save was interrupted")


# Copied from train_inversion_dpo.previous_run
def previous_run(args) -> List[str]:
    """What ``--output_dir`` holds of a run (its last checkpoint, its metrics log, its adapter), relative to it."""
    found = list_checkpoints(args.output_dir)[-1:]
    for path in (os.path.join(args.logging_dir, METRICS_FILE), os.path.join(args.output_dir, LORA_FILE)):
        if os.path.isfile(path):
            found.append(os.path.relpath(path, args.output_dir))
    return found


# Copied from train_inversion_dpo.remove_previous_run
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


# Copied from train_inversion_dpo.image_grid
def image_grid(images: List[Image.Image], cols: Optional[int] = None) -> Image.Image:
    cols = cols or len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def run_validation(pipeline, prompts, args, accelerator, step, tag="validation"):
    """Samples every prompt with a fixed seed (the same for every validation), logs and saves a grid. The prompts'
    embeddings come from the table built before training (``pipeline.text_table``), at the trained
    ``--max_sequence_length``."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    table = pipeline.text_table
    null_embeds, null_pooled = table.lookup([""])
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed((args.seed or 0) + i)
        embeds, pooled = table.lookup([prompt])
        with accelerator.autocast():
            images.append(
                pipeline(
                    prompt_embeds=embeds,
                    pooled_prompt_embeds=pooled,
                    negative_prompt_embeds=null_embeds,
                    negative_pooled_prompt_embeds=null_pooled,
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


# Copied from train_inversion_dpo.validate with unet->transformer, UNet->Transformer
def validate(args, accelerator, text, vae, transformer, noise_scheduler, step, tag="validation"):
    """``run_validation`` on a pipeline around the training Transformer. The VAE and the text encoders that a run from the
    cache keeps on the CPU come to the Transformer's device for the samples and go back after."""
    device = accelerator.device
    borrowed = [m for m in (vae, *text.encoders) if m.device != device]
    for module in borrowed:
        module.to(device)
    try:
        pipeline = make_pipeline(text, vae, transformer, noise_scheduler)
        return run_validation(pipeline, args.validation_prompts, args, accelerator, step, tag=tag)
    finally:
        for module in borrowed:
            module.to("cpu")


# Copied from train_inversion_dpo.SAMPLES_DIR
SAMPLES_DIR = "samples"


# Copied from train_inversion_dpo.VALIDATION_DIR
VALIDATION_DIR = "validation"  # every validation's grid, <tag>-<step>.png


# Copied from train_inversion_dpo.GRID_FILE
GRID_FILE = "validation.png"


# what --push_to_hub uploads, and nothing else (no checkpoint, log or validation history)
# Copied from train_inversion_dpo.UPLOADED
UPLOADED = [LORA_FILE, CARD_FILE, GRID_FILE, f"{SAMPLES_DIR}/*.png"]


# Copied from train_inversion_dpo.HUB_COMMIT_MESSAGE
HUB_COMMIT_MESSAGE = "Inversion-DPO LoRA"


# Copied from train_inversion_dpo.is_hub_id
def is_hub_id(name: str) -> bool:
    """A Hub repository id (``owner/name``) rather than a local path: only those belong in card metadata."""
    return not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


# Copied from train_inversion_dpo.hub_id_of
def hub_id_of(name: Optional[str], kind: str = "models") -> Optional[str]:
    """The Hub id that a model or dataset name stands for: the name itself when it is one, or the repository of a
    Hub cache folder (``.../models--owner--name/snapshots/<commit>/...``); None for any other local path."""
    if not name:
        return None
    if is_hub_id(name):
        return name
    found = re.search(rf"(?:^|/){kind}--([^/]+?)--([^/]+)/snapshots/", os.path.abspath(name).replace(os.sep, "/"))
    return f"{found.group(1)}/{found.group(2)}" if found else None


# Copied from train_inversion_dpo.display_name
def display_name(name: str, kind: str = "models") -> str:
    """How the card names a model or dataset: its Hub id, else its folder's or file's name (never a local path)."""
    return hub_id_of(name, kind) or os.path.basename(os.path.normpath(name))


# Copied from train_inversion_dpo.base_model_license
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


# Copied from train_inversion_dpo.default_validation_prompts
def default_validation_prompts(pairs, num_prompts: int) -> List[str]:
    """The first ``num_prompts`` distinct captions of the checked pairs: without --validation_prompts, the samples
    of the validations and of the model card show prompts of the data's own kind."""
    prompts = []
    for row in pairs.dataset.select_columns([pairs.columns.caption]):
        caption = parse_caption(row[pairs.columns.caption])
        if caption not in prompts:
            prompts.append(caption)
            if len(prompts) == num_prompts:
                break
    return prompts


# Copied from train_inversion_dpo.save_samples
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


# Copied from train_inversion_dpo.CARD_METRICS_WINDOW
CARD_METRICS_WINDOW = 50  # the card's headline metrics are means over the last this many steps


# Copied from train_inversion_dpo.headline_metrics
def headline_metrics(records: List[dict], window: int = CARD_METRICS_WINDOW) -> dict:
    """Means of the last ``window`` steps' loss, preference loss, accuracy and margin in ``records`` (metrics.jsonl's
    rows; the last row of a step logged twice wins), and ``steps``, how many steps they are over."""
    by_step = {r["step"]: r for r in records if "loss" in r}
    last = [by_step[step] for step in sorted(by_step)][-window:]
    means = {"steps": len(last)}
    for key in ("loss", "preference_loss", "accuracy", "margin"):
        values = [r[key] for r in last if key in r]
        if values:
            means[key] = sum(values) / len(values)
    return means


# Copied from train_inversion_dpo.adapter_repo_id
def adapter_repo_id(args, pushed: Optional[str] = None) -> str:
    """The adapter's Hub id for the card's snippet: the one a push created, --hub_model_id when it names an owner,
    else a placeholder owner and --hub_model_id or the output folder's name (what a push would create)."""
    if pushed:
        return pushed
    if args.hub_model_id and "/" in args.hub_model_id:
        return args.hub_model_id
    return f"<your-username>/{args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))}"


def usage_snippet(args, repo_id: str, prompt: str) -> str:
    """Python that loads the base model (and the VAE trained with) from the Hub in bf16 on a GPU, without T5 when it
    was trained without, then the adapter, and samples at the trained ``--max_sequence_length``."""
    base_id = hub_id_of(args.pretrained_model_name_or_path)
    lines, kwargs = ["import torch"], ""
    if args.revision and base_id:
        kwargs += f", revision={json.dumps(args.revision)}"
    if args.variant:
        kwargs += f", variant={json.dumps(args.variant)}"
    if args.no_t5:
        kwargs += ", text_encoder_3=None, tokenizer_3=None"
    vae = args.pretrained_vae_model_name_or_path
    if vae:
        lines += ["from diffusers import AutoencoderKL, DiffusionPipeline", ""]
        vae_id = hub_id_of(vae)
        vae_name = json.dumps(vae_id or f"path/to/{display_name(vae)}")
        note = "" if vae_id else f"  # trained with the local VAE folder '{display_name(vae)}': its path here"
        lines.append(f"vae = AutoencoderKL.from_pretrained({vae_name}, torch_dtype=torch.bfloat16){note}")
        kwargs = ", vae=vae" + kwargs
    else:
        lines += ["from diffusers import DiffusionPipeline", ""]
    if base_id:
        lines.append(f'pipe = DiffusionPipeline.from_pretrained("{base_id}"{kwargs}, torch_dtype=torch.bfloat16)')
    else:
        name = display_name(args.pretrained_model_name_or_path)
        lines.append(f"# trained on the local model folder '{name}': put its path (or its Hub id) here")
        lines.append(f'pipe = DiffusionPipeline.from_pretrained("path/to/{name}"{kwargs}, torch_dtype=torch.bfloat16)')
    lines += [
        'pipe = pipe.to("cuda")',
        f'pipe.load_lora_weights("{repo_id}")',
        f"image = pipe({json.dumps(prompt, ensure_ascii=False)}, "
        f"max_sequence_length={args.max_sequence_length}).images[0]",
        'image.save("sample.png")',
    ]
    return "\n".join(lines)


# Copied from train_inversion_dpo.metrics_table
def metrics_table(num_pairs: int, global_step: int, means: dict) -> str:
    """The card's headline numbers: pairs, steps, and the last steps' mean loss, preference accuracy and margin."""
    columns = [("pairs", f"{num_pairs}"), ("optimizer steps", f"{global_step}")]
    if "loss" in means:
        columns.append(("loss", f"{means['loss']:.4f}"))
    if "preference_loss" in means and abs(means["preference_loss"] - means["loss"]) > 1e-9:
        columns.append(("preference loss", f"{means['preference_loss']:.4f}"))
    if "accuracy" in means:
        columns.append(("preference accuracy", f"{means['accuracy']:.1%}"))
    if "margin" in means:
        columns.append(("margin", f"{means['margin']:.3g}"))
    table = "| " + " | ".join(c for c, _ in columns) + " |\n|" + "---:|" * len(columns) + "\n"
    table += "| " + " | ".join(v for _, v in columns) + " |\n"
    if means.get("steps"):
        table += f"\nLoss{', accuracy and margin' if 'accuracy' in means else ''}: means over the last "
        table += f"{plural(means['steps'], 'step')}"
        if "accuracy" in means:
            table += (
                ". Preference accuracy is the share of pairs whose winner the adapter favours more than the base "
                "model does (a negative margin); the preference loss starts at log 2 = 0.693 with the sigmoid link"
            )
        table += ".\n"
    return table


# Copied from train_inversion_dpo.write_model_card
def write_model_card(
    args, folder, architecture: str, num_pairs: int, global_step: int, samples=(), metrics=None, repo_id=None
):
    """README.md as a huggingface_hub ModelCard: metadata the Hub validates (base_model, license, datasets, tags,
    pipeline_tag, library_name, a widget of the final samples) and a body saying how it was trained, its headline
    metrics (``metrics``: ``headline_metrics``) and how to use it (``repo_id``: the Hub id of a push)."""
    base = args.pretrained_model_name_or_path
    base_id, dataset_id = hub_id_of(base), hub_id_of(args.dataset_name, "datasets")
    license_ = args.license or base_model_license(base) or "other"
    data = ModelCardData(
        base_model=base_id,
        license=license_,
        datasets=[dataset_id] if dataset_id else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["diffusers", "lora", "text-to-image", "inversion-dpo", architecture],
        widget=[{"text": prompt, "output": {"url": name}} for prompt, name in samples] or None,
    )
    objective = args.objective
    settings = f"beta_dpo {args.beta_dpo:g}, loss {args.loss_type}"
    if objective == "inversion_dpo":
        settings += (
            f", {args.inversion_steps} inversion steps, inversion guidance {args.inversion_guidance_scale:g}"
            f", target {args.inversion_target}, weighting {args.timestep_weighting}, margin {args.inversion_margin}"
        )
    elif objective == "inpo":
        settings += f", {args.inpo_inversion_steps} coarse inversion steps, eta {args.inpo_eta:g}"
    if args.sft_weight or objective == "sft":
        settings += (
            f", + {args.sft_weight:g} x sft on the winners" if args.sft_weight else ""
        ) + f", sft t >= {args.sft_min_timestep}, sft caption dropout {args.sft_caption_dropout:g}"
    if args.anchor_weight:
        settings += (
            f", + {args.anchor_weight:g} x distance to the reference on the winners at t < {args.anchor_max_timestep}"
        )
        if not (args.sft_weight or objective == "sft"):
            settings += f", caption dropout {args.sft_caption_dropout:g}"
    sample_lines = ""
    if samples:
        sample_lines = (
            f"\n## Samples\n\nFrom the final validation (seeds {args.seed or 0}.., "
            f"{args.validation_num_inference_steps} steps, guidance {args.validation_guidance_scale:g}):\n\n"
            + "\n".join(f"- `{prompt}`\n\n  ![{prompt}](./{name})\n" for prompt, name in samples)
        )
    base_name = display_name(base)
    prompt = samples[0][0] if samples else (args.validation_prompts or ["a photo of a cat"])[0]
    summary = (
        f"A LoRA adapter (rank {args.rank}) of `{base_name}`, trained with `{objective}` ({settings}) on "
        f"{plural(num_pairs, 'preference pair')} from `{display_name(args.dataset_name, 'datasets')}` for "
        f"{plural(global_step, 'optimizer step')} (batch {args.train_batch_size} x accumulation "
        f"{args.gradient_accumulation_steps}, learning rate {args.learning_rate:g}, resolution {args.resolution})."
    )
    content = f"""---
{data.to_yaml()}
---

# Inversion-DPO LoRA for {base_name}

{summary}

## Training

{metrics_table(num_pairs, global_step, metrics or {})}{sample_lines}
## Use

```python
{usage_snippet(args, repo_id or adapter_repo_id(args), prompt)}
```
"""
    card = ModelCard(content)  # parses the metadata back: a card that does not round-trip fails here, not on the Hub
    card.save(os.path.join(folder, CARD_FILE))
    return card


# Copied from train_inversion_dpo.push_folder_to_hub
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


# Copied from train_inversion_dpo.make_accelerator
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


# Copied from train_inversion_dpo.held_gradient_sync
@contextlib.contextmanager
def held_gradient_sync(accelerator, model):
    """For every backward of a micro-step but the last: DDP does not all-reduce (``no_sync``) and DeepSpeed neither
    reduces nor steps (its backward steps when ``sync_gradients``), so the gradients accumulate locally."""
    sync = accelerator.sync_gradients
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(sync)


# Copied from train_inversion_dpo.MetricsLog
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


# Copied from train_inversion_dpo.plural
def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# Copied from train_inversion_dpo.any_process
def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: all processes take the same branch at a collective."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0


# Copied from train_inversion_dpo.StopRequest
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


# Copied from train_inversion_dpo.stop_with_launcher
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


# Copied from train_inversion_dpo.non_finite
def non_finite(step, what, value, output_dir) -> TrainingError:
    found = list_checkpoints(output_dir)
    kept = f"{found[-1]} stays the latest checkpoint" if found else "no checkpoint had been written yet"
    return TrainingError(
        f"step {step}: {what} is {value} (not finite); stopped without saving this step, {kept}. "
        "Lower --learning_rate or --beta_dpo, keep --max_grad_norm on, or use bf16 instead of fp16"
    )


# ---------------------------------------------------------------------------------------------------------------
# 10. main


# Copied from train_inversion_dpo.main with unet->transformer, UNet->Transformer, load_text_encoders(args->load_text_encoders(pairs, transformer, args
def main(args):
    # 1. The paths given (models, data, checkpoint, output folder) checked at once; accelerator, logging, seeds
    check_paths(args)
    accelerator = make_accelerator(args)
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)

    # 2. Preference pairs: every row checked once, before the models load, so that bad data fails fast. Without
    #    --validation_prompts, the first captions are the validation prompts
    pairs, data_counts = load_pairs(args, accelerator)
    if args.validation_prompts is None and args.num_validation_prompts:
        args.validation_prompts = default_validation_prompts(pairs, args.num_validation_prompts)
        logger.info(f"validation prompts, from the data: {args.validation_prompts}")

    # 3. Models: frozen VAE and text encoders, the Transformer with a LoRA adapter. The reference model is the same Transformer
    #    with its adapter off, so no second copy of it is ever held.
    noise_scheduler, vae, transformer = load_diffusion_models(args, device, weight_dtype)
    text = load_text_encoders(pairs, transformer, args, device, weight_dtype)
    add_lora(transformer, args, weight_dtype)
    cfg = objective_config(args, noise_scheduler, device)
    counter = (
        TransformerCounter()
    )  # Transformer rows with and without grad: the compute each pair costs, logged per step

    # 4. With --inversion_cache, the reference side of every pair (inversions, targets, reference errors) is read
    #    from disk, built first where missing; a step then runs no VAE, no text encoder and no inversion
    if args.inversion_cache:
        reference = make_denoisers(accelerator, transformer, weight_dtype, noise_scheduler)[1]
        pairs = prepare_inversion_cache(args, accelerator, pairs, cfg, reference, transformer, vae, text)
        if args.inversion_cache_only:
            accelerator.end_training()
            return {"cache": pairs.cache.folder}
        for frozen in (vae, *text.encoders):  # their memory back to the Transformer; a validation borrows them back
            frozen.to("cpu")
    dataloader = torch.utils.data.DataLoader(
        pairs,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_cached if args.inversion_cache else collate_pairs,
        num_workers=args.dataloader_num_workers,
        drop_last=False,
        # its own generator: iterating never draws from the global RNG that the objectives' noise comes from, so a
        # resumed run continues that stream exactly
        generator=torch.Generator().manual_seed(args.seed or 0),
    )

    # 5. Optimizer, learning-rate schedule, accelerate
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args)
    steps_per_epoch = math.ceil(
        math.ceil(len(dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    if engine_checkpoints(accelerator):
        register_lora_hooks(accelerator)
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, dataloader, lr_scheduler
    )
    training_state = (transformer, optimizer, lr_scheduler)
    policy, reference = make_denoisers(accelerator, transformer, weight_dtype, noise_scheduler, counter)
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(TRACKER_PROJECT, config=config)

    # 6. Resume: the same adapter, optimizer, schedule, random streams, step count and data order continue; the
    #    metrics the interrupted run logged after that checkpoint are dropped (this run logs those steps again)
    first_epoch, skip_batches = 0, 0
    if accelerator.is_main_process:
        remove_partial_checkpoints(args.output_dir)
    resume_path, global_step = resume_run(args, accelerator, training_state)
    metrics_log = MetricsLog(os.path.join(args.logging_dir, METRICS_FILE), accelerator.is_main_process)
    if args.resume_from_checkpoint:
        metrics_log.drop_after(global_step)
    if resume_path:
        first_epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
        logger.info(f"resumed from {resume_path} at step {global_step}")
    total = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{args.objective}: {len(pairs)} pairs, {plural(num_epochs, 'epoch')}, "
        f"{plural(args.max_train_steps, 'step')} of {plural(total, 'pair')}"
    )

    # 7. The loop
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    sums, micro_steps, last = {}, 0, {}
    last_saved, interrupted = global_step if resume_path else None, None
    stop = StopRequest().install()
    step_start = time.perf_counter()
    transformer.train()
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        pairs.epoch = epoch
        epoch_loader = dataloader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in epoch_loader:
            with accelerator.accumulate(transformer):
                # 7a. Clean latents z0 and conditioning, 2B rows: the B winners, then their B losers
                inverted = None
                if args.inversion_cache:
                    inverted, cond, z0 = cached_inversion_steps(batch, pairs.cache.steps)
                    null_cond = null_conditioning(cond, text)
                else:
                    with torch.no_grad():
                        z0 = encode_latents(vae, batch["pixel_values"])
                        cond, null_cond = pair_conditioning(batch, text, args.resolution)

                # 7b. The loss (section 4): the objective on each pair, plus the winner terms when asked
                with accelerator.autocast():
                    out = training_loss(args.objective, policy, reference, z0, cond, null_cond, cfg, inverted)
                loss = out.loss.mean()
                if any_process(accelerator, not torch.isfinite(loss).item()):
                    raise non_finite(global_step + 1, "the loss", loss.item(), args.output_dir)

                # 7c. Backward: the loss itself, or the two-pass scheme's chunks in turn, each recomputed with grad
                #     (the gradients add up to the loss's; they are all-reduced once, with the last)
                backward_terms = out.backward_terms()
                for i, term in enumerate(backward_terms):
                    last_term = i == len(backward_terms) - 1
                    with contextlib.nullcontext() if last_term else held_gradient_sync(accelerator, transformer):
                        with accelerator.autocast():
                            term_loss = term().mean()
                        accelerator.backward(term_loss)

                # 7d. Clip and step
                if accelerator.sync_gradients:
                    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf  # inf: measure only
                    grad_norm = accelerator.clip_grad_norm_(params, max_norm)  # None where an engine clips
                    grad_norm = None if grad_norm is None else float(grad_norm)
                    # under fp16 an overflow is the gradient scaler's business: it skips the step, lowers its scale
                    if grad_norm is not None and not math.isfinite(grad_norm) and accelerator.scaler is None:
                        raise non_finite(global_step + 1, "the gradient norm", grad_norm, args.output_dir)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            # 7e. Metrics, averaged over the micro-steps of an optimizer step and the processes
            values = {"loss": out.loss.detach()}
            if out.margin is not None:
                values.update(margin=out.margin, accuracy=(out.margin < 0).float())
            values.update(out.logs)
            # compute per pair: Transformer rows with grad (a forward and a backward, about 3 forwards) and without
            grad_rows, no_grad_rows = counter.take()
            num_pairs = out.loss.shape[0]
            values.update(
                transformer_grad_evals_per_pair=torch.tensor(grad_rows / num_pairs, device=device),
                transformer_evals_per_pair=torch.tensor(no_grad_rows / num_pairs, device=device),
            )
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + accelerator.gather(v.float().reshape(-1)).mean().item()
            micro_steps += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            if not all(torch.isfinite(p).all() for p in params):
                raise non_finite(global_step, "an adapter weight", "nan or inf", args.output_dir)
            progress.update(1)
            last = {k: v / micro_steps for k, v in sums.items()}
            # wall-clock of this step's micro-steps, not of the checkpoints and validation that follow it
            last.update(
                step=global_step,
                epoch=epoch,
                lr=lr_scheduler.get_last_lr()[0],
                step_seconds=time.perf_counter() - step_start,
            )
            if grad_norm is not None:
                last["grad_norm"] = grad_norm
            if torch.cuda.is_available():
                last["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            sums, micro_steps = {}, 0
            metrics_log.write(last)
            accelerator.log({k: v for k, v in last.items() if k != "step"}, step=global_step)
            progress.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last.get('accuracy', float('nan')):.2f}")

            # 7f. Checkpoint (the last step always gets one, so a run can be extended with a larger
            #     --max_train_steps), validation, and a requested stop at the end of this step
            if global_step % args.checkpointing_steps == 0 or global_step >= args.max_train_steps:
                save_checkpoint(
                    accelerator, args.output_dir, global_step, args.checkpoints_total_limit, training_state
                )
                last_saved = global_step
            if (
                args.validation_prompts
                and global_step % args.validation_steps == 0
                and global_step < args.max_train_steps
                and accelerator.is_main_process
            ):
                validate(
                    args, accelerator, text, vae, accelerator.unwrap_model(transformer), noise_scheduler, global_step
                )
            if global_step < args.max_train_steps and any_process(accelerator, stop.name is not None):
                interrupted = stop.name or "a signal to another process"
                break
            if global_step >= args.max_train_steps:
                break
            step_start = time.perf_counter()
        if global_step >= args.max_train_steps or interrupted:
            break
    stop.restore()  # from here a signal acts as usual: the last step's checkpoint is already on disk

    if interrupted:
        if last_saved != global_step:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, training_state)
        metrics_log.write({"interrupted": interrupted, "step": global_step, **data_counts})
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

    # 8. Save: the adapter in the diffusers LoRA format, samples of the final validation, the card, the Hub
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_transformer = accelerator.unwrap_model(transformer)
        PIPELINE_CLASS.save_lora_weights(
            args.output_dir, transformer_lora_layers=lora_state_dict_of(final_transformer)
        )
        samples = []
        if args.validation_prompts:
            images = validate(
                args, accelerator, text, vae, final_transformer, noise_scheduler, global_step, tag="final"
            )
            samples = save_samples(images, args.validation_prompts, args.output_dir)
        means = headline_metrics(metrics_log.records())
        write_model_card(args, args.output_dir, ARCHITECTURE, len(pairs), global_step, samples, means)
        summary = {"final": True, "step": global_step, **data_counts}
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
    except KeyboardInterrupt:  # outside the training loop (loading, checking data, the final save)
        print("error: interrupted outside a training step; the last complete checkpoint stays", file=sys.stderr)
        sys.exit(130)
