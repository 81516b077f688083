"""InversionSD3Pipeline on the tiny SD3: exact where the velocity is known, equal to an Euler inversion written from
FlowMatchEulerDiscreteScheduler's own grid where it is not, the grid `__call__` walks (dynamic shift included), a
loaded LoRA that reaches it, higher orders that pay for themselves, and loadable as a diffusers custom pipeline."""

import copy
import os
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    StableDiffusion3Pipeline,
)
from PIL import Image

from pipeline_inversion_sd3 import InversionSD3Pipeline


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_FILE = os.path.join(REPO, "pipeline_inversion_sd3.py")
STEPS = 10
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def pipe(tiny_sd3_dir):
    pipe = InversionSD3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pil_images(n=2, size=32, seed=0):
    # 32 px: the tiny VAE halves, so latents are 16 x 16, 8 x 8 patches of the transformer
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def as_tensor(images):
    """PIL images to [-1, 1], written out rather than read through the pipeline's image processor."""
    return torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images]
    )


def rmse(a, b):
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


def sample_back(pipe, inv, steps, guidance_scale, **kwargs):
    return pipe(
        PROMPTS,
        latents=inv.latents,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=32,
        width=32,
        output_type="latent",
        **kwargs,
    ).images


def known_velocity(s, pooled):
    """A velocity of the level ``s`` [B] and of the conditioning (its pooled projection [B, D]), not of the latent."""
    c = torch.tensor([0.7, -0.4, 0.2, 0.5]).view(1, 4, 1, 1)
    s, cond = s.view(-1, 1, 1, 1), pooled.mean(1).view(-1, 1, 1, 1)
    return c * torch.cos(3 * s) + (1 - c) * s**2 + 2 * cond


def with_known_velocity(pipe, monkeypatch):
    known = InversionSD3Pipeline.from_pipe(pipe, transformer=copy.deepcopy(pipe.transformer))

    def forward(hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None, **kwargs):
        v = known_velocity(timestep.float() / 1000, pooled_projections).expand_as(hidden_states)
        return (v,) if not kwargs.get("return_dict", True) else type("Out", (), {"sample": v})

    monkeypatch.setattr(known.transformer, "forward", forward)
    return known


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_invert_then_call_reconstructs_when_the_velocity_is_known(pipe, guidance_scale, order, monkeypatch):
    known = with_known_velocity(pipe, monkeypatch)
    known.scheduler.set_timesteps(4)
    inv = known.invert(pil_images(), PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, order=order)

    assert inv.trajectory.shape == inv.velocities.shape == (STEPS, 2, 4, 16, 16)
    torch.testing.assert_close(inv.trajectory[-1], inv.latents)
    # the grid came from a fresh scheduler: the pipeline's own keeps its state
    assert known.scheduler.num_inference_steps == 4 and len(known.scheduler.timesteps) == 4
    # the labels are the sampler's sigmas, ascending, from its smallest to 1
    sampler = FlowMatchEulerDiscreteScheduler.from_config(known.scheduler.config)
    sampler.set_timesteps(STEPS)
    torch.testing.assert_close(inv.timesteps, sampler.sigmas[:-1].flip(0), rtol=0, atol=0)

    # the guided velocity of each level, and the walk it gives: x_N = z0 + sum_i (s_i - s_{i-1}) v(s_i)
    embeds = known.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    v_text = known_velocity(inv.timesteps.repeat_interleave(2), embeds[2].repeat(STEPS, 1))
    v_null = known_velocity(inv.timesteps.repeat_interleave(2), embeds[3].repeat(STEPS, 1))
    v = v_text if guidance_scale == 1.0 else v_null + guidance_scale * (v_text - v_null)
    v = v.view(STEPS, 2, 4, 1, 1).expand_as(inv.velocities)  # [N, B, C, h, w]
    torch.testing.assert_close(inv.velocities, v)
    steps = torch.diff(torch.cat([torch.zeros(1), inv.timesteps])).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(inv.latents, inv.image_latents + (steps * v).sum(0), rtol=1e-5, atol=1e-5)

    out = sample_back(known, inv, STEPS, guidance_scale)
    assert rmse(inv.latents, inv.image_latents) > 0.3  # it did go somewhere
    torch.testing.assert_close(out, inv.image_latents, rtol=0, atol=1e-5)


