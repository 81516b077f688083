#!/usr/bin/env python
"""Inversion-DPO (and Diffusion-DPO, DDIM-InPO, SFT) LoRA training for Stable Diffusion 1.x / 2.x.

    accelerate launch train_inversion_dpo.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name <pairs> --objective inversion_dpo --use_8bit_adam --mixed_precision fp16 \\
        --gradient_checkpointing --output_dir out

The adapter lands in ``out/pytorch_lora_weights.safetensors``; ``StableDiffusionPipeline.load_lora_weights("out")``
loads it. The objectives' math is in ``inversion_dpo/objectives.py``; the loop shared with the SDXL script is in
``inversion_dpo/training.py``. This file holds what is particular to SD 1.x/2.x: one CLIP text encoder.
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


def parse_args(input_args=None):
    parser = build_parser(__doc__.splitlines()[0], default_resolution=512)
    return check_args(parser.parse_args(input_args))


def encode_prompts(tokenizer, text_encoder, prompts):
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def main(args):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # 1. Accelerator and logging
    accelerator = make_accelerator(args)
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    data = load_pairs(args, accelerator)

    # 2. Frozen models; the reference is the policy's UNet with its adapter off
    model, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    # DDIM: the inversion and validation sampler; its schedule (alphas_cumprod) is the model's own
    noise_scheduler = load_component(DDIMScheduler, model, "scheduler", revision=revision)
    tokenizer = load_component(CLIPTokenizer, model, "tokenizer", revision=revision)
    text_encoder = load_component(CLIPTextModel, model, "text_encoder", revision=revision, variant=variant)
    vae = load_component(AutoencoderKL, model, "vae", revision=revision, variant=variant)
    unet = load_component(UNet2DConditionModel, model, "unet", revision=revision, variant=variant)
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False)
        frozen.to(device, dtype=None if weight_dtype == torch.float32 else weight_dtype)
    unet = prepare_unet(unet, args, weight_dtype, device)

    # 3. Conditioning: winner and loser share their caption; SD's null conditioning is the embedding of ""
    null_embedding = encode_prompts(tokenizer, text_encoder, [""])

    def null_conditioning(cond):
        return {"encoder_hidden_states": null_embedding.expand_as(cond["encoder_hidden_states"])}

    def encode_conditioning(batch, device):
        embeddings = encode_prompts(tokenizer, text_encoder, batch["captions"])
        cond = {"encoder_hidden_states": torch.cat([embeddings, embeddings])}  # [2B, L, D]: winners, then losers
        return cond, null_conditioning(cond)

    def make_pipeline(trained_unet):
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=trained_unet,
            scheduler=DDIMScheduler.from_config(noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    # 4. Train, validate, save
    arch = Architecture(
        "stable-diffusion",
        StableDiffusionPipeline,
        unet,
        vae,
        noise_scheduler,
        encode_conditioning,
        make_pipeline,
        text_encoders=(text_encoder,),
        null_conditioning=null_conditioning,
    )
    return train(args, accelerator, arch, data)


if __name__ == "__main__":
    run_cli(main, parse_args)
