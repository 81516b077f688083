"""InversionXLPipeline on the tiny SDXL: exact where the noise prediction is known, equal to a DDIMInverseScheduler
loop with direct encoder and UNet calls where it is not, time ids that reach the UNet, and loadable as a diffusers
custom pipeline."""

import copy
import os
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from pipeline_inversion_sdxl import InversionXLPipeline


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_FILE = os.path.join(REPO, "pipeline_inversion_sdxl.py")
STEPS = 10
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    pipe = InversionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pil_images(n=2, size=16, seed=0):
    # 16 px: the tiny VAE halves, so latents are the UNet's own 8 x 8
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_euler_is_replaced_by_ddim_with_the_same_schedule(pipe, tiny_sdxl_dir):
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    assert type(stock.scheduler).__name__ == "EulerDiscreteScheduler" and type(pipe.scheduler) is DDIMScheduler
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, stock.scheduler.alphas_cumprod)
    assert not pipe.scheduler.config.clip_sample and not pipe.scheduler.config.set_alpha_to_one


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_invert_then_call_reconstructs_when_eps_is_known(pipe, guidance_scale):
    known = InversionXLPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet))
    c = torch.randn(4, generator=torch.Generator().manual_seed(0)) * 0.5
    known.unet.conv_out.weight.data.zero_()  # eps(x, t, c) is the last layer's bias alone
    known.unet.conv_out.bias.data.copy_(c)
    c = c.reshape(1, 4, 1, 1)

    inv = known.invert(pil_images(), PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale)
    assert inv.trajectory.shape == inv.noises.shape == (STEPS, 2, 4, 8, 8)
    torch.testing.assert_close(inv.noises, c.expand_as(inv.noises))
    # a constant eps telescopes: x_N / sqrt(a_N) - z0 / sqrt(a_0) = c * (s(a_N) - s(a_0)), s(a) = sqrt((1 - a) / a)
    a = known.scheduler.alphas_cumprod
    a_0, a_N = a[0], a[inv.timesteps[-1]]
    s = lambda a: ((1 - a) / a).sqrt()  # noqa: E731
    expected = a_N.sqrt() * (inv.image_latents / a_0.sqrt() + c * (s(a_N) - s(a_0)))
    torch.testing.assert_close(inv.latents, expected, rtol=1e-5, atol=1e-5)

    out = known(
        PROMPTS,
        latents=inv.latents,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        height=16,
        width=16,
        output_type="latent",
    ).images
    assert (inv.latents - inv.image_latents).abs().max() > 0.5  # it did go somewhere
    torch.testing.assert_close(out, inv.image_latents, rtol=0, atol=1e-5)


def reference_inversion(pipe, image, prompts, guidance_scale):
    """DDIM inversion from diffusers' DDIMInverseScheduler and direct encoder / UNet calls: SDXL's conditioning
    written out (penultimate hidden states side by side, the second encoder's pooled projection, zeros for null)."""
    vae, unet = pipe.vae, pipe.unet
    hidden = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    embeds, pooled = torch.cat(hidden, -1), out.text_embeds
    h, w = image.shape[-2:]
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(len(prompts), 1)
    cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    null = {
        "encoder_hidden_states": torch.zeros_like(embeds),
        "added_cond_kwargs": {"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids},
    }

    scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    x = z0 = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    latents, noises = [], []
    for t in scheduler.timesteps:
        eps = unet(x, t, **cond).sample
        if guidance_scale != 1.0:
            eps_null = unet(x, t, **null).sample
            eps = eps_null + guidance_scale * (eps - eps_null)
        x = scheduler.step(eps, t, x).prev_sample
        latents.append(x)
        noises.append(eps)
    return z0, scheduler.timesteps, torch.stack(latents), torch.stack(noises)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@torch.no_grad()
def test_invert_matches_ddim_inverse_scheduler(pipe, guidance_scale):
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z0, timesteps, latents, noises = reference_inversion(pipe, image, PROMPTS, guidance_scale)
    inv = pipe.invert(image, PROMPTS, STEPS, guidance_scale)
    torch.testing.assert_close(inv.image_latents, z0)
    assert inv.timesteps.tolist() == timesteps.tolist()
    # 1e-4: the pipeline batches the null and the caption in one UNet call, the reference makes two
    torch.testing.assert_close(inv.trajectory, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inv.noises, noises, rtol=1e-4, atol=1e-4)

    embeds, null_embeds, pooled, null_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    by_embeds = pipe.invert(
        image,
        prompt_embeds=embeds,
        negative_prompt_embeds=null_embeds,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=null_pooled,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
    )
    torch.testing.assert_close(by_embeds.trajectory, inv.trajectory)


@torch.no_grad()
def test_a_v_prediction_model_inverts_with_eps_at_the_labels_level(pipe):
    """As the SD pipeline: v -> eps = sqrt(a_t) v + sqrt(1 - a_t) x at the label's level, then the DDIM step."""
    v_pred = InversionXLPipeline.from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    )
    unet, a = pipe.unet, pipe.scheduler.alphas_cumprod

    class VAsEps(torch.nn.Module):
        config, dtype = unet.config, unet.dtype

        def forward(self, x, t, **kwargs):
            v = unet(x, t, **kwargs).sample
            return type("Out", (), {"sample": a[t].sqrt() * v + (1 - a[t]).sqrt() * x})

    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    _, _, latents, noises = reference_inversion(
        InversionXLPipeline.from_pipe(pipe, unet=VAsEps()), image, PROMPTS, 3.0
    )
    inv = v_pred.invert(image, PROMPTS, STEPS, 3.0)
    torch.testing.assert_close(inv.trajectory, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inv.noises, noises, rtol=1e-4, atol=1e-4)
    sample_pred = InversionXLPipeline.from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    )
    with pytest.raises(ValueError, match="not 'sample'"):
        sample_pred.invert(image, PROMPTS, STEPS)


