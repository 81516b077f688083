"""InversionPipeline on the tiny Stable Diffusion: exact where the answer is known, equal to diffusers' own DDIM
inversion where it is not, and loadable the ways diffusers users load pipelines."""

import copy
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from diffusers import (  # noqa: E402
    DDIMInverseScheduler,
    DDIMScheduler,
    DiffusionPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from pipeline_inversion import InversionPipeline  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_FILE = os.path.join(REPO, "pipeline_inversion.py")
STEPS = 10
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that wait for
    # each other made this file 5x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    pipe = InversionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pil_images(n=2, size=16, seed=0):
    # 16 px: the tiny VAE halves, so latents are the UNet's own 8 x 8 (the default size of __call__)
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def constant_eps(pipe, seed=0):
    """Makes eps(x, t, c) a constant vector: the UNet's last layer outputs its bias alone."""
    c = torch.randn(4, generator=torch.Generator().manual_seed(seed)) * 0.5
    pipe.unet.conv_out.weight.data.zero_()
    pipe.unet.conv_out.bias.data.copy_(c)
    return c.reshape(1, 4, 1, 1)


def assert_reconstructs(pipe, images, guidance_scale):
    inv = pipe.invert(images, PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale)
    out = pipe(
        PROMPTS,
        latents=inv.latents,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        output_type="latent",
    ).images
    assert (inv.latents - inv.image_latents).abs().max() > 0.5  # it did go somewhere
    torch.testing.assert_close(out, inv.image_latents, rtol=0, atol=1e-5)
    return inv


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_invert_then_call_reconstructs_when_eps_is_known(pipe, guidance_scale):
    known = InversionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet))
    c = constant_eps(known)
    inv = assert_reconstructs(known, pil_images(), guidance_scale)

    assert inv.trajectory.shape == inv.noises.shape == (STEPS, 2, 4, 8, 8)
    assert inv.timesteps.tolist() == sorted(inv.timesteps.tolist()) and len(inv.timesteps) == STEPS
    torch.testing.assert_close(inv.noises, c.expand_as(inv.noises))
    # with a constant eps the DDIM relation telescopes: x_N / sqrt(a_N) - z0 / sqrt(a_0) = c * (s(a_N) - s(a_0)),
    # s(a) = sqrt(1 - a) / sqrt(a), a_0 = alphas_cumprod[0] (set_alpha_to_one False), a_N at the top label
    a = known.scheduler.alphas_cumprod
    a_0, a_N = a[0], a[inv.timesteps[-1]]
    s = lambda a: ((1 - a) / a).sqrt()  # noqa: E731
    expected = a_N.sqrt() * (inv.image_latents / a_0.sqrt() + c * (s(a_N) - s(a_0)))
    torch.testing.assert_close(inv.latents, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inv.trajectory[-1], inv.latents)
    # z0 is the VAE mean, scaled: the same for every call
    torch.testing.assert_close(
        known.invert(pil_images(), PROMPTS, num_inference_steps=2).image_latents, inv.image_latents
    )


