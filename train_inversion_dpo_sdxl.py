#!/usr/bin/env python
"""Inversion-DPO (and Diffusion-DPO, DDIM-InPO, SFT) LoRA training for Stable Diffusion XL.

    accelerate launch train_inversion_dpo_sdxl.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
        --dataset_name <pairs> --objective inversion_dpo --use_8bit_adam --mixed_precision fp16 \\
        --gradient_checkpointing --output_dir out

The adapter lands in ``out/pytorch_lora_weights.safetensors``; ``StableDiffusionXLPipeline.load_lora_weights("out")``
loads it. The objectives' math is in ``inversion_dpo/objectives.py``; the loop shared with the SD 1.x/2.x script is in
``inversion_dpo/training.py``. This file holds what is particular to SDXL: two CLIP text encoders, pooled embeddings,
time ids from each image's size and crop, an all-zeros null conditioning, and a VAE that overflows in fp16.
"""

import torch

from inversion_dpo.training import (
    Architecture,
    build_parser,
    check_args,
    load_component,
    load_pairs,
    make_accelerator,
    prepare_unet,
    run_cli,
    train,
    weight_dtype_of,
)


def make_parser():
    parser = build_parser(__doc__.splitlines()[0], default_resolution=1024)
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE in place of the model's, e.g. madebyollin/sdxl-vae-fp16-fix. A VAE whose config asks for "
        "force_upcast (SDXL's own: it overflows in fp16) stays in fp32; a fp16-safe one runs in --mixed_precision.",
    )
    return parser


def parse_args(input_args=None):
    return check_args(make_parser().parse_args(input_args))


def encode_prompts(tokenizers, text_encoders, prompts):
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


def time_ids(original_sizes, crop_top_lefts, resolution):
    """SDXL's micro-conditioning of every image, (original h, w, crop top, left, target h, w), from [B, 2, 2]
    (winner, loser) sizes and crops to [2B, 6]: winners, then losers. A pair's two images may differ in size."""
    target = torch.tensor([resolution, resolution]).expand_as(original_sizes)
    ids = torch.cat([original_sizes, crop_top_lefts, target], dim=-1)  # [B, 2, 6]
    return torch.cat([ids[:, 0], ids[:, 1]]).float()


def sdxl_conditioning(tokenizers, text_encoders, batch, resolution, device):
    """(cond, null_cond) for the UNet, 2B rows each (winners, then losers). The null conditioning is all zeros, text
    and pooled (SDXL's force_zeros_for_empty_prompt), with the images' own time ids."""
    embeddings, pooled = encode_prompts(tokenizers, text_encoders, batch["captions"])
    embeddings, pooled = torch.cat([embeddings, embeddings]), torch.cat([pooled, pooled])  # [2B, L, D], [2B, P]
    ids = time_ids(batch["original_sizes"], batch["crop_top_lefts"], resolution).to(device, pooled.dtype)
    cond = {"encoder_hidden_states": embeddings, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    return cond, sdxl_null_conditioning(cond)


def sdxl_null_conditioning(cond):
    """The null conditioning of ``cond``: text and pooled embeddings all zeros, the images' own time ids."""
    added = cond["added_cond_kwargs"]
    return {
        "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
        "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]},
    }


def main(args):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # 1. Accelerator and logging
    accelerator = make_accelerator(args)
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    data = load_pairs(args, accelerator)

    # 2. Frozen models; the reference is the policy's UNet with its adapter off
    model, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    # DDIM: the inversion and validation sampler; its schedule (alphas_cumprod) is the model's own
    noise_scheduler = load_component(DDIMScheduler, model, "scheduler", revision=revision)
    tokenizers = [
        load_component(CLIPTokenizer, model, name, revision=revision) for name in ("tokenizer", "tokenizer_2")
    ]
    text_encoders = [
        load_component(cls, model, name, revision=revision, variant=variant)
        for cls, name in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
    ]
    if args.pretrained_vae_model_name_or_path:
        vae = load_component(AutoencoderKL, args.pretrained_vae_model_name_or_path, None)
    else:
        vae = load_component(AutoencoderKL, model, "vae", revision=revision, variant=variant)
    unet = load_component(UNet2DConditionModel, model, "unet", revision=revision, variant=variant)
    for frozen in text_encoders:
        frozen.requires_grad_(False)
        frozen.to(device, dtype=None if weight_dtype == torch.float32 else weight_dtype)
    vae.requires_grad_(False)
    vae.to(device, dtype=torch.float32 if vae.config.force_upcast else weight_dtype)
    unet = prepare_unet(unet, args, weight_dtype, device)

    # 3. Conditioning: winner and loser share their caption but each has its own time ids
    def encode_conditioning(batch, device):
        return sdxl_conditioning(tokenizers, text_encoders, batch, args.resolution, device)

    def make_pipeline(trained_unet):
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=trained_unet,
            scheduler=DDIMScheduler.from_config(noise_scheduler.config),
            add_watermarker=False,
        )

    # 4. Train, validate, save
    arch = Architecture(
        "stable-diffusion-xl",
        StableDiffusionXLPipeline,
        unet,
        vae,
        noise_scheduler,
        encode_conditioning,
        make_pipeline,
        text_encoders=tuple(text_encoders),
        null_conditioning=sdxl_null_conditioning,
    )
    return train(args, accelerator, arch, data)


if __name__ == "__main__":
    run_cli(main, parse_args)