def test_image_latents_are_the_normalised_vae_mean(pipe):
    image = as_tensor(pil_images(seed=3))
    vae = pipe.vae
    z0 = (vae.encode(image).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    assert vae.config.shift_factor != 0 and vae.config.scaling_factor != 1  # the test would miss either otherwise
    torch.testing.assert_close(pipe.invert(pil_images(seed=3), PROMPTS, num_inference_steps=2).image_latents, z0)


@torch.no_grad()
def reference_inversion(pipe, image, guidance_scale):
    """Euler inversion from FlowMatchEulerDiscreteScheduler's own grid, reversed, and direct transformer calls:
    ``x += (s_next - s) * v(x, s_next)``."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    timesteps, sigmas = scheduler.timesteps.flip(0), scheduler.sigmas.flip(0)
    assert sigmas[0] == 0
    embeds, null_embeds, pooled, null_pooled = pipe.encode_prompt(PROMPTS, None, None)
    vae = pipe.vae
    x = z0 = (vae.encode(image).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor

    def transformer(x, t, embeds, pooled):
        return pipe.transformer(
            hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample

    latents, velocities = [], []
    for i, t in enumerate(timesteps):
        v = transformer(x, t, embeds, pooled)
        if guidance_scale != 1.0:
            v_null = transformer(x, t, null_embeds, null_pooled)
            v = v_null + guidance_scale * (v - v_null)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        latents.append(x)
        velocities.append(v)
    return z0, timesteps, torch.stack(latents), torch.stack(velocities)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_invert_matches_an_euler_inversion_written_from_the_scheduler(pipe, guidance_scale):
    images = pil_images(seed=1)
    z0, timesteps, latents, velocities = reference_inversion(pipe, as_tensor(images), guidance_scale)
    inv = pipe.invert(images, PROMPTS, STEPS, guidance_scale)
    torch.testing.assert_close(inv.image_latents, z0)
    torch.testing.assert_close(inv.timesteps * 1000, timesteps, rtol=0, atol=0)
    # 1e-4: the pipeline batches the null and the caption in one transformer call, the reference makes two
    torch.testing.assert_close(inv.trajectory, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inv.velocities, velocities, rtol=1e-4, atol=1e-4)
    assert rmse(inv.latents, z0) > 0.3


def test_embeds_latents_one_prompt_and_tuple_give_the_same_walk(pipe):
    images = pil_images(seed=2)
    inv = pipe.invert(images, [PROMPTS[0]] * 2, num_inference_steps=3, guidance_scale=2.0)

    one_prompt = pipe.invert(images, PROMPTS[0], num_inference_steps=3, guidance_scale=2.0)
    embeds, null_embeds, pooled, null_pooled = pipe.encode_prompt(PROMPTS[0], None, None)
    by_embeds = pipe.invert(
        images,
        prompt_embeds=embeds,
        negative_prompt_embeds=null_embeds,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=null_pooled,
        num_inference_steps=3,
        guidance_scale=2.0,
    )
    # a tensor with the VAE's latent channels is z0 itself
    from_latents = pipe.invert(inv.image_latents, PROMPTS[0], num_inference_steps=3, guidance_scale=2.0)
    for other in (one_prompt, by_embeds, from_latents):
        torch.testing.assert_close(other.trajectory, inv.trajectory, rtol=1e-5, atol=1e-5)

    as_tuple = pipe.invert(images, PROMPTS[0], num_inference_steps=3, guidance_scale=2.0, return_dict=False)
    for field, value in zip(["latents", "trajectory", "velocities", "timesteps", "image_latents"], as_tuple):
        torch.testing.assert_close(value, one_prompt[field])
    # the negative prompt is the null conditioning
    other_null = pipe.invert(images, PROMPTS[0], num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry")
    assert rmse(other_null.latents, inv.latents) > 1e-4


def test_dynamic_shift_is_the_one_call_uses(pipe, monkeypatch):
    """SD3.5's configs shift by a fixed 3; a scheduler with `use_dynamic_shifting` (FLUX-style) gets `mu` from the
    image's sequence length, computed as `__call__` computes it."""
    dynamic = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    )
    known = with_known_velocity(InversionSD3Pipeline.from_pipe(pipe, scheduler=dynamic), monkeypatch)
    inv = known.invert(pil_images(seed=4), PROMPTS, num_inference_steps=STEPS)
    out = sample_back(known, inv, STEPS, 1.0)
    # __call__ left its grid in the scheduler: the same levels, walked down
    torch.testing.assert_close(inv.timesteps, known.scheduler.sigmas[:-1].flip(0), rtol=0, atol=0)
    torch.testing.assert_close(out, inv.image_latents, rtol=0, atol=1e-5)
    static = pipe.invert(pil_images(seed=4), PROMPTS, num_inference_steps=STEPS).timesteps
    assert (inv.timesteps - static).abs().max() > 1e-2

    given = known.invert(pil_images(seed=4), PROMPTS, num_inference_steps=STEPS, mu=1.5)
    assert (given.timesteps - inv.timesteps).abs().max() > 1e-3
    torch.testing.assert_close(sample_back(known, given, STEPS, 1.0, mu=1.5), given.image_latents, rtol=0, atol=1e-5)


