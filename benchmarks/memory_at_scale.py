#!/usr/bin/env python
"""Training memory of a LoRA on Stable Diffusion 1.5 at 512 px and SDXL at 1024 px, computed without the weights.

    python benchmarks/memory_at_scale.py            # about 15 minutes on one CPU core; nothing is downloaded
    python benchmarks/memory_at_scale.py --quick    # SD 1.5 only

The real architectures are built from their published configs (written below) on the meta device, where tensors
have shapes and dtypes but no storage. One training step of a pair (batch 1) then runs there through the trainer's
own code (``prepare_unet``, ``make_denoisers``, ``encode_latents``, the objectives, ``backward_objective``), and
``benchmarks/memory.py`` counts the tensor storages it creates: activations, gradients and temporaries. To that
are added the weights (UNet, VAE and text encoders in fp16, SDXL's VAE in fp32 as its config asks; a run from the
cache without validation prompts moves the VAE and text encoders to the CPU) and AdamW's state for the LoRA (8 bytes per
parameter; 2 with 8-bit Adam). Attention is counted as memory-efficient attention keeps it on a GPU (output and
log-sum-exp, not the attention matrix), which is what PyTorch's SDPA runs there.

This is computed, not measured on a GPU: the CUDA context (~0.3-0.5 GB), the caching allocator's rounding and
fragmentation, and kernel workspaces come on top. Read the "fits" columns with that margin in mind.
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


GiB = 2**30

# The published configs (stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0), what differs from diffusers' defaults
SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
OPENCLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
MODELS = {
    "SD 1.5": {"unet": SD15_UNET, "resolution": 512, "texts": [CLIP_L], "vae_fp32": False, "scaling": 0.18215},
    "SDXL": {
        "unet": SDXL_UNET,
        "resolution": 1024,
        "texts": [CLIP_L, OPENCLIP_BIGG],
        "vae_fp32": True,
        "scaling": 0.13025,
    },
}


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """What a GPU's memory-efficient SDPA keeps for the backward (output and log-sum-exp): the meta device would
    otherwise take the math path, which materialises every attention matrix."""
    if attn_mask is not None:
        return SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, scale=scale)[0]


SDPA = F.scaled_dot_product_attention


def build(spec, dtype):
    """UNet, VAE and text encoders on the meta device, the frozen parts in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**VAE).to(torch.float32 if spec["vae_fp32"] else dtype)
        texts = []
        for i, text in enumerate(spec["texts"]):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            texts.append(cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text)).to(dtype))
    vae.config.scaling_factor = spec["scaling"]
    return unet, vae, texts


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def conditioning(spec, texts, dtype):
    """What the script's encode_conditioning computes, shapes only: [2, 77, D] (winner, loser), SDXL's pooled and ids."""
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    hidden = [t(ids, output_hidden_states=True) for t in texts]
    states = torch.cat([h.hidden_states[-2] for h in hidden], dim=-1).expand(2, -1, -1)
    cond = {"encoder_hidden_states": states}
    if len(texts) > 1:
        pooled = hidden[-1].text_embeds.expand(2, -1)
        cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.zeros(2, 6, device="meta", dtype=dtype)}
    null = {k: (torch.zeros_like(v) if torch.is_tensor(v) else v) for k, v in cond.items()}
    return cond, null


def training_step_peak(trainer, args, policy, reference, z0, cond, null, cfg, cached, channels, size) -> int:
    """Peak bytes of one pair's training step through ``trainer``'s (a training script's module) objectives, as its
    loop runs them: uncached, the objective of ``args.objective`` on the clean latents ``z0``; from the cache, the
    policy side on a batch as the cache reads it ([K, 2, channels, size, size] inputs and targets, float16 on disk)."""
    from benchmarks.memory import PeakTensorMemory

    with PeakTensorMemory() as step:
        if cached:
            K = args.inversion_steps
            x = torch.zeros(K, 2, channels, size, size, device="meta")
            steps = torch.zeros(K, 2, dtype=torch.long, device="meta")
            ref = trainer.InversionSteps(
                steps, x.half().float(), x.half().float(), torch.zeros(K, 2, device="meta"), None
            )
            out = trainer.inversion_policy(policy, ref, cond, cfg)
        else:
            out = trainer.OBJECTIVES[args.objective](policy, reference, z0, cond, null, cfg)
        for term in out.backward_terms():  # as the trainer's loop: the loss, or the two-pass chunks in turn
            term().mean().backward()
    return step.peak


