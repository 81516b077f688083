#!/usr/bin/env python
"""Training memory of a LoRA on Stable Diffusion 3.5 medium and large at 1024 px, computed without the weights.

    python benchmarks/memory_at_scale_sd3.py            # a few minutes on one CPU core; nothing is downloaded

As ``memory_at_scale.py`` does for SD 1.5 and SDXL: the published configs (written below) are built on the meta
device, and ``benchmarks/memory.py`` counts the tensor storages that the trainer's own code creates
(``train_inversion_dpo_sd3.py``: ``add_lora``, ``make_denoisers``, ``encode_latents``, ``encode_prompt``, the
objectives and their backward terms). The SD3 trainer runs in two phases that never share the device:

- text: CLIP-L, CLIP-G and T5-XXL (or no T5, ``--no_t5``) in bf16 and the VAE embed every caption once, 16 at a time,
  while the transformer waits on the CPU; then the encoders are released;
- training: the transformer in bf16 with the LoRA (fp32) and its optimizer state, the VAE (fp32: its config asks
  for ``force_upcast``; on the CPU in a run from the cache without validation prompts), one step of one pair.

The peak is the larger of the two. Attention is counted as memory-efficient attention keeps it on a GPU (output and
log-sum-exp, not the attention matrix), what PyTorch's SDPA runs there. This is computed, not measured on a GPU:
the CUDA context (~0.5 GB), the caching allocator's rounding and fragmentation, and kernel workspaces come on top.
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.memory_at_scale import efficient_attention, training_step_peak  # noqa: E402


GiB = 2**30

# The published configs (stabilityai/stable-diffusion-3.5-medium and -large), what differs from diffusers' defaults
SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
SD35_LARGE = {
    **SD35_MEDIUM,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
}
VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 16,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "projection_dim": 768}  # fmt: skip
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
          "projection_dim": 1280}  # fmt: skip
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
          "feed_forward_proj": "gated-gelu"}  # fmt: skip
MODELS = {"SD3.5-medium": SD35_MEDIUM, "SD3.5-large": SD35_LARGE}
RESOLUTION = 1024


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class ZeroTokenizer:
    """Token ids of zeros: the encoders' cost depends on the shapes only."""

    def __init__(self, model_max_length):
        self.model_max_length = model_max_length

    def __call__(self, prompts, max_length=None, **kwargs):
        ids = torch.zeros(len(prompts), max_length or self.model_max_length, dtype=torch.long)
        return SimpleNamespace(input_ids=ids)