def test_time_ids_reach_the_unet(pipe):
    images = pil_images(seed=5)
    default = pipe.invert(images, PROMPTS, num_inference_steps=3).latents
    same = pipe.invert(images, PROMPTS, num_inference_steps=3, original_size=(16, 16), target_size=(16, 16)).latents
    other = pipe.invert(images, PROMPTS, num_inference_steps=3, original_size=(1024, 768)).latents
    cropped = pipe.invert(images, PROMPTS, num_inference_steps=3, crops_coords_top_left=(4, 0)).latents
    torch.testing.assert_close(same, default)  # the default is the image's own size
    assert (other - default).abs().max() > 1e-4 and (cropped - default).abs().max() > 1e-4


def test_fp16_vae_is_upcast_to_encode(pipe):
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    vae_16 = copy.deepcopy(pipe.vae).half()
    # built directly: from_pipe would cast the VAE back to the other components' dtype
    half = InversionXLPipeline(**{**pipe.components, "vae": vae_16})
    rounded = InversionXLPipeline(**{**pipe.components, "vae": copy.deepcopy(vae_16).float()})
    assert half.vae.config.force_upcast
    for p in (half, rounded):
        p.set_progress_bar_config(disable=True)
    got = half.invert(image, PROMPTS[0], num_inference_steps=2).image_latents
    assert half.vae.dtype == torch.float16  # given back as it was
    # encoded in fp32 with the fp16 weights, exactly as an fp32 VAE holding the same (rounded) weights
    torch.testing.assert_close(got, rounded.invert(image, PROMPTS[0], num_inference_steps=2).image_latents)


def test_bad_inputs_are_refused(pipe):
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        pipe.invert(pil_images(), PROMPTS + ["a third"], num_inference_steps=2)
    with pytest.raises(ValueError, match="exactly one"):
        pipe.invert(pil_images(), num_inference_steps=2)
    embeds, _, _, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe.invert(pil_images(), prompt_embeds=embeds, num_inference_steps=2)


def test_custom_pipeline_and_from_pipe_give_an_inverting_pipeline(pipe, tiny_sdxl_dir, tmp_path, monkeypatch):
    from diffusers.utils import dynamic_modules_utils

    # diffusers copies the file into its modules cache and imports it from there; keep that cache private
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    images = pil_images(seed=2)
    expected = pipe.invert(images, PROMPTS, num_inference_steps=3).trajectory

    loaded = DiffusionPipeline.from_pretrained(
        tiny_sdxl_dir, custom_pipeline=PIPELINE_FILE, trust_remote_code=True, add_watermarker=False
    )
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    piped = InversionXLPipeline.from_pipe(stock)
    assert type(loaded).__module__.startswith("diffusers_modules")  # imported from the copy, not this repo's file
    assert piped.unet is stock.unet
    for p in (loaded, piped):
        assert type(p).__name__ == "InversionXLPipeline" and isinstance(p, StableDiffusionXLPipeline)
        p.set_progress_bar_config(disable=True)
        torch.testing.assert_close(p.invert(images, PROMPTS, num_inference_steps=3).trajectory, expected)