def step_memory(spec, objective_flags, gradient_checkpointing, cached, dtype=torch.float16, rank=8):
    """Peak bytes of the encoding and of the UNet part of one training step of one pair; LoRA and weight sizes."""
    from diffusers import DDIMScheduler

    import train_inversion_dpo as trainer
    from benchmarks.memory import PeakTensorMemory
    from train_inversion_dpo import add_lora, encode_latents, make_denoisers, objective_config, parse_args

    unet, vae, texts = build(spec, dtype)
    # the trainer's own flags and defaults, with this row's settings
    args = parse_args(
        ["--pretrained_model_name_or_path", "-", "--dataset_name", "-", "--resolution", str(spec["resolution"])]
    )
    args.rank, args.gradient_checkpointing = rank, gradient_checkpointing
    for name, value in objective_flags.items():
        setattr(args, name, value)
    unet.requires_grad_(False)
    unet.to("meta", dtype=dtype)
    add_lora(unet, args, dtype)
    lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    accelerator = SimpleNamespace(device="meta", unwrap_model=lambda m: m)  # what make_denoisers uses of one
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    policy, reference = make_denoisers(accelerator, unet, dtype, scheduler)
    cfg = objective_config(args, scheduler, "meta")
    size = spec["resolution"] // 8
    with torch.no_grad(), PeakTensorMemory() as encoding:  # the VAE and text encoders: not needed with the cache
        images = torch.zeros(1, 2, 3, spec["resolution"], spec["resolution"], device="meta")
        z0 = None if cached else encode_latents(vae, images)
        cond, null = conditioning(spec, texts, dtype)
    step = training_step_peak(trainer, args, policy, reference, z0, cond, null, cfg, cached, channels=4, size=size)
    return {
        "encode": 0 if cached else encoding.peak,
        "step": step,
        "lora": lora,
        "unet": nbytes(unet),
        "others": nbytes(vae) + sum(nbytes(t) for t in texts),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SD 1.5 only.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    F.scaled_dot_product_attention = efficient_attention
    inv = {"objective": "inversion_dpo"}
    rows = [  # (objective, its flags, from the cache, gradient checkpointing)
        ("diffusion_dpo", {"objective": "diffusion_dpo"}, False, True),
        ("diffusion_dpo", {"objective": "diffusion_dpo"}, False, False),
        ("inversion_dpo N=20, one graph", {**inv, "inversion_chunk_steps": 20}, False, True),
        ("inversion_dpo N=20, per-step margin", {**inv, "inversion_margin": "step"}, False, True),
        ("inversion_dpo N=5, two-pass, cache", {**inv, "inversion_steps": 5}, True, True),
        ("inversion_dpo N=50, two-pass, cache", {**inv, "inversion_steps": 50}, True, True),
        ("inversion_dpo N=50, per-step margin, cache", {**inv, "inversion_steps": 50, "inversion_margin": "step"},
         True, True),
        ("inversion_dpo N=50, per-step margin, cache", {**inv, "inversion_steps": 50, "inversion_margin": "step"},
         True, False),
    ]  # fmt: skip
    print("| model | objective | gradient checkpointing | VAE + text encoding | UNet step | weights | "
          "total, AdamW | total, 8-bit Adam | fits 8 / 12 / 16 / 24 GiB (8-bit Adam) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    started = time.time()
    for model, spec in MODELS.items():
        if args.quick and model != "SD 1.5":
            continue
        for name, flags, cached, checkpointing in rows:
            m = step_memory(spec, flags, checkpointing, cached)
            # from the cache and without validation prompts, the trainer moves the VAE and text encoders to the CPU
            weights = m["unet"] + (0 if cached else m["others"])
            peak = max(m["encode"], m["step"])
            adam, adam8 = weights + peak + 8 * m["lora"], weights + peak + 2 * m["lora"]
            fits = " / ".join("yes" if adam8 <= gb * GiB else "no" for gb in (8, 12, 16, 24))
            print(f"| {model} {spec['resolution']} px | {name} | {'on' if checkpointing else 'off'} | "
                  f"{m['encode'] / GiB:.2f} GiB | {m['step'] / GiB:.2f} GiB | {weights / GiB:.2f} GiB | "
                  f"{adam / GiB:.2f} GiB | {adam8 / GiB:.2f} GiB | {fits} |", flush=True)  # fmt: skip
    print(
        f"\n(LoRA rank 8 on the attention projections, {m['lora'] / 1e6:.1f} M parameters for the last model; "
        f"batch 1 pair; fp16 weights; computed in {time.time() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