def text_phase(t5: bool, max_sequence_length: int, dtype=torch.bfloat16, offload_t5: bool = False) -> dict:
    """Weights and peak of the text phase: the encoders embed one batch of captions (and the VAE waits). With
    ``offload_t5`` (``--sequential_offload_t5``) T5's weights stay in CPU memory and the device holds one of its
    layers at a time: its largest module's own weights (the token embedding) are counted instead of all of them."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from benchmarks.memory import PeakTensorMemory
    from train_inversion_dpo_sd3 import TEXT_BATCH, encode_prompt

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE)
        encoders = [
            CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **c)).to(dtype)
            for c in (CLIP_L, CLIP_G)
        ]
        if t5:
            encoders.append(T5EncoderModel(T5Config(**T5_XXL)).to(dtype))
    tokenizers = [ZeroTokenizer(77), ZeroTokenizer(77), ZeroTokenizer(max_sequence_length) if t5 else None]
    with torch.no_grad(), PeakTensorMemory() as peak:
        encode_prompt(["a caption"] * TEXT_BATCH, tokenizers, encoders, max_sequence_length, 4096)
    weights = sum(nbytes(e) for e in encoders[:2]) + nbytes(vae)
    if offload_t5:
        weights += max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                       for m in encoders[2].modules())  # fmt: skip
    else:
        weights += sum(nbytes(e) for e in encoders[2:])
    return {"weights": weights, "peak": peak.peak,
            "params": {type(e).__name__ + str(i): params(e) for i, e in enumerate(encoders)}}  # fmt: skip


def training_phase(config, flags, gradient_checkpointing, cached, dtype=torch.bfloat16, rank=8) -> dict:
    """Weights and peak of one training step of one pair (batch 1) through the trainer's code."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    import train_inversion_dpo_sd3 as trainer
    from benchmarks.memory import PeakTensorMemory
    from train_inversion_dpo_sd3 import add_lora, encode_latents, make_denoisers, objective_config, parse_args

    args = parse_args(["--pretrained_model_name_or_path", "-", "--dataset_name", "-"])
    args.rank, args.gradient_checkpointing = rank, gradient_checkpointing
    for name, value in flags.items():
        setattr(args, name, value)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config).to(dtype)
        vae = AutoencoderKL(**VAE)
    transformer.requires_grad_(False)
    add_lora(transformer, args, dtype)
    lora = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    accelerator = SimpleNamespace(device="meta", unwrap_model=lambda m: m)  # what make_denoisers uses of one
    policy, reference = make_denoisers(accelerator, transformer, dtype, scheduler)
    cfg = objective_config(args, scheduler, "meta")
    size = RESOLUTION // 8
    tokens = 77 + args.max_sequence_length
    cond = {"encoder_hidden_states": torch.zeros(2, tokens, 4096, device="meta", dtype=dtype),
            "pooled_projections": torch.zeros(2, 2048, device="meta", dtype=dtype)}  # fmt: skip
    null = {k: torch.zeros_like(v) for k, v in cond.items()}
    with torch.no_grad(), PeakTensorMemory() as encoding:
        z0 = None
        if not cached:
            z0 = encode_latents(vae, torch.zeros(1, 2, 3, RESOLUTION, RESOLUTION, device="meta"))
    step = training_step_peak(trainer, args, policy, reference, z0, cond, null, cfg, cached, channels=16, size=size)
    return {
        "encode": encoding.peak,
        "step": step,
        "lora": lora,
        "transformer": nbytes(transformer),
        "transformer_params": params(transformer) - lora,
        "vae": 0 if cached else nbytes(vae),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--max_sequence_length", type=int, default=77, help="T5 tokens per caption, as the trainer's flag."
    )
    ap.add_argument("--quick", action="store_true", help="SD3.5-medium, two rows.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    F.scaled_dot_product_attention = efficient_attention
    started = time.time()
    seq = {"max_sequence_length": args.max_sequence_length}
    texts = {t5: text_phase(t5, args.max_sequence_length) for t5 in (True, False)}
    names = {"CLIP-L + CLIP-G + T5-XXL": texts[True],
             "the same, --sequential_offload_t5": text_phase(True, args.max_sequence_length, offload_t5=True),
             "CLIP-L + CLIP-G (--no_t5)": texts[False]}  # fmt: skip
    print("| text phase | encoder weights + VAE on the device | peak of a 16-caption batch | total |")
    print("|---|---|---|---|")
    for name, m in names.items():
        print(f"| {name} | {m['weights'] / GiB:.2f} GiB | {m['peak'] / GiB:.2f} GiB | "
              f"{(m['weights'] + m['peak']) / GiB:.2f} GiB |")  # fmt: skip
    inv = {**seq, "objective": "inversion_dpo"}
    rows = [  # (objective, its flags, from the cache, gradient checkpointing)
        ("Flow-DPO (diffusion_dpo)", {**seq, "objective": "diffusion_dpo"}, False, True),
        ("Flow-DPO (diffusion_dpo)", {**seq, "objective": "diffusion_dpo"}, False, False),
        ("inversion_dpo N=20, two-pass", inv, False, True),
        ("inversion_dpo N=20, per-step margin", {**inv, "inversion_margin": "step"}, False, True),
        ("inversion_dpo N=20, two-pass, cache", inv, True, True),
    ]
    print("\n| model | objective | gradient checkpointing | VAE encode | transformer step | weights | "
          "training total, 8-bit Adam | peak with T5's text phase | fits 16 / 24 / 48 GiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    text = texts[True]["weights"] + texts[True]["peak"]
    for model, config in MODELS.items():
        for name, flags, cached, checkpointing in rows if not args.quick or model == "SD3.5-medium" else []:
            if args.quick and not checkpointing:
                continue
            m = training_phase(config, flags, checkpointing, cached)
            weights = m["transformer"] + m["vae"]
            # 8-bit Adam: two 1-byte moments per LoRA parameter (the LoRA's fp32 weights are in `weights`, its
            # gradients in the step)
            train = weights + max(m["encode"], m["step"]) + 2 * m["lora"]
            peak = max(train, text)
            fits = " / ".join("yes" if peak <= gb * GiB else "no" for gb in (16, 24, 48))
            print(f"| {model} ({m['transformer_params'] / 1e9:.2f} B) | {name} | {'on' if checkpointing else 'off'} | "
                  f"{m['encode'] / GiB:.2f} GiB | {m['step'] / GiB:.2f} GiB | {weights / GiB:.2f} GiB | "
                  f"{train / GiB:.2f} GiB | {peak / GiB:.2f} GiB | {fits} |", flush=True)  # fmt: skip
    t5_params = texts[True]["params"]
    print(f"\n(1024 px, batch 1 pair, bf16 weights, LoRA rank 8 on the joint attention ({m['lora'] / 1e6:.1f} M "
          f"parameters for the last model), --max_sequence_length {args.max_sequence_length}; text encoders "
          f"{', '.join(f'{v / 1e9:.2f} B' for v in t5_params.values())}; computed in {time.time() - started:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