def test_higher_orders_reconstruct_better_at_equal_evaluations(pipe):
    """Order k spends k evaluations a step on the sampler's implicit step; at equal evaluations it comes back closer
    than first order, and its error falls as N^-k (measured: order 1 halves from 10 to 20 steps, order 2 falls 4x)."""
    images = pil_images(seed=5)

    def error(steps, order):
        inv = pipe.invert(images, PROMPTS, num_inference_steps=steps, order=order)
        return rmse(sample_back(pipe, inv, steps, 1.0), inv.image_latents)

    first = {steps: error(steps, 1) for steps in (5, 10, 20)}
    second = {steps: error(steps, 2) for steps in (5, 10)}
    assert second[5] < 0.6 * first[10] and second[10] < 0.35 * first[20]  # measured 0.41 and 0.20
    assert 1.7 < first[10] / first[20] < 2.5 and second[5] / second[10] > 3.2
    assert error(5, 3) < 0.5 * second[5]


def test_non_euler_scheduler_is_replaced(pipe, monkeypatch):
    heun = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    stock = StableDiffusion3Pipeline.from_pipe(pipe, scheduler=heun)
    inverting = InversionSD3Pipeline.from_pipe(stock)
    assert type(inverting.scheduler) is FlowMatchEulerDiscreteScheduler and type(stock.scheduler) is type(heun)
    assert inverting.scheduler.config.shift == 3.0
    known = with_known_velocity(inverting, monkeypatch)
    inv = known.invert(pil_images(seed=6), PROMPTS, num_inference_steps=4)
    torch.testing.assert_close(sample_back(known, inv, 4, 1.0), inv.image_latents, rtol=0, atol=1e-5)


def test_bad_inputs_are_refused(pipe):
    with pytest.raises(ValueError, match="exactly one"):
        pipe.invert(pil_images(), num_inference_steps=2)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        pipe.invert(pil_images(), PROMPTS + ["a third"], num_inference_steps=2)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        pipe.invert(pil_images(), PROMPTS + ["a third"], num_inference_steps=2, guidance_scale=2.0)
    embeds, _, _, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe.invert(pil_images(), prompt_embeds=embeds, num_inference_steps=2)
    with pytest.raises(ValueError, match="velocity evaluations per step"):
        pipe.invert(pil_images(), PROMPTS, num_inference_steps=2, order=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe.invert(pil_images(size=34), PROMPTS, num_inference_steps=2)  # 17 x 17 latents
    stochastic = InversionSD3Pipeline.from_pipe(
        pipe, scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    )
    with pytest.raises(ValueError, match="stochastic_sampling"):
        stochastic.invert(pil_images(), PROMPTS, num_inference_steps=2)


def test_load_lora_weights_changes_the_inversion(pipe, tiny_sd3_dir, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = copy.deepcopy(pipe.transformer)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(4)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)  # peft starts B at 0, an adapter that changes nothing
    StableDiffusion3Pipeline.save_lora_weights(
        str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(transformer)
    )
    images = pil_images(seed=7)
    with_adapter = InversionSD3Pipeline.from_pipe(pipe, transformer=transformer)
    expected = with_adapter.invert(images, PROMPTS, num_inference_steps=3).latents

    fresh = InversionSD3Pipeline.from_pretrained(tiny_sd3_dir)
    fresh.set_progress_bar_config(disable=True)
    before = fresh.invert(images, PROMPTS, num_inference_steps=3).latents
    fresh.load_lora_weights(str(tmp_path))
    after = fresh.invert(images, PROMPTS, num_inference_steps=3).latents

    assert rmse(after, before) > 1e-2
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    # `joint_attention_kwargs={"scale": 0}` switches the adapter off, as in `__call__`
    off = fresh.invert(images, PROMPTS, num_inference_steps=3, joint_attention_kwargs={"scale": 0.0}).latents
    torch.testing.assert_close(off, before, rtol=1e-5, atol=1e-5)
    fresh.unload_lora_weights()
    torch.testing.assert_close(fresh.invert(images, PROMPTS, num_inference_steps=3).latents, before)


def test_custom_pipeline_and_from_pipe_give_an_inverting_pipeline(pipe, tiny_sd3_dir, tmp_path, monkeypatch):
    from diffusers.utils import dynamic_modules_utils

    # diffusers copies the file into its modules cache and imports it from there; keep that cache private
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    images = pil_images(seed=8)
    expected = pipe.invert(images, PROMPTS, num_inference_steps=3).trajectory

    # diffusers counts a local file as remote code: without trust_remote_code it raises
    loaded = DiffusionPipeline.from_pretrained(tiny_sd3_dir, custom_pipeline=PIPELINE_FILE, trust_remote_code=True)
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    piped = InversionSD3Pipeline.from_pipe(stock)
    piped_by_file = DiffusionPipeline.from_pipe(stock, custom_pipeline=PIPELINE_FILE, trust_remote_code=True)

    assert type(loaded).__module__.startswith("diffusers_modules")  # imported from the copy, not this repo's file
    assert piped.transformer is stock.transformer and piped_by_file.transformer is stock.transformer
    for p in (loaded, piped, piped_by_file):
        assert type(p).__name__ == "InversionSD3Pipeline" and isinstance(p, StableDiffusion3Pipeline)
        p.set_progress_bar_config(disable=True)
        torch.testing.assert_close(p.invert(images, PROMPTS, num_inference_steps=3).trajectory, expected)
