"""Stable Diffusion with deterministic DDIM inversion: image -> noise latents that sample back to the image.

A diffusers custom pipeline: one file holding one ``DiffusionPipeline`` subclass and importing nothing but torch,
diffusers, numpy, PIL and the standard library, because diffusers copies the file alone into its modules cache
(``HF_MODULES_CACHE``) and imports it from there. Load it by its path, or by the id of a Hub repo (or the path of a
folder) that holds it under the name diffusers looks for there, ``pipeline.py``::

    pipe = DiffusionPipeline.from_pretrained(
        model, custom_pipeline="path/to/pipeline_inversion.py", trust_remote_code=True
    )
    pipe = DiffusionPipeline.from_pretrained(model, custom_pipeline="<user>/<repo>", trust_remote_code=True)
    inv = pipe.invert(image, prompt, num_inference_steps=50)
    same = pipe(prompt, latents=inv.latents, num_inference_steps=50, guidance_scale=1.0).images[0]

The inversion is deterministic DDIM (Song et al. 2021, arXiv 2010.02502, eq. 12 with eta = 0). Sampling (denoising)
and inversion are the same linear relation between two latents at noise levels ``a_s < a_t`` (``a`` =
``alphas_cumprod``, larger means cleaner) and one noise prediction ``e``::

    x_s / sqrt(a_s) - x_t / sqrt(a_t) = e * (sqrt(1 - a_s) / sqrt(a_s) - sqrt(1 - a_t) / sqrt(a_t))

so one pure function, ``ddim_move``, moves a latent between two levels. The DDIM functions of this file see no
UNet, prompt or scheduler object (a noise predictor is passed in as ``eps_fn(x, t) -> eps``); the repository's
training scripts hold marked copies of them (``# Copied from pipeline_inversion.ddim_move``, kept equal by
``scripts/check_copies.py``), so the inversion a model is trained on and the one this pipeline computes cannot drift
apart.
"""

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Union, get_type_hints

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging, replace_example_docstring


logger = logging.get_logger(__name__)

# The transformers classes of the components, read from StableDiffusionPipeline's signature rather than imported, so
# that this file needs no transformers import: the annotations of `__init__` must be the real classes, because
# `from_pretrained` checks each component against them and `from_pipe` leaves behind a model whose type differs
_COMPONENT_TYPES = get_type_hints(StableDiffusionPipeline.__init__)
CLIPTextModel = _COMPONENT_TYPES["text_encoder"]
CLIPTokenizer = _COMPONENT_TYPES["tokenizer"]
CLIPImageProcessor = _COMPONENT_TYPES["feature_extractor"]
CLIPVisionModelWithProjection = _COMPONENT_TYPES["image_encoder"]


Alpha = Union[float, torch.Tensor]


def _as_tensor(a: Alpha, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=torch.float32, device=like.device)
    # per-sample alphas of shape [B] broadcast over the remaining dims of x
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a


PREDICTION_TYPES = ("epsilon", "v_prediction")


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


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: Alpha, a_to: Alpha) -> torch.Tensor:
    """Moves ``x`` from level ``a_from`` to level ``a_to`` along the DDIM ODE with noise ``eps``.

    A move between equal levels returns ``x`` exactly, also at a zero-terminal-SNR schedule's top level, where
    ``a = 0`` would otherwise divide 0 by 0 (InPO steps to its sampled level even when already there)."""
    a_from, a_to = _as_tensor(a_from, x), _as_tensor(a_to, x)
    stay = a_from == a_to
    x0_hat = (x.float() - (1 - a_from).sqrt() * eps.float()) / torch.where(stay, 1.0, a_from).sqrt()
    moved = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps.float()
    return torch.where(stay, x.float(), moved).to(x.dtype)


def ddim_inverse_step(x_s: torch.Tensor, eps: torch.Tensor, a_s: Alpha, a_t: Alpha) -> torch.Tensor:
    """Inverts ``x_s`` (level ``a_s``) up to the higher noise level ``a_t``.

    The noise is predicted at the lower latent with the upper label, ``eps = eps(x_s, t)`` (the convention of
    null-text inversion, of diffusers' ``DDIMInverseScheduler`` and of the official Inversion-DPO code).
    Equals ``DDIMInverseScheduler.step(eps, t, x_s).prev_sample``.
    """
    return ddim_move(x_s, eps, a_s, a_t)


