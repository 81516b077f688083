"""What the SD 1.x and SDXL trainers do the same way: flags, data, LoRA, optimizer, checkpoints, the training loop,
validation, the model card. A script supplies only what differs between the architectures: how a batch of
captions and images becomes conditioning, and how a pipeline is built for validation and saving."""

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
from PIL import Image

from . import cache as inversion_cache
from .checkpoint import (
    LORA_FILE,
    OPTIMIZER_FILE,
    TRAINING_STATE_FILE,
    decode_tree,
    fsync_folder,
    json_tree,
    load_tree,
    random_states,
    random_states_file,
    save_tree,
    set_random_states,
)
from .data import (
    DataError,
    PairColumns,
    PreferencePairs,
    check_columns,
    check_rows,
    collate_pairs,
    first_line,
    load_pairs_dataset,
    raw_images,
    select_pairs,
)
from .ddim import PREDICTION_TYPES, ddim_grid
from .objectives import (
    INVERSION_MARGINS,
    INVERSION_TARGETS,
    LOSS_SPACES,
    LOSS_TYPES,
    OBJECTIVES,
    TIMESTEP_WEIGHTINGS,
    ObjectiveConfig,
    inversion_policy,
    with_winner_sft,
)


logger = logging.getLogger("inversion_dpo")

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_PREFIX = ".partial-checkpoint-"


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, gradient or weight); the message is one line naming the step."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Flags


def build_parser(description: str, default_resolution: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers folder.")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="Weights variant, e.g. fp16.")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset_name",
        required=True,
        help="Hub id, or a local parquet/json/jsonl/csv file, a folder of them, an imagefolder with "
        "metadata, or a save_to_disk folder, in the Pick-a-Pic schema (see the column flags).",
    )
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--dataset_split_name", default="train")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--image_column_0", default="jpg_0", help="First image: bytes, a path or a decoded image.")
    g.add_argument("--image_column_1", default="jpg_1", help="Second image.")
    g.add_argument(
        "--label_column",
        default="label_0",
        help="1 if the first image is preferred, 0 if the second, 0.5 for a tie (dropped and counted).",
    )
    g.add_argument("--caption_column", default="caption")
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
    g.add_argument("--resolution", type=int, default=default_resolution)
    g.add_argument("--random_crop", action="store_true", help="Random instead of center crops.")
    g.add_argument(
        "--random_flip",
        action="store_true",
        help="Random horizontal flips (one flip shared by both images of a pair). Off by default: a flip makes a "
        "caption that says left or right wrong.",
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="inversion_dpo", choices=sorted(OBJECTIVES))
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
        "-beta_dpo/2 * margin, as in the diffusers SD1.5 DPO example.",
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
        "trajectory's next latent (see the README); reference: the paper's figure (zero gradient at initialisation: "
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
    g.add_argument("--output_dir", default="inversion-dpo-lora")
    g.add_argument("--logging_dir", default="logs", help="Under output_dir; metrics.jsonl is written there.")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--train_batch_size", type=int, default=1, help="Pairs per device per micro-step.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps, batch size and number of processes.",
    )
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".',
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
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
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    g = p.add_argument_group("validation")
    g.add_argument(
        "--validation_prompts",
        nargs="+",
        default=None,
        help="Sampled every --validation_steps and at the end with fixed seeds.",
    )
    g.add_argument("--validation_steps", type=int, default=200)
    g.add_argument("--validation_num_inference_steps", type=int, default=25)
    g.add_argument("--validation_guidance_scale", type=float, default=7.5)
    g = p.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument(
        "--license",
        default=None,
        help="The card's license. Default: the base model's, read from its card when at hand (a local folder or the "
        'Hub cache), else "other".',
    )
    return p


