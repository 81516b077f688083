"""Stable Diffusion XL with deterministic DDIM inversion: image -> noise latents that sample back to the image.

A diffusers custom pipeline: one file holding one ``DiffusionPipeline`` subclass and importing nothing but torch,
diffusers, numpy, PIL and the standard library, because diffusers copies the file alone into its modules cache
(``HF_MODULES_CACHE``) and imports it from there. Load it by its path, or by the id of a Hub repo (or the path of a
folder) that holds it under the name diffusers looks for there, ``pipeline.py``::

    pipe = DiffusionPipeline.from_pretrained(
        model, custom_pipeline="path/to/pipeline_inversion_sdxl.py", trust_remote_code=True
    )
    pipe = DiffusionPipeline.from_pretrained(model, custom_pipeline="<user>/<repo>", trust_remote_code=True)
    inv = pipe.invert(image, prompt, num_inference_steps=50)
    same = pipe(prompt, latents=inv.latents, num_inference_steps=50, guidance_scale=1.0).images[0]

The inversion is deterministic DDIM (Song et al. 2021, arXiv 2010.02502, eq. 12 with eta = 0). Sampling (denoising)
and inversion are the same linear relation between two latents at noise levels ``a_s < a_t`` (``a`` =
``alphas_cumprod``, larger means cleaner) and one noise prediction ``e``::

    x_s / sqrt(a_s) - x_t / sqrt(a_t) = e * (sqrt(1 - a_s) / sqrt(a_s) - sqrt(1 - a_t) / sqrt(a_t))

so one pure function, ``ddim_move``, moves a latent between two levels. The DDIM functions and the output dataclass
are marked copies of those of ``pipeline_inversion.py``, the SD 1.x/2.x pipeline (``# Copied from
pipeline_inversion.<name>``, kept equal by the repository's ``scripts/check_copies.py``), so inversion means one
thing for both pipelines and the training scripts.
"""

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Union, get_type_hints

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging, replace_example_docstring


logger = logging.get_logger(__name__)

# The transformers classes of the components, read from StableDiffusionXLPipeline's signature rather than imported,
# so that this file needs no transformers import: the annotations of `__init__` must be the real classes, because
# `from_pretrained` checks each component against them and `from_pipe` leaves behind a model whose type differs
_COMPONENT_TYPES = get_type_hints(StableDiffusionXLPipeline.__init__)
CLIPTextModel = _COMPONENT_TYPES["text_encoder"]
CLIPTextModelWithProjection = _COMPONENT_TYPES["text_encoder_2"]
CLIPTokenizer = _COMPONENT_TYPES["tokenizer"]
CLIPImageProcessor = _COMPONENT_TYPES["feature_extractor"]
CLIPVisionModelWithProjection = _COMPONENT_TYPES["image_encoder"]


# Copied from pipeline_inversion.Alpha
Alpha = Union[float, torch.Tensor]


# Copied from pipeline_inversion._as_tensor
def _as_tensor(a: Alpha, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=torch.float32, device=like.device)
    # per-sample alphas of shape [B] broadcast over the remaining dims of x
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a


# Copied from pipeline_inversion.PREDICTION_TYPES
PREDICTION_TYPES = ("epsilon", "v_prediction")


# Copied from pipeline_inversion.eps_from_prediction
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


# Copied from pipeline_inversion.ddim_move
def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: Alpha, a_to: Alpha) -> torch.Tensor:
    """Moves ``x`` from level ``a_from`` to level ``a_to`` along the DDIM ODE with noise ``eps``.

    A move between equal levels returns ``x`` exactly, also at a zero-terminal-SNR schedule's top level, where
    ``a = 0`` would otherwise divide 0 by 0 (InPO steps to its sampled level even when already there)."""
    a_from, a_to = _as_tensor(a_from, x), _as_tensor(a_to, x)
    stay = a_from == a_to
    x0_hat = (x.float() - (1 - a_from).sqrt() * eps.float()) / torch.where(stay, 1.0, a_from).sqrt()
    moved = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps.float()
    return torch.where(stay, x.float(), moved).to(x.dtype)