def reference_inversion(pipe, image, prompts, guidance_scale):
    """DDIM inversion from diffusers' DDIMInverseScheduler and direct text-encoder / UNet calls."""
    vae, unet = pipe.vae, pipe.unet

    def embed(texts):
        ids = pipe.tokenizer(
            texts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pipe.text_encoder(ids)[0]

    scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    cond, null = embed(prompts), embed([""] * len(prompts))
    z0 = vae.encode(image).latent_dist.mean * vae.config.scaling_factor

    x, latents, noises = z0, [], []
    for t in scheduler.timesteps:
        eps = unet(x, t, encoder_hidden_states=cond).sample
        if guidance_scale != 1.0:
            eps_null = unet(x, t, encoder_hidden_states=null).sample
            eps = eps_null + guidance_scale * (eps - eps_null)
        x = scheduler.step(eps, t, x).prev_sample
        latents.append(x)
        noises.append(eps)
    return z0, scheduler.timesteps, torch.stack(latents), torch.stack(noises)


@pytest.mark.parametrize("guidance_scale,prompts", [(1.0, PROMPTS), (3.0, PROMPTS[:1])])
@torch.no_grad()
def test_invert_matches_ddim_inverse_scheduler(pipe, guidance_scale, prompts):
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # a tensor in [-1, 1]
    z0, timesteps, latents, noises = reference_inversion(pipe, image, prompts * (2 // len(prompts)), guidance_scale)

    pipe.scheduler.set_timesteps(4)
    inv = pipe.invert(image, prompts if len(prompts) > 1 else prompts[0], STEPS, guidance_scale)
    torch.testing.assert_close(inv.image_latents, z0)
    assert inv.timesteps.tolist() == timesteps.tolist()
    # 1e-4: the pipeline batches the null and the caption in one UNet call, the reference makes two
    torch.testing.assert_close(inv.trajectory, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inv.noises, noises, rtol=1e-4, atol=1e-4)
    # the grid came from a fresh scheduler: the pipeline's own keeps its state
    assert pipe.scheduler.num_inference_steps == 4 and len(pipe.scheduler.timesteps) == 4

    embeds, null_embeds = pipe.encode_prompt(prompts, "cpu", 1, True)
    by_embeds = pipe.invert(
        image,
        prompt_embeds=embeds,
        negative_prompt_embeds=null_embeds,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
    )
    torch.testing.assert_close(by_embeds.trajectory, inv.trajectory)

    as_tuple = pipe.invert(
        image, prompts if len(prompts) > 1 else prompts[0], STEPS, guidance_scale, return_dict=False
    )
    for field, value in zip(["latents", "trajectory", "noises", "timesteps", "image_latents"], as_tuple):
        torch.testing.assert_close(value, inv[field])


def test_custom_pipeline_and_from_pipe_give_an_inverting_pipeline(pipe, tiny_sd_dir, tmp_path, monkeypatch):
    from diffusers.utils import dynamic_modules_utils

    # diffusers copies the file into its modules cache and imports it from there; keep that cache private
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    images = pil_images(seed=2)
    expected = pipe.invert(images, PROMPTS, num_inference_steps=3).trajectory

    # diffusers counts a local file as remote code: without trust_remote_code it raises
    loaded = DiffusionPipeline.from_pretrained(tiny_sd_dir, custom_pipeline=PIPELINE_FILE, trust_remote_code=True)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    piped = InversionPipeline.from_pipe(stock)
    piped_by_file = DiffusionPipeline.from_pipe(stock, custom_pipeline=PIPELINE_FILE, trust_remote_code=True)

    assert type(loaded).__module__.startswith("diffusers_modules")  # imported from the copy, not this repo's file
    assert piped.unet is stock.unet and piped_by_file.unet is stock.unet  # from_pipe shares, copies nothing
    for p in (loaded, piped, piped_by_file):
        assert type(p).__name__ == "InversionPipeline" and isinstance(p, StableDiffusionPipeline)
        p.set_progress_bar_config(disable=True)
        torch.testing.assert_close(p.invert(images, PROMPTS, num_inference_steps=3).trajectory, expected)


def test_non_ddim_scheduler_is_replaced_and_reconstructs(pipe):
    pndm = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # what SD 1.5 ships
    stock = StableDiffusionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet), scheduler=pndm)

    inverting = InversionPipeline.from_pipe(stock)
    inverting.set_progress_bar_config(disable=True)
    assert type(inverting.scheduler) is DDIMScheduler and type(stock.scheduler) is PNDMScheduler
    assert inverting.scheduler.config.beta_schedule == "scaled_linear"
    torch.testing.assert_close(inverting.scheduler.alphas_cumprod, stock.scheduler.alphas_cumprod)

    constant_eps(inverting)
    assert_reconstructs(inverting, pil_images(seed=3), guidance_scale=1.0)


@torch.no_grad()
def test_a_v_prediction_model_inverts_as_ddim_inverse_scheduler_does(pipe):
    """SD 2.x's 768-v models: the walk equals diffusers' own v-prediction inversion, and ``noises`` are eps."""
    v_pred = InversionPipeline.from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    )
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    # v -> eps at the level of the label the UNet was given, eps = sqrt(a_t) v + sqrt(1 - a_t) x (as sampling
    # converts it), then diffusers' epsilon inversion step. (DDIMInverseScheduler's own v branch converts at the
    # input's lower level instead, which is not what the model was told.)
    unet, a = v_pred.unet, v_pred.scheduler.alphas_cumprod

    class VAsEps(torch.nn.Module):
        config, dtype = unet.config, unet.dtype

        def forward(self, x, t, encoder_hidden_states):
            v = unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
            return type("Out", (), {"sample": a[t].sqrt() * v + (1 - a[t]).sqrt() * x})

    as_eps = InversionPipeline.from_pipe(pipe, unet=VAsEps())
    _, _, latents, noises = reference_inversion(as_eps, image, PROMPTS, 3.0)
    inv = v_pred.invert(image, PROMPTS, STEPS, 3.0)
    torch.testing.assert_close(inv.trajectory, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inv.noises, noises, rtol=1e-4, atol=1e-4)
    eps_pred = pipe.invert(image, PROMPTS, STEPS, 3.0)  # the same UNet read as eps walks elsewhere
    assert (eps_pred.trajectory - inv.trajectory).abs().max() > 1e-2


def test_bad_inputs_are_refused(pipe):
    sample_pred = InversionPipeline.from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    )
    with pytest.raises(ValueError, match="epsilon- or v-prediction model, not 'sample'"):
        sample_pred.invert(pil_images(), PROMPTS, num_inference_steps=2)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        pipe.invert(pil_images(), PROMPTS + ["a third"], num_inference_steps=2)
    with pytest.raises(ValueError, match="exactly one"):
        pipe.invert(pil_images(), num_inference_steps=2)


def test_load_lora_weights_changes_the_inversion(pipe, tiny_sd_dir, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(4)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)  # peft starts B at 0, an adapter that changes nothing
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )
    images = pil_images(seed=4)
    with_adapter = InversionPipeline.from_pipe(pipe, unet=unet)
    with_adapter.set_progress_bar_config(disable=True)
    expected = with_adapter.invert(images, PROMPTS, num_inference_steps=3).latents

    fresh = InversionPipeline.from_pretrained(tiny_sd_dir)
    fresh.set_progress_bar_config(disable=True)
    before = fresh.invert(images, PROMPTS, num_inference_steps=3).latents
    fresh.load_lora_weights(str(tmp_path))
    after = fresh.invert(images, PROMPTS, num_inference_steps=3).latents

    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    fresh.unload_lora_weights()
    torch.testing.assert_close(fresh.invert(images, PROMPTS, num_inference_steps=3).latents, before)