def check_args(args):
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
    ):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1, got {getattr(args, name)}")
    if args.inversion_grad_steps is not None and args.inversion_grad_steps < 1:
        raise SystemExit(f"error: --inversion_grad_steps must be at least 1, got {args.inversion_grad_steps}")
    if args.inversion_grad_steps is not None and args.inversion_margin == "step":
        raise SystemExit("error: --inversion_grad_steps samples steps of the trajectory margin; --inversion_margin step "
                         "back-propagates its one step already")  # fmt: skip
    if args.sft_weight < 0:
        raise SystemExit(f"error: --sft_weight must be at least 0, got {args.sft_weight:g}")
    if args.sft_weight and args.objective == "sft":
        raise SystemExit(
            "error: --sft_weight adds the sft loss to a pair objective; --objective sft is that loss alone"
        )
    if not 0 <= args.sft_caption_dropout < 1:
        raise SystemExit(f"error: --sft_caption_dropout must be in [0, 1), got {args.sft_caption_dropout:g}")
    if args.sft_min_timestep < 0:
        raise SystemExit(f"error: --sft_min_timestep must be at least 0, got {args.sft_min_timestep}")
    if args.anchor_weight < 0:
        raise SystemExit(f"error: --anchor_weight must be at least 0, got {args.anchor_weight:g}")
    if args.anchor_max_timestep is None:
        args.anchor_max_timestep = args.sft_min_timestep
    if args.anchor_weight and args.anchor_max_timestep < 1:
        raise SystemExit(
            "error: --anchor_weight needs --anchor_max_timestep (or --sft_min_timestep) above 0: the levels to keep"
        )
    unused = [f"--{n}" for n in ("sft_min_timestep", "sft_caption_dropout") if getattr(args, n)]
    if unused and not (args.sft_weight or args.anchor_weight) and args.objective != "sft":
        raise SystemExit(
            f"error: {' and '.join(unused)} shape the sft loss, which --objective {args.objective} only uses with "
            "--sft_weight > 0 (or the anchor, with --anchor_weight > 0)"
        )
    if args.inversion_cache:
        if args.objective != "inversion_dpo":
            raise SystemExit(
                f"error: --inversion_cache holds inversion_dpo's reference side; --objective is {args.objective}"
            )
        if args.random_crop:
            raise SystemExit(
                "error: --random_crop cannot be cached (the crops are not enumerable); drop one of the two"
            )
    elif args.inversion_cache_only or args.cache_steps is not None:
        raise SystemExit("error: --inversion_cache_only and --cache_steps need --inversion_cache DIR")
    if args.cache_steps is not None and args.cache_steps < 1:
        raise SystemExit(f"error: --cache_steps must be at least 1, got {args.cache_steps}")
    if args.resolution % 8:
        raise SystemExit(f"error: --resolution must be a multiple of 8, got {args.resolution}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise SystemExit(f"error: --max_bad_fraction must be between 0 and 1, got {args.max_bad_fraction}")
    args.logging_dir = os.path.join(args.output_dir, args.logging_dir)
    return args


def cpu_launch_command(script: str) -> list:
    """``accelerate launch`` of a script on one CPU process, with every launcher default given (no prompt, no
    warning about missing values)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", script]  # fmt: skip


def run_cli(main, parse_args):
    """Runs a script's main; bad input or a diverged run ends in one line naming the problem, not a traceback."""
    try:
        main(parse_args())
    except (DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside the training loop (loading, checking data, the final save)
        print("error: interrupted outside a training step; the last complete checkpoint stays", file=sys.stderr)
        sys.exit(130)


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


# ---------------------------------------------------------------------------------------------------------------
# 2. Accelerator, LoRA, optimizer


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    report_to = None if args.report_to == "none" else args.report_to
    if report_to in ("wandb", "all"):
        from diffusers.utils import is_wandb_available

        if not is_wandb_available():
            raise SystemExit("error: --report_to wandb needs wandb: pip install wandb")
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
        os.makedirs(args.logging_dir, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def lora_targets(args) -> List[str]:
    return [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]


def prepare_unet(unet, args, weight_dtype, device):
    """Freezes the UNet, adds the LoRA adapter ("default") on its attention projections, keeps LoRA in fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.to(device, dtype=None if weight_dtype == torch.float32 else weight_dtype)
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=lora_targets(args))
    )
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if not torch.cuda.is_available():
            raise SystemExit("error: --enable_xformers_memory_efficient_attention needs a CUDA GPU")
        unet.enable_xformers_memory_efficient_attention()
    return unet


def make_optimizer(params, args):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SystemExit("error: --use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
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


# ---------------------------------------------------------------------------------------------------------------
# 3. LoRA files and checkpoints


def lora_state_dict_of(unet):
    """The adapter's weights under peft's key names (``...to_k.lora_A.weight``), which ``load_lora_weights`` reads for
    every module. Not ``convert_state_dict_to_diffusers``: it renames only the attention projections (to the old
    ``to_k.lora.down``), and a file that mixes both namings loses its attention half in stock pipelines whenever
    ``--lora_target_modules`` reaches further."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def load_lora_into_adapter(unet, pipeline_cls, folder):
    """Loads a saved LoRA into the unet's existing "default" adapter (not a second one, the diffusers DPO example's
    resume bug)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state_dict, _ = pipeline_cls.lora_state_dict(folder, weight_name=LORA_FILE)
    unet_state = convert_unet_state_dict_to_peft(
        {k[len("unet.") :]: v for k, v in state_dict.items() if k.startswith("unet.")}
    )
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA in '{folder}' does not fit this UNet: unexpected keys such as {unexpected[0]}")


def register_lora_hooks(accelerator, pipeline_cls):
    """Under DeepSpeed or FSDP, where the engines shard the optimizer and checkpoints are theirs: accelerate's
    save_state/load_state write and read the adapter as pytorch_lora_weights.safetensors."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                pipeline_cls.save_lora_weights(
                    output_dir, unet_lora_layers=lora_state_dict_of(accelerator.unwrap_model(model))
                )
        while weights:  # nothing else of the frozen model goes into a checkpoint
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_lora_into_adapter(accelerator.unwrap_model(models.pop()), pipeline_cls, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir) -> List[str]:
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if CHECKPOINT_RE.match(d)]
    return sorted(names, key=lambda d: int(CHECKPOINT_RE.match(d).group(1)))


def engine_checkpoints(accelerator) -> bool:
    """DeepSpeed and FSDP shard the optimizer state and write checkpoints in their own (pickled) formats."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def write_training_state(folder, accelerator, unet, pipeline_cls, optimizer, lr_scheduler, step):
    """A checkpoint's files, none of them a pickle (``inversion_dpo/checkpoint.py``): the main process writes the
    adapter, optimizer, scheduler and step; every process its random states."""
    if accelerator.is_main_process:
        pipeline_cls.save_lora_weights(folder, unet_lora_layers=lora_state_dict_of(accelerator.unwrap_model(unet)))
        # fault-injection hook for the tests: a slow save, so that a kill -9 can land in the middle of one
        time.sleep(float(os.environ.get("INVERSION_DPO_TEST_SLOW_SAVE", 0)))
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


def read_training_state(folder, accelerator, unet, pipeline_cls, optimizer, lr_scheduler) -> int:
    """Loads what ``write_training_state`` wrote; returns the step. Nothing is unpickled."""
    missing = [
        f for f in (LORA_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE) if not os.path.isfile(os.path.join(folder, f))
    ]
    if missing:
        pickled = [f for f in sorted(os.listdir(folder)) if f.endswith((".bin", ".pkl", ".pt"))]
        raise DataError(
            f"checkpoint '{folder}' has no {missing[0]}"
            + (f"; it holds pickles ({', '.join(pickled)}), which this trainer does not load" if pickled else "")
        )
    load_lora_into_adapter(accelerator.unwrap_model(unet), pipeline_cls, folder)
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
        logger.warning(f"{rng_file} missing (more processes than the run that wrote it?): random streams start anew")
    return int(state["step"])


def save_checkpoint(accelerator, output_dir, step, total_limit=None, training_state=None):
    """Writes checkpoint-<step> atomically: into a temporary folder, flushed to disk and renamed when complete, so
    that a crash or kill -9 mid-write never leaves a broken folder for --resume_from_checkpoint latest to pick. Then
    rotates. ``training_state``: (unet, pipeline_cls, optimizer, lr_scheduler) for ``write_training_state``."""
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


def remove_partial_checkpoints(output_dir):
    """Removes what a save killed mid-write left behind (never picked by ``latest``)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name))
            logger.warning(f"removed {name}, a checkpoint whose save was interrupted")