# Copied from pipeline_inversion.ddim_inverse_step
def ddim_inverse_step(x_s: torch.Tensor, eps: torch.Tensor, a_s: Alpha, a_t: Alpha) -> torch.Tensor:
    """Inverts ``x_s`` (level ``a_s``) up to the higher noise level ``a_t``.

    The noise is predicted at the lower latent with the upper label, ``eps = eps(x_s, t)`` (the convention of
    null-text inversion, of diffusers' ``DDIMInverseScheduler`` and of the official Inversion-DPO code).
    Equals ``DDIMInverseScheduler.step(eps, t, x_s).prev_sample``.
    """
    return ddim_move(x_s, eps, a_s, a_t)


# Copied from pipeline_inversion.DDIMGrid
class DDIMGrid(NamedTuple):
    """The N-step grid of a DDIM scheduler, ascending in noise.

    ``timesteps[i]`` is the label of level ``i + 1``; ``alphas[0]`` is the clean level (the scheduler's
    ``final_alpha_cumprod``, where sampling ends and inversion starts) and ``alphas[i + 1]`` that of
    ``timesteps[i]``.
    """

    timesteps: torch.Tensor  # [N] long, ascending
    alphas: torch.Tensor  # [N + 1] float32


# Copied from pipeline_inversion.ddim_grid
def ddim_grid(scheduler, num_steps: int, device: Union[str, torch.device] = "cpu") -> DDIMGrid:
    """Reads the grid from a (copy of a) ``DDIMScheduler``, so the spacing and offset are the model's own."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.flip(0).to(torch.long)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    clean = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).reshape(1)
    alphas = torch.cat([clean, alphas_cumprod[timesteps]])
    return DDIMGrid(timesteps.to(device), alphas.to(device))


# Copied from pipeline_inversion.InversionTrajectory
class InversionTrajectory(NamedTuple):
    latents: List[torch.Tensor]  # x_1 .. x_N, x_i at level i
    noises: List[torch.Tensor]  # e_1 .. e_N, e_i = eps(x_{i-1}, t_i) moved x_{i-1} to x_i


# Copied from pipeline_inversion.ddim_invert
def ddim_invert(eps_fn: Callable, z0: torch.Tensor, grid: DDIMGrid) -> InversionTrajectory:
    """Walks ``z0`` up the whole grid and keeps every latent and every noise used."""
    x, latents, noises = z0, [], []
    for i, t in enumerate(grid.timesteps):
        e = eps_fn(x, t)
        x = ddim_inverse_step(x, e, grid.alphas[i], grid.alphas[i + 1])
        latents.append(x)
        noises.append(e)
    return InversionTrajectory(latents, noises)


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import load_image

        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0",
        ...     custom_pipeline="/path/to/pipeline_inversion_sdxl.py",  # or a Hub repo id holding it as pipeline.py
        ...     trust_remote_code=True,
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")

        >>> image = load_image("cat.png").resize((1024, 1024))
        >>> prompt = "a photo of a cat"
        >>> inv = pipe.invert(image, prompt, num_inference_steps=50)
        >>> # DDIM from the inverted noise, same prompt, steps and guidance, gives the image back
        >>> reconstruction = pipe(prompt, latents=inv.latents, num_inference_steps=50, guidance_scale=1.0).images[0]
        ```
"""


# Copied from pipeline_inversion.InversionPipelineOutput with InversionPipeline.invert->InversionXLPipeline.invert
@dataclass
class InversionPipelineOutput(BaseOutput):
    """
    Output of [`InversionXLPipeline.invert`].

    Args:
        latents (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            The noise latents at the top of the grid, `x_N`; pass them as `latents=` to `__call__` to sample back.
        trajectory (`torch.Tensor` of shape `(num_inference_steps, batch_size, channels, height, width)`):
            Every latent of the inversion, `x_1 .. x_N`, ascending in noise (`trajectory[-1]` is `latents`).
        noises (`torch.Tensor` of shape `(num_inference_steps, batch_size, channels, height, width)`):
            The (guided) noise prediction `e_i = eps(x_{i-1}, t_i)` that moved `x_{i-1}` to `x_i`; a DDIM step from
            `x_i` with `e_i` lands exactly on `x_{i-1}`.
        timesteps (`torch.Tensor` of shape `(num_inference_steps,)`):
            The timestep label `t_i` of each level, ascending.
        image_latents (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            `z0`: the VAE latent distribution's mean times the VAE scaling factor, where the inversion starts.
    """

    latents: torch.Tensor
    trajectory: torch.Tensor
    noises: torch.Tensor
    timesteps: torch.Tensor
    image_latents: torch.Tensor