class DDIMGrid(NamedTuple):
    """The N-step grid of a DDIM scheduler, ascending in noise.

    ``timesteps[i]`` is the label of level ``i + 1``; ``alphas[0]`` is the clean level (the scheduler's
    ``final_alpha_cumprod``, where sampling ends and inversion starts) and ``alphas[i + 1]`` that of
    ``timesteps[i]``.
    """

    timesteps: torch.Tensor  # [N] long, ascending
    alphas: torch.Tensor  # [N + 1] float32


def ddim_grid(scheduler, num_steps: int, device: Union[str, torch.device] = "cpu") -> DDIMGrid:
    """Reads the grid from a (copy of a) ``DDIMScheduler``, so the spacing and offset are the model's own."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.flip(0).to(torch.long)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    clean = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).reshape(1)
    alphas = torch.cat([clean, alphas_cumprod[timesteps]])
    return DDIMGrid(timesteps.to(device), alphas.to(device))


class InversionTrajectory(NamedTuple):
    latents: List[torch.Tensor]  # x_1 .. x_N, x_i at level i
    noises: List[torch.Tensor]  # e_1 .. e_N, e_i = eps(x_{i-1}, t_i) moved x_{i-1} to x_i


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
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...     custom_pipeline="/path/to/pipeline_inversion.py",  # or a Hub repo id holding it as pipeline.py
        ...     trust_remote_code=True,
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")

        >>> image = load_image("cat.png").resize((512, 512))
        >>> prompt = "a photo of a cat"
        >>> inv = pipe.invert(image, prompt, num_inference_steps=50)
        >>> # DDIM from the inverted noise, same prompt, steps and guidance, gives the image back
        >>> reconstruction = pipe(prompt, latents=inv.latents, num_inference_steps=50, guidance_scale=1.0).images[0]
        ```
"""