def resolve_resume(resume_from_checkpoint, output_dir) -> Optional[str]:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning(f"no checkpoint in {output_dir}: starting a new run")
            return None
        return os.path.join(output_dir, found[-1])
    if not os.path.isdir(resume_from_checkpoint):
        raise SystemExit(f"error: checkpoint '{resume_from_checkpoint}' does not exist")
    return resume_from_checkpoint


# ---------------------------------------------------------------------------------------------------------------
# 4. Validation, model card, hub


def image_grid(images: List[Image.Image], cols: Optional[int] = None) -> Image.Image:
    cols = cols or len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


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
    folder = os.path.join(args.output_dir, "validation")
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


SAMPLES_DIR = "samples"
GRID_FILE = "validation.png"
# what --push_to_hub uploads, and nothing else (no checkpoint, log or validation history)
UPLOADED = [LORA_FILE, "README.md", GRID_FILE, f"{SAMPLES_DIR}/*.png"]


def is_hub_id(name: str) -> bool:
    """A Hub repository id (``owner/name``) rather than a local path: only those belong in card metadata."""
    return not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def base_model_license(model: str) -> Optional[str]:
    """The license in the base model's card, read without the network: a local folder's README.md or the Hub cache's
    copy. None when neither is at hand."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

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


def write_model_card(args, folder, architecture: str, num_pairs: int, global_step: int, samples=()):
    """README.md as a huggingface_hub ModelCard: metadata the Hub validates (base_model, license, datasets, tags,
    pipeline_tag, library_name, a widget of the final samples) and a body saying how it was trained."""
    from huggingface_hub import ModelCard, ModelCardData

    base = args.pretrained_model_name_or_path
    license_ = args.license or base_model_license(base) or "other"
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        license=license_,
        datasets=[args.dataset_name] if is_hub_id(args.dataset_name) else None,
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
    content = f"""---
{data.to_yaml()}
---