class InversionXLPipeline(StableDiffusionXLPipeline):
    r"""
    Stable Diffusion XL with deterministic DDIM inversion ([`~InversionXLPipeline.invert`]).

    Everything else (prompt encoding, LoRA loading, `__call__`, decoding) is [`StableDiffusionXLPipeline`]'s.
    Inversion is defined by DDIM (eta = 0), so a scheduler that is not a [`DDIMScheduler`] (SDXL ships an
    `EulerDiscreteScheduler`) is replaced by a `DDIMScheduler` built from its config; `__call__` then samples with the
    same DDIM and reconstructs an inverted image.

    Args:
        vae ([`AutoencoderKL`]):
            Variational Auto-Encoder (VAE) model to encode and decode images to and from latent representations.
        text_encoder ([`~transformers.CLIPTextModel`]):
            The first frozen text encoder (its penultimate hidden states).
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`]):
            The second frozen text encoder (its penultimate hidden states and its pooled projection).
        tokenizer ([`~transformers.CLIPTokenizer`]):
            The tokenizer of `text_encoder`.
        tokenizer_2 ([`~transformers.CLIPTokenizer`]):
            The tokenizer of `text_encoder_2`.
        unet ([`UNet2DConditionModel`]):
            A `UNet2DConditionModel` with SDXL's `text_time` added conditioning.
        scheduler ([`SchedulerMixin`]):
            Any scheduler of Stable Diffusion XL; a non-DDIM one is replaced by `DDIMScheduler.from_config` of its
            config.
        force_zeros_for_empty_prompt (`bool`, *optional*, defaults to `True`):
            Whether the null conditioning (the negative prompt when none is given) is all zeros, as SDXL base's.
        add_watermarker (`bool`, *optional*):
            Whether to watermark sampled images with `invisible_watermark` (default: if it is installed).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        if scheduler is not None and not isinstance(scheduler, DDIMScheduler):
            # `invert` walks the DDIM grid, so `__call__` must walk it back with the same DDIM
            logger.info(f"Replacing {scheduler.__class__.__name__} by DDIMScheduler with the same config.")
            scheduler = DDIMScheduler.from_config(scheduler.config)
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )

    def _encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """`z0`: the VAE latent distribution's mean, normalised as `__call__` de-normalises before decoding."""
        # SDXL's VAE overflows in fp16: encode in fp32 when its config asks, as `__call__` decodes
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)
        latents = self.vae.encode(image.to(dtype=self.vae.dtype)).latent_dist.mode()
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            return (latents - mean) * config.scaling_factor / std
        return latents * config.scaling_factor

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def invert(
        self,
        image: PipelineImageInput,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        return_dict: bool = True,
    ):
        r"""
        Inverts images to noise with deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0).

        Starting at `z0`, each step moves the latent from level `t_{i-1}` up to `t_i` with the noise predicted at the
        lower latent and the upper label, `e_i = eps(x_{i-1}, t_i)` (the convention of null-text inversion and of
        [`DDIMInverseScheduler`]). The grid is the `num_inference_steps`-step grid of a fresh `DDIMScheduler` built
        from this pipeline's scheduler config, so the pipeline's own scheduler is left untouched. Sampling back with
        `__call__(prompt, latents=output.latents, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, height=..., width=...)` with the image's size (so that the time ids agree)
        retraces the grid; the reconstruction is exact up to how far each `eps(x_{i-1}, t_i)` is from `eps(x_i, t_i)`.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a list of them):
                The images to invert. Tensors and arrays are taken in `[-1, 1]` (or `[0, 1]`, normalised then) as
                [`VaeImageProcessor.preprocess`] reads them; a tensor with the VAE's latent channels is taken as `z0`
                itself.
            prompt (`str` or `list[str]`, *optional*):
                The caption(s) the inversion is conditioned on: one for all images or one per image. If not
                defined, `prompt_embeds` and `pooled_prompt_embeds` must be passed.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of DDIM steps from `z0` to the noise latents.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance scale of the noise predictions: `eps(null) + g * (eps(c) - eps(null))`.
                `1.0` is the conditional prediction alone (one UNet call per step); above 1 costs two. The null
                conditioning is all zeros unless `negative_prompt` is given (`force_zeros_for_empty_prompt`).
            prompt_2 (`str` or `list[str]`, *optional*):
                The caption(s) for `tokenizer_2` and `text_encoder_2` (default: `prompt`).
            negative_prompt (`str` or `list[str]`, *optional*):
                The null conditioning's text when `guidance_scale > 1`.
            negative_prompt_2 (`str` or `list[str]`, *optional*):
                The same for the second text encoder (default: `negative_prompt`).
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, in place of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, in place of `negative_prompt`.
            pooled_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated pooled text embeddings, with `prompt_embeds`.
            negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative pooled text embeddings, with `negative_prompt_embeds`.
            original_size (`tuple[int, int]`, *optional*):
                SDXL's micro-conditioning `(height, width)` of the original image; defaults to the image's own size.
            crops_coords_top_left (`tuple[int, int]`, *optional*, defaults to (0, 0)):
                SDXL's micro-conditioning crop corner `(top, left)`.
            target_size (`tuple[int, int]`, *optional*):
                SDXL's micro-conditioning `(height, width)` of the target; defaults to the image's own size.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`InversionPipelineOutput`] instead of a plain tuple.

        Examples:

        Returns:
            [`InversionPipelineOutput`] or `tuple`:
                An [`InversionPipelineOutput`] if `return_dict` is `True`, otherwise the tuple `(latents, trajectory,
                noises, timesteps, image_latents)`.
        """
        # 1. Check inputs
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds`, from the same `encode_prompt` call.")
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"DDIM inversion needs an epsilon- or v-prediction model, not {prediction_type!r}.")
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        # 2. Encode the image: the latent distribution's mean, so the inversion is deterministic
        image = self.image_processor.preprocess(image)
        if image.shape[1] == self.vae.config.latent_channels:
            image_latents = image.to(device=device, dtype=self.unet.dtype)
            height, width = (s * self.vae_scale_factor for s in image.shape[-2:])
        else:
            height, width = image.shape[-2:]
            image_latents = self._encode_image(image.to(device=device)).to(self.unet.dtype)
        batch_size = image_latents.shape[0]

        # 3. Encode the prompt, one conditioning per image: text embeddings and pooled embeddings
        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # [2 * P, L, D]: null, then c
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])  # [2 * P, D']
        num_prompts = prompt_embeds.shape[0] // (2 if do_classifier_free_guidance else 1)
        if num_prompts not in (1, batch_size):
            raise ValueError(f"Got {num_prompts} prompts for {batch_size} images: pass one, or one per image.")
        if num_prompts == 1:
            prompt_embeds = prompt_embeds.repeat_interleave(batch_size, dim=0)  # [(2 *) B, L, D]
            pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(batch_size, dim=0)  # [(2 *) B, D']

        # 4. SDXL's micro-conditioning: (original size, crop corner, target size), the same for the null rows
        if self.text_encoder_2 is None:
            text_encoder_projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            text_encoder_projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            tuple(original_size or (height, width)),
            tuple(crops_coords_top_left),
            tuple(target_size or (height, width)),
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=text_encoder_projection_dim,
        )
        added_cond_kwargs = {
            "text_embeds": pooled_prompt_embeds.to(device),
            "time_ids": add_time_ids.to(device).repeat(prompt_embeds.shape[0], 1),  # [(2 *) B, 6]
        }

        # 5. Prepare the grid on a fresh scheduler, so `self.scheduler`'s state (set_timesteps) is untouched
        grid = ddim_grid(DDIMScheduler.from_config(self.scheduler.config), num_inference_steps, device)
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device, torch.float32)

        # 6. Invert: z0 -> x_1 -> ... -> x_N
        with self.progress_bar(total=num_inference_steps) as progress_bar:

            def eps_fn(x, t):
                x_in = torch.cat([x] * 2) if do_classifier_free_guidance else x
                eps = self.unet(
                    x_in,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
                if do_classifier_free_guidance:
                    eps_uncond, eps_text = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                progress_bar.update()
                # a v-prediction model's output (guided in v, which is the same as in eps) as the noise
                return eps_from_prediction(eps, x, alphas_cumprod[t], prediction_type)

            walk = ddim_invert(eps_fn, image_latents, grid)

        # 7. Stack the walk: [N, B, C, h, w]
        trajectory = torch.stack(walk.latents)
        noises = torch.stack(walk.noises)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (trajectory[-1], trajectory, noises, grid.timesteps, image_latents)
        return InversionPipelineOutput(
            latents=trajectory[-1],
            trajectory=trajectory,
            noises=noises,
            timesteps=grid.timesteps,
            image_latents=image_latents,
        )