@dataclass
class InversionPipelineOutput(BaseOutput):
    """
    Output of [`InversionPipeline.invert`].

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


class InversionPipeline(StableDiffusionPipeline):
    r"""
    Stable Diffusion with deterministic DDIM inversion ([`~InversionPipeline.invert`]).

    Everything else (prompt encoding, LoRA and textual-inversion loading, `__call__`, decoding) is
    [`StableDiffusionPipeline`]'s. Inversion is defined by DDIM (eta = 0), so a scheduler that is not a
    [`DDIMScheduler`] (Stable Diffusion 1.5 ships a `PNDMScheduler`) is replaced by a `DDIMScheduler` built from its
    config; `__call__` then samples with the same DDIM and reconstructs an inverted image.

    Args:
        vae ([`AutoencoderKL`]):
            Variational Auto-Encoder (VAE) model to encode and decode images to and from latent representations.
        text_encoder ([`~transformers.CLIPTextModel`]):
            Frozen text-encoder ([clip-vit-large-patch14](https://huggingface.co/openai/clip-vit-large-patch14)).
        tokenizer ([`~transformers.CLIPTokenizer`]):
            A `CLIPTokenizer` to tokenize text.
        unet ([`UNet2DConditionModel`]):
            A `UNet2DConditionModel` to denoise the encoded image latents.
        scheduler ([`SchedulerMixin`]):
            Any scheduler of Stable Diffusion; a non-DDIM one is replaced by `DDIMScheduler.from_config` of its config.
        safety_checker ([`StableDiffusionSafetyChecker`]):
            Classification module that estimates whether generated images could be considered offensive or harmful.
        feature_extractor ([`~transformers.CLIPImageProcessor`]):
            A `CLIPImageProcessor` to extract features from generated images; used as inputs to the `safety_checker`.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
    ):
        if scheduler is not None and not isinstance(scheduler, DDIMScheduler):
            # `invert` walks the DDIM grid, so `__call__` must walk it back with the same DDIM
            logger.info(f"Replacing {scheduler.__class__.__name__} by DDIMScheduler with the same config.")
            scheduler = DDIMScheduler.from_config(scheduler.config)
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def invert(
        self,
        image: PipelineImageInput,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        r"""
        Inverts images to noise with deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0).

        Starting at `z0`, each step moves the latent from level `t_{i-1}` up to `t_i` with the noise predicted at the
        lower latent and the upper label, `e_i = eps(x_{i-1}, t_i)` (the convention of null-text inversion and of
        [`DDIMInverseScheduler`]). The grid is the `num_inference_steps`-step grid of a fresh `DDIMScheduler` built
        from this pipeline's scheduler config, so the pipeline's own scheduler is left untouched. Sampling back with
        `__call__(prompt, latents=output.latents, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale)` retraces the grid (exactly so for `"leading"` timestep spacing, and for
        `"trailing"` when `num_inference_steps` divides `num_train_timesteps`: `DDIMScheduler.step` assumes equal
        gaps between timesteps); the reconstruction is exact up to how far each `eps(x_{i-1}, t_i)` is from
        `eps(x_i, t_i)`.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a list of them):
                The images to invert. Tensors and arrays are taken in `[-1, 1]` (or `[0, 1]`, normalised then) as
                [`VaeImageProcessor.preprocess`] reads them; a tensor with the VAE's latent channels is taken as `z0`
                itself.
            prompt (`str` or `list[str]`, *optional*):
                The caption(s) the inversion is conditioned on: one for all images or one per image. If not
                defined, `prompt_embeds` must be passed.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of DDIM steps from `z0` to the noise latents.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance scale of the noise predictions: `eps(null) + g * (eps(c) - eps(null))`.
                `1.0` is the conditional prediction alone (one UNet call per step); above 1 costs two.
            negative_prompt (`str` or `list[str]`, *optional*):
                The null conditioning when `guidance_scale > 1` (`""` if not defined).
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, in place of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, in place of `negative_prompt`.
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
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"DDIM inversion needs an epsilon- or v-prediction model, not {prediction_type!r}.")
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        # 2. Encode the image: the latent distribution's mean, so the inversion is deterministic
        image = self.image_processor.preprocess(image)
        if image.shape[1] == self.vae.config.latent_channels:
            image_latents = image.to(device=device, dtype=self.unet.dtype)
        else:
            image = image.to(device=device, dtype=self.vae.dtype)
            image_latents = self.vae.encode(image).latent_dist.mode() * self.vae.config.scaling_factor
            image_latents = image_latents.to(self.unet.dtype)
        batch_size = image_latents.shape[0]

        # 3. Encode the prompt, one conditioning per image
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            1,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # [2 * P, L, D]: null, then c
        num_prompts = prompt_embeds.shape[0] // (2 if do_classifier_free_guidance else 1)
        if num_prompts not in (1, batch_size):
            raise ValueError(f"Got {num_prompts} prompts for {batch_size} images: pass one, or one per image.")
        if num_prompts == 1:
            prompt_embeds = prompt_embeds.repeat_interleave(batch_size, dim=0)  # [(2 *) B, L, D]

        # 4. Prepare the grid on a fresh scheduler, so `self.scheduler`'s state (set_timesteps) is untouched
        grid = ddim_grid(DDIMScheduler.from_config(self.scheduler.config), num_inference_steps, device)
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device, torch.float32)

        # 5. Invert: z0 -> x_1 -> ... -> x_N
        with self.progress_bar(total=num_inference_steps) as progress_bar:

            def eps_fn(x, t):
                x_in = torch.cat([x] * 2) if do_classifier_free_guidance else x
                eps = self.unet(x_in, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
                if do_classifier_free_guidance:
                    eps_uncond, eps_text = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                progress_bar.update()
                # a v-prediction model's output (guided in v, which is the same as in eps) as the noise
                return eps_from_prediction(eps, x, alphas_cumprod[t], prediction_type)

            walk = ddim_invert(eps_fn, image_latents, grid)

        # 6. Stack the walk: [N, B, C, h, w]
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