# Inversion-DPO LoRA for {base}

A LoRA adapter (rank {args.rank}) trained with `{objective}` ({settings}) on {num_pairs} preference pairs from
`{args.dataset_name}` for {global_step} optimizer steps (batch {args.train_batch_size} x accumulation
{args.gradient_accumulation_steps}, learning rate {args.learning_rate:g}, resolution {args.resolution}).
{sample_lines}
## Use

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{args.hub_model_id or args.output_dir}")
image = pipe("a prompt").images[0]
```
"""
    card = ModelCard(content)  # parses the metadata back: a card that does not round-trip fails here, not on the Hub
    card.save(os.path.join(folder, "README.md"))
    return card


def push_folder_to_hub(args, folder):
    """Uploads the adapter, the card and the samples (``UPLOADED``); the Hub validates the card's metadata first."""
    from huggingface_hub import HfApi

    if not is_hub_id(args.pretrained_model_name_or_path):
        logger.warning("the base model is a local path: the card names no base_model")
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id or os.path.basename(os.path.abspath(folder)), exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message="Inversion-DPO LoRA", allow_patterns=UPLOADED
    )
    return repo_id


# ---------------------------------------------------------------------------------------------------------------
# 5. The training loop


@dataclass
class Architecture:
    """What a script supplies: the frozen parts, how a batch becomes conditioning, and how to build a pipeline."""

    name: str  # "stable-diffusion" or "stable-diffusion-xl", for the model card
    pipeline_cls: type
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object  # a DDIMScheduler with the model's config
    # (batch, device) -> (cond, null_cond): dicts of UNet keyword arguments with 2B rows (winners, then losers)
    encode_conditioning: Callable
    make_pipeline: Callable  # unet -> pipeline for sampling
    text_encoders: tuple = ()  # with the VAE, what a run from the cache does not need (unless it validates)
    null_conditioning: Optional[Callable] = None  # cond -> its null_cond without the text encoders (cached runs)


def encode_latents(vae, pixel_values):
    """Deterministic latents (the distribution's mean, method.md) of [B, 2, 3, R, R] pairs, as [2B, C, h, w]:
    winners then losers. Contiguous: the mean is a channel slice of the encoder's moments, and ``randn_like`` on a
    strided tensor draws in memory order, so the objectives' noise would otherwise differ from a cached run's."""
    images = torch.cat([pixel_values[:, 0], pixel_values[:, 1]]).to(vae.device, dtype=vae.dtype)
    latents = vae.encode(images).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float().contiguous()


def objective_config(args, noise_scheduler, device) -> ObjectiveConfig:
    from diffusers import DDIMScheduler

    def grid(n):
        return ddim_grid(DDIMScheduler.from_config(noise_scheduler.config), n, device)

    T = noise_scheduler.config.num_train_timesteps
    if args.sft_min_timestep >= T:
        raise SystemExit(
            f"error: --sft_min_timestep must be below the model's {T} timesteps, got {args.sft_min_timestep}"
        )
    if args.anchor_max_timestep > T:
        raise SystemExit(
            f"error: --anchor_max_timestep must be at most the model's {T} timesteps, got {args.anchor_max_timestep}"
        )

    return ObjectiveConfig(
        alphas_cumprod=noise_scheduler.alphas_cumprod.to(device, torch.float32),
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
        inpo_eta=args.inpo_eta,
        prediction_type=prediction_type_of(noise_scheduler),
        loss_space=args.loss_space,
        sft_weight=args.sft_weight,
        sft_min_timestep=args.sft_min_timestep,
        sft_caption_dropout=args.sft_caption_dropout,
        anchor_weight=args.anchor_weight,
        anchor_max_timestep=args.anchor_max_timestep,
    )


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


def prediction_type_of(noise_scheduler) -> str:
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise SystemExit(
            f"error: the model's scheduler predicts {prediction_type!r}; only {PREDICTION_TYPES} can be trained"
        )
    return prediction_type


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


def prepare_inversion_cache(args, accelerator, arch, pairs, cfg, reference):
    """Finds (or builds, sharded over the processes) the cache of this run's key; returns the cached dataset."""
    device = accelerator.device
    with torch.no_grad():
        probe, _ = arch.encode_conditioning(inversion_cache.probe_batch(args.resolution), device)
    probe = inversion_cache.flatten_cond(probe)
    key = inversion_cache.cache_key(
        args, arch, pairs, cfg, inversion_cache.tensors_fingerprint(probe.values()), weight_dtype_of(accelerator)
    )
    cache = inversion_cache.InversionCache.locate(args.inversion_cache, key, args.inversion_cache_shard_size)
    size = args.resolution // 2 ** (len(arch.vae.config.block_out_channels) - 1)
    latent_shape = (arch.vae.config.latent_channels, size, size)
    bytes_per_pair = cache.bytes_per_pair(latent_shape, sum(v[0].numel() for v in probe.values()))

    def encode(batch):
        return encode_latents(arch.vae, batch["pixel_values"]), *arch.encode_conditioning(batch, device)

    inversion_cache.build(cache, accelerator, pairs, encode, reference, cfg, args.train_batch_size, bytes_per_pair)
    return inversion_cache.CachedPairs(cache, pairs)


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


def backward_objective(accelerator, model, out):
    """Back-propagates an objective's loss, or each chunk of a two-pass objective in turn (the chunk's forward with
    grad runs here, under the same autocast, so DDP sees one forward per backward); the gradients are all-reduced
    once, with the last."""
    terms = out.backward_terms()
    for i, term in enumerate(terms):
        with held_gradient_sync(accelerator, model) if i < len(terms) - 1 else contextlib.nullcontext():
            with accelerator.autocast():
                value = term().mean()
            accelerator.backward(value)


class MetricsLog:
    """One JSON object per optimizer step in <logging_dir>/metrics.jsonl (appended to on resume)."""

    def __init__(self, path, enabled):
        self.path, self.enabled = path, enabled

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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
        with open(os.path.join(args.logging_dir, "bad_rows.jsonl"), "w") as f:
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


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: all processes take the same branch at a collective."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0


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
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the launcher died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def non_finite(step, what, value, output_dir) -> TrainingError:
    found = list_checkpoints(output_dir)
    kept = f"{found[-1]} stays the latest checkpoint" if found else "no checkpoint had been written yet"
    return TrainingError(
        f"step {step}: {what} is {value} (not finite); stopped without saving this step, {kept}. "
        "Lower --learning_rate or --beta_dpo, keep --max_grad_norm on, or use bf16 instead of fp16"
    )


def train(args, accelerator, arch: Architecture, data):
    """Data, optimizer, resume, the loop, checkpoints, validation and the final save. Returns the final metrics."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    unet = arch.unet

    # 1. Data (loaded by the script before the models, so bad data fails fast); with a cache, its reference side
    pairs, data_counts = data
    cfg = objective_config(args, arch.noise_scheduler, device)
    if args.inversion_cache:
        pairs = prepare_inversion_cache(
            args,
            accelerator,
            arch,
            pairs,
            cfg,
            make_denoisers(accelerator, unet, weight_dtype, arch.noise_scheduler)[1],
        )
        if args.inversion_cache_only:
            accelerator.end_training()
            return {"cache": pairs.cache.folder}
        if not args.validation_prompts:  # nothing will run them again: give their memory back to the UNet
            for frozen in (arch.vae, *arch.text_encoders):
                frozen.to("cpu")
    dataloader = torch.utils.data.DataLoader(
        pairs,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=inversion_cache.collate_cached if args.inversion_cache else collate_pairs,
        num_workers=args.dataloader_num_workers,
        drop_last=False,
        # its own generator: iterating never draws from the global RNG that the objectives' noise comes from, so a
        # resumed run continues that stream exactly
        generator=torch.Generator().manual_seed(args.seed or 0),
    )

    # 2. Optimizer and learning-rate schedule
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for p in unet.parameters() if p.requires_grad]
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
        register_lora_hooks(accelerator, arch.pipeline_cls)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    training_state = (unet, arch.pipeline_cls, optimizer, lr_scheduler)
    counter = UNetCounter()
    policy, reference = make_denoisers(accelerator, unet, weight_dtype, arch.noise_scheduler, counter)
    objective = OBJECTIVES[args.objective]

    def objective_on(batch):
        if args.inversion_cache:  # no VAE, no text encoder; the reference only for --anchor_weight
            ref, cond, z0 = inversion_cache.cached_inversion_steps(batch, pairs.cache.steps)
            null_cond = arch.null_conditioning(cond) if cfg.sft_caption_dropout else None
            return with_winner_sft(
                lambda: inversion_policy(policy, ref, cond, cfg), policy, z0, cond, null_cond, cfg, reference
            )
        with torch.no_grad():
            z0 = encode_latents(arch.vae, batch["pixel_values"])
            cond, null_cond = arch.encode_conditioning(batch, device)
        pair_objective = lambda: objective(policy, reference, z0, cond, null_cond, cfg)  # noqa: E731
        if args.objective == "sft":  # the winners' terms are the objective itself
            return pair_objective()
        return with_winner_sft(pair_objective, policy, z0, cond, null_cond, cfg, reference)

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("inversion-dpo", config=config)

    # 3. Resume: the same adapter, the step count and the data order continue
    global_step, first_epoch, skip_batches = 0, 0, 0
    if accelerator.is_main_process:
        remove_partial_checkpoints(args.output_dir)
    resume_path = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if resume_path and engine_checkpoints(accelerator):
        accelerator.load_state(resume_path)
        global_step = int(CHECKPOINT_RE.match(os.path.basename(os.path.normpath(resume_path))).group(1))
    elif resume_path:
        global_step = read_training_state(resume_path, accelerator, *training_state)
    if resume_path:
        first_epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
        logger.info(f"resumed from {resume_path} at step {global_step}")
    total = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{args.objective}: {len(pairs)} pairs, {num_epochs} epochs, {args.max_train_steps} steps of {total} pairs"
    )

    # 4. Loop
    metrics_log = MetricsLog(os.path.join(args.logging_dir, "metrics.jsonl"), accelerator.is_main_process)
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    sums, micro_steps, last = {}, 0, {}
    last_saved, interrupted = global_step if resume_path else None, None
    stop = StopRequest().install()
    step_start = time.perf_counter()
    unet.train()
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        pairs.epoch = epoch
        epoch_loader = dataloader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in epoch_loader:
            with accelerator.accumulate(unet):
                with accelerator.autocast():
                    out = objective_on(batch)
                loss = out.loss.mean()
                if any_process(accelerator, not torch.isfinite(loss).item()):
                    raise non_finite(global_step + 1, "the loss", loss.item(), args.output_dir)
                backward_objective(accelerator, unet, out)
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

            values = {"loss": out.loss.detach()}
            if out.margin is not None:
                values.update(margin=out.margin, accuracy=(out.margin < 0).float())
            values.update(out.logs)
            # compute per pair: UNet rows with grad (a forward and a backward, about 3 forwards) and without
            grad_rows, no_grad_rows = counter.take()
            num_pairs = out.loss.shape[0]
            values.update(
                unet_grad_evals_per_pair=torch.tensor(grad_rows / num_pairs, device=device),
                unet_evals_per_pair=torch.tensor(no_grad_rows / num_pairs, device=device),
            )
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + accelerator.gather(v.float().reshape(-1)).mean().item()
            micro_steps += 1

            if accelerator.sync_gradients:
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
                # the last step always gets a checkpoint, so a run can be extended with a larger --max_train_steps
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
                    run_validation(
                        arch.make_pipeline(accelerator.unwrap_model(unet)),
                        args.validation_prompts,
                        args,
                        accelerator,
                        global_step,
                    )
                if global_step < args.max_train_steps and any_process(accelerator, stop.name is not None):
                    interrupted = stop.name or "a signal to another process"
                    break
                step_start = time.perf_counter()
            if global_step >= args.max_train_steps:
                break
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

    # 5. Save: the final checkpoint, the adapter in the diffusers LoRA format, samples, the card, the Hub
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        arch.pipeline_cls.save_lora_weights(args.output_dir, unet_lora_layers=lora_state_dict_of(final_unet))
        samples = []
        if args.validation_prompts:
            images = run_validation(
                arch.make_pipeline(final_unet), args.validation_prompts, args, accelerator, global_step, tag="final"
            )
            samples = save_samples(images, args.validation_prompts, args.output_dir)
        write_model_card(args, args.output_dir, arch.name, len(pairs), global_step, samples)
        summary = {"final": True, "step": global_step, **data_counts}
        metrics_log.write(summary)
        logger.info(f"saved the LoRA adapter to {args.output_dir}: {summary}")
        if args.push_to_hub:
            repo_id = push_folder_to_hub(args, args.output_dir)
            logger.info(f"pushed to https://huggingface.co/{repo_id}")
    accelerator.end_training()
    return last
