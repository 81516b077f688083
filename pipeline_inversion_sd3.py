"""Stable Diffusion 3 / 3.5 with deterministic Euler inversion: image -> noise latents that sample back to the image.

A diffusers custom pipeline: one file holding one ``DiffusionPipeline`` subclass and importing nothing but torch,
diffusers, numpy, PIL and the standard library, because diffusers copies the file alone into its modules cache
(``HF_MODULES_CACHE``) and imports it from there.

Rectified flow (diffusers' convention): ``x_s = (1 - s) x0 + s n`` for ``s`` in [0, 1] from clean to noise; the
transformer, called with timestep ``1000 s``, predicts the velocity ``v = n - x0``, and the sampler
(``FlowMatchEulerDiscreteScheduler``) steps ``x_{s'} = x_s + (s' - s) v(x_s, s)`` down its grid of shifted sigmas.
Inversion is the same Euler step up the same grid. The velocity that would carry ``x_{i+1}`` (level ``s_{i+1}``) down
to ``x_i`` is taken at the lower latent with the upper label, ``v(x_i, s_{i+1})`` (the convention of DDIM inversion,
which takes the noise at the lower latent with the upper timestep): sampling back from ``x_{i+1}`` then steps with
``v(x_{i+1}, s_{i+1})``, and the reconstruction is exact wherever the velocity does not change between two
neighbouring latents. The flow functions of this file see no transformer, prompt or scheduler object (a velocity
predictor is passed in as ``velocity_fn(x, s) -> v``); the repository's SD3 training script holds marked copies of
them (``# Copied from pipeline_inversion_sd3.euler_move``, kept equal by ``scripts/check_copies.py``), so the
inversion a model is trained on and the one this pipeline computes cannot drift apart.

Load the file by its path, or by the id of a Hub repo (or the path of a folder) that holds it under the name diffusers
looks for there, ``pipeline.py``::

    pipe = DiffusionPipeline.from_pretrained(
        model, custom_pipeline="path/to/pipeline_inversion_sd3.py", trust_remote_code=True
    )
    inv = pipe.invert(image, prompt, num_inference_steps=28)
    same = pipe(prompt, latents=inv.latents, num_inference_steps=28, guidance_scale=1.0).images[0]

Higher orders (``invert(order=k)``). What limits the reconstruction is how far the inversion's step is from the exact
inverse of the sampler's: the ``x_i`` with ``x_{i-1} = x_i + (s_{i-1} - s_i) v(x_i, s_i)``. Euler inversion misses it
by ``O(h^2)`` a step, so sampling back leaves an error of order ``1 / N``. ``flow_invert_fixed_point`` spends its
extra evaluations on that implicit equation (``k - 1`` fixed-point corrections: error ``N^-k``). Heun or midpoint
steps, second order in the flow ODE, spend them on the ODE, which the Euler sampler does not follow either, and buy
nothing here. Measured on the tiny random SD3 of the tests (8 shapes images, guidance 1; latent RMSE after sampling
back; ``benchmarks/results/sd3_inversion.md`` has the command and the full table, guidance 3 and order 3 included):

    evaluations   order 1     order 2 (fixed point)   Heun (ODE)   midpoint (ODE)
    10            5.35e-02    2.20e-02                5.68e-02     6.71e-02
    20            2.54e-02    5.14e-03                2.72e-02     2.75e-02
    40            1.24e-02    1.20e-03                1.29e-02     1.48e-02

so Heun and midpoint are left out, and ``order=2`` is the fixed-point step. A correction shrinks a step's error by
``(s_i - s_{i-1})`` times the velocity's Lipschitz constant in ``x`` (about 0.5 for the random tiny model); a trained
model whose velocity varies faster with ``x`` gains less per correction, so measure on the model itself
(``benchmarks/sd3_inversion.py --model``).
"""

from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Union, get_type_hints

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKL, SD3Transformer2DModel
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.utils import BaseOutput, logging, replace_example_docstring


logger = logging.get_logger(__name__)

# The transformers classes of the components, read from StableDiffusion3Pipeline's signature rather than imported, so
# that this file needs no transformers import: the annotations of `__init__` must be the real classes, because
# `from_pretrained` checks each component against them and `from_pipe` leaves behind a model whose type differs
_COMPONENT_TYPES = get_type_hints(StableDiffusion3Pipeline.__init__)
CLIPTextModelWithProjection = _COMPONENT_TYPES["text_encoder"]
CLIPTokenizer = _COMPONENT_TYPES["tokenizer"]
T5EncoderModel = _COMPONENT_TYPES["text_encoder_3"]
T5TokenizerFast = _COMPONENT_TYPES["tokenizer_3"]
SiglipVisionModel = _COMPONENT_TYPES["image_encoder"]
SiglipImageProcessor = _COMPONENT_TYPES["feature_extractor"]


class FlowGrid(NamedTuple):
    """The N-step grid of a flow-matching Euler scheduler, ascending in noise.

    ``sigmas[0] = 0`` is the clean level (where sampling ends and inversion starts), ``sigmas[i + 1]`` the level of
    step ``i``, whose label (what the velocity is evaluated at) is ``timesteps[i] = sigmas[i + 1]``, a sigma in
    [0, 1]: the transformer is called with ``1000 * timesteps[i]``, the scheduler's ``num_train_timesteps`` times it.
    """

    timesteps: torch.Tensor  # [N] float32, ascending: the sigma labels of levels 1 .. N
    sigmas: torch.Tensor  # [N + 1] float32, ascending, sigmas[0] = 0


def flow_grid(
    scheduler, num_steps: int, device: Union[str, torch.device] = "cpu", mu: Optional[float] = None
) -> FlowGrid:
    """Reads the grid from a (copy of a) ``FlowMatchEulerDiscreteScheduler``, so the shift and spacing are the
    model's own (``mu``: the dynamic shift, for a scheduler configured with ``use_dynamic_shifting``)."""
    if mu is None:
        scheduler.set_timesteps(num_steps)
    else:
        scheduler.set_timesteps(num_steps, mu=mu)
    sigmas = scheduler.sigmas.to(torch.float32).flip(0)
    if sigmas[0] != 0:  # a scheduler whose grid stops short of the clean level: inversion starts at 0 all the same
        sigmas = torch.cat([sigmas.new_zeros(1), sigmas])
    return FlowGrid(sigmas[1:].to(device), sigmas.to(device))


def euler_move(x: torch.Tensor, v: torch.Tensor, s_from, s_to) -> torch.Tensor:
    """One Euler step of the flow ODE from level ``s_from`` to ``s_to`` (either way): ``x + (s_to - s_from) v``.
    Per-sample levels of shape [B] broadcast over the remaining dims of ``x``; computed in float32."""

    def level(s):
        s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
        return s.reshape(s.shape + (1,) * (x.ndim - s.ndim)) if s.ndim else s

    return (x.float() + (level(s_to) - level(s_from)) * v.float()).to(x.dtype)


class InversionTrajectory(NamedTuple):
    latents: List[torch.Tensor]  # x_1 .. x_N, x_i at level i
    velocities: List[torch.Tensor]  # v_1 .. v_N, v_i = v(x_{i-1}, s_i) moved x_{i-1} to x_i


def flow_invert(velocity_fn: Callable, z0: torch.Tensor, grid: FlowGrid) -> InversionTrajectory:
    """Walks ``z0`` up the whole grid with first-order Euler steps and keeps every latent and velocity used."""
    x, latents, velocities = z0, [], []
    for i, s in enumerate(grid.timesteps):
        v = velocity_fn(x, s)
        x = euler_move(x, v, grid.sigmas[i], grid.sigmas[i + 1])
        latents.append(x)
        velocities.append(v)
    return InversionTrajectory(latents, velocities)


def flow_invert_fixed_point(
    velocity_fn: Callable, z0: torch.Tensor, grid: FlowGrid, corrections: int = 1
) -> InversionTrajectory:
    """Walks ``z0`` up the grid solving, at each step, for the latent that the sampler's Euler step takes back down.

    The exact inverse of the sampler's step from ``x_i`` is the ``x_i`` of the implicit equation
    ``x_i = x_{i-1} + (s_i - s_{i-1}) v(x_i, s_i)``. ``flow_invert`` takes ``v(x_{i-1}, s_i)`` in its place; here
    that Euler step is the start of a fixed-point iteration (fixed-point inversion, arXiv 2312.12540; ReNoise, arXiv
    2403.14602), and each of ``corrections`` more evaluations re-takes the velocity at the latent the previous one
    reached. Each correction multiplies the step's error by ``(s_i - s_{i-1})`` times the velocity's Lipschitz
    constant in ``x``, so with ``k`` corrections the error that sampling back leaves falls as ``N^-(k+1)``. The
    trajectory is then not closer to the flow ODE's (that stays first order): it is closer to the Euler sampler's.
    ``velocities`` holds each step's last velocity, the one that moved ``x_{i-1}`` to ``x_i``; ``corrections=0`` is
    ``flow_invert``."""
    x, latents, velocities = z0, [], []
    for i, s in enumerate(grid.timesteps):
        v = velocity_fn(x, s)
        for _ in range(corrections):
            v = velocity_fn(euler_move(x, v, grid.sigmas[i], grid.sigmas[i + 1]), s)
        x = euler_move(x, v, grid.sigmas[i], grid.sigmas[i + 1])
        latents.append(x)
        velocities.append(v)
    return InversionTrajectory(latents, velocities)


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import load_image

        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-3.5-medium",
        ...     custom_pipeline="/path/to/pipeline_inversion_sd3.py",  # or a Hub repo id holding it as pipeline.py
        ...     trust_remote_code=True,
        ...     torch_dtype=torch.bfloat16,
        ... ).to("cuda")

        >>> image = load_image("cat.png").resize((1024, 1024))
        >>> prompt = "a photo of a cat"
        >>> inv = pipe.invert(image, prompt, num_inference_steps=28)
        >>> # Euler from the inverted noise, same prompt, steps and guidance, gives the image back
        >>> reconstruction = pipe(prompt, latents=inv.latents, num_inference_steps=28, guidance_scale=1.0).images[0]
        ```
"""


@dataclass
class InversionPipelineOutput(BaseOutput):
    """
    Output of [`InversionSD3Pipeline.invert`].

    Args:
        latents (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            The noise latents at the top of the grid, `x_N`; pass them as `latents=` to `__call__` to sample back.
        trajectory (`torch.Tensor` of shape `(num_inference_steps, batch_size, channels, height, width)`):
            Every latent of the inversion, `x_1 .. x_N`, ascending in noise (`trajectory[-1]` is `latents`).
        velocities (`torch.Tensor` of shape `(num_inference_steps, batch_size, channels, height, width)`):
            The (guided) velocity `v_i` that moved `x_{i-1}` to `x_i`, `x_i = x_{i-1} + (s_i - s_{i-1}) v_i`; an Euler
            step from `x_i` with `v_i` lands exactly on `x_{i-1}`. First order: `v_i = v(x_{i-1}, s_i)`; order
            `k`: the last of the step's `k` evaluations, nearer `v(x_i, s_i)`, the velocity the sampler takes.
        timesteps (`torch.Tensor` of shape `(num_inference_steps,)`):
            The sigma label `s_i` of each level, ascending, in [0, 1] (the transformer is called with
            `num_train_timesteps * s_i`, the `__call__` loop's `t`).
        image_latents (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            `z0 = (mean - shift_factor) * scaling_factor`: the VAE latent distribution's mean, normalised as
            `__call__` de-normalises before decoding; where the inversion starts.
    """

    latents: torch.Tensor
    trajectory: torch.Tensor
    velocities: torch.Tensor
    timesteps: torch.Tensor
    image_latents: torch.Tensor


class InversionSD3Pipeline(StableDiffusion3Pipeline):
    r"""
    Stable Diffusion 3 / 3.5 with deterministic Euler inversion ([`~InversionSD3Pipeline.invert`]).

    Everything else (prompt encoding, LoRA loading, `__call__`, decoding) is [`StableDiffusion3Pipeline`]'s.
    Inversion is defined by the flow-matching Euler step, so a scheduler that is not a
    [`FlowMatchEulerDiscreteScheduler`] (a `FlowMatchHeunDiscreteScheduler`, say) is replaced by a
    `FlowMatchEulerDiscreteScheduler` built from its config; `__call__` then samples with the same Euler steps and
    reconstructs an inverted image.

    Args:
        transformer ([`SD3Transformer2DModel`]):
            Conditional Transformer (MMDiT) architecture to predict the velocity of the encoded image latents.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]):
            The flow-matching Euler scheduler; another flow-matching scheduler is replaced by
            `FlowMatchEulerDiscreteScheduler.from_config` of its config.
        vae ([`AutoencoderKL`]):
            Variational Auto-Encoder (VAE) model to encode and decode images to and from latent representations.
        text_encoder ([`~transformers.CLIPTextModelWithProjection`]):
            The first frozen CLIP text encoder (its penultimate hidden states and its pooled projection).
        tokenizer ([`~transformers.CLIPTokenizer`]):
            The tokenizer of `text_encoder`.
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`]):
            The second frozen CLIP text encoder.
        tokenizer_2 ([`~transformers.CLIPTokenizer`]):
            The tokenizer of `text_encoder_2`.
        text_encoder_3 ([`~transformers.T5EncoderModel`]):
            The frozen T5 encoder; `None` runs without it on zeros, as [`StableDiffusion3Pipeline`] does.
        tokenizer_3 ([`~transformers.T5TokenizerFast`]):
            The tokenizer of `text_encoder_3`.
        image_encoder ([`~transformers.SiglipVisionModel`], *optional*):
            Pre-trained vision model for IP-Adapter.
        feature_extractor ([`~transformers.SiglipImageProcessor`], *optional*):
            Image processor for IP-Adapter.
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
    ):
        if scheduler is not None and not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            # `invert` walks the Euler grid, so `__call__` must walk it back with the same Euler steps
            logger.info(
                f"Replacing {scheduler.__class__.__name__} by FlowMatchEulerDiscreteScheduler with the same config."
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )

    def _encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """`z0`: the VAE latent distribution's mean, normalised as `__call__` de-normalises before decoding."""
        latents = self.vae.encode(image.to(dtype=self.vae.dtype)).latent_dist.mode()
        shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift_factor) * self.vae.config.scaling_factor

    def _flow_grid(self, num_inference_steps: int, latent_size: tuple[int, int], device, mu: float | None) -> FlowGrid:
        """The grid `__call__` walks down for latents of `latent_size`, read from a fresh scheduler so that
        `self.scheduler`'s state (set_timesteps) is untouched."""
        config = self.scheduler.config
        if config.get("use_dynamic_shifting", False) and mu is None:
            # as `StableDiffusion3Pipeline.__call__` computes it, from the number of patches
            image_seq_len = (latent_size[0] // self.patch_size) * (latent_size[1] // self.patch_size)
            mu = calculate_shift(
                image_seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return flow_grid(FlowMatchEulerDiscreteScheduler.from_config(config), num_inference_steps, device, mu=mu)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def invert(
        self,
        image: PipelineImageInput,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 256,
        clip_skip: int | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        mu: float | None = None,
        order: int = 1,
        return_dict: bool = True,
    ):
        r"""
        Inverts images to noise with deterministic flow-matching Euler steps up the sampler's own grid.

        Starting at `z0` (level `s_0 = 0`), each step moves the latent from level `s_{i-1}` up to `s_i` with the
        velocity predicted at the lower latent and the upper label, `x_i = x_{i-1} + (s_i - s_{i-1}) v(x_{i-1}, s_i)`
        (the convention of DDIM inversion, which takes the noise at the lower latent with the upper timestep). The
        grid is the `num_inference_steps`-step grid of a fresh [`FlowMatchEulerDiscreteScheduler`] built from this
        pipeline's scheduler config (shift, and dynamic shift from the image size, included), so the pipeline's own
        scheduler is left untouched. Sampling back with `__call__(prompt, latents=output.latents,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)` retraces the grid; the reconstruction
        is exact up to how far each `v(x_{i-1}, s_i)` is from `v(x_i, s_i)`, the velocity the sampler takes there.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a list of them):
                The images to invert, of a height and width divisible by `vae_scale_factor * patch_size` (16 for SD3).
                Tensors and arrays are taken in `[-1, 1]` (or `[0, 1]`, normalised then) as
                [`VaeImageProcessor.preprocess`] reads them; a 4-d tensor with the VAE's latent channels is taken as
                `z0` itself.
            prompt (`str` or `list[str]`, *optional*):
                The caption(s) the inversion is conditioned on: one for all images or one per image. If not
                defined, `prompt_embeds` and `pooled_prompt_embeds` must be passed.
            num_inference_steps (`int`, *optional*, defaults to 28):
                The number of Euler steps from `z0` to the noise latents.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance scale of the velocities, as `__call__` guides them: `v(null) + g * (v(c) -
                v(null))`. `1.0` is the conditional velocity alone (one transformer row per image and evaluation);
                above 1 costs two.
            negative_prompt (`str` or `list[str]`, *optional*):
                The null conditioning's text when `guidance_scale > 1` (`""` if not defined).
            prompt_2 (`str` or `list[str]`, *optional*):
                The caption(s) for `tokenizer_2` and `text_encoder_2` (default: `prompt`).
            prompt_3 (`str` or `list[str]`, *optional*):
                The caption(s) for `tokenizer_3` and `text_encoder_3` (default: `prompt`).
            negative_prompt_2 (`str` or `list[str]`, *optional*):
                The null text for the second text encoder (default: `negative_prompt`).
            negative_prompt_3 (`str` or `list[str]`, *optional*):
                The null text for the T5 encoder (default: `negative_prompt`).
            prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated text embeddings, in place of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative text embeddings, in place of `negative_prompt`.
            pooled_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated pooled text embeddings, with `prompt_embeds`.
            negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-generated negative pooled text embeddings, with `negative_prompt_embeds`.
            max_sequence_length (`int`, *optional*, defaults to 256):
                The T5 sequence length, as `__call__`'s (pass the same value to both).
            clip_skip (`int`, *optional*):
                CLIP layers skipped, as `__call__`'s.
            joint_attention_kwargs (`dict`, *optional*):
                Passed to the transformer's attention processors, as `__call__` passes them (`{"scale": s}` scales
                a loaded LoRA).
            mu (`float`, *optional*):
                The dynamic shift of a scheduler with `use_dynamic_shifting`, as `__call__`'s `mu` (default: computed
                from the image size as `__call__` computes it).
            order (`int`, *optional*, defaults to 1):
                Velocity evaluations per step. `1`: the Euler step above. `k > 1`: `k - 1` fixed-point corrections
                of each step towards the latent the sampler's Euler step takes back exactly
                ([`flow_invert_fixed_point`]); the error left after sampling back falls as `N^-k` instead of `1 /
                N`, at `k` times the cost. (Second-order integrators of the flow ODE, Heun or midpoint, reconstruct
                no better than first order at equal evaluations, because `__call__` samples with Euler: see the
                module docstring.)
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`InversionPipelineOutput`] instead of a plain tuple.

        Examples:

        Returns:
            [`InversionPipelineOutput`] or `tuple`:
                An [`InversionPipelineOutput`] if `return_dict` is `True`, otherwise the tuple `(latents, trajectory,
                velocities, timesteps, image_latents)`.
        """
        # 1. Check inputs
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds`, from the same `encode_prompt` call.")
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"`order` is the number of velocity evaluations per step, 1 or more, not {order!r}.")
        if self.scheduler.config.get("invert_sigmas", False) or self.scheduler.config.get(
            "stochastic_sampling", False
        ):
            raise ValueError(
                "Inversion needs the deterministic flow-matching Euler sampler from noise at sigma 1 to clean at 0; "
                "this scheduler is configured with `invert_sigmas` or `stochastic_sampling`."
            )
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0
        dtype = self.transformer.dtype

        # 2. Encode the image: the latent distribution's mean, so the inversion is deterministic
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == self.vae.config.latent_channels:
            # checked before `preprocess`, which would resize and rescale SD3's 16 channels as an image
            image_latents = image.to(device=device, dtype=dtype)
        else:
            image = self.image_processor.preprocess(image)
            image_latents = self._encode_image(image.to(device=device)).to(dtype)
        batch_size, _, latent_height, latent_width = image_latents.shape
        if latent_height % self.patch_size or latent_width % self.patch_size:
            multiple = self.vae_scale_factor * self.patch_size
            raise ValueError(
                f"Latents of {latent_height} x {latent_width} do not divide into the transformer's "
                f"{self.patch_size} x {self.patch_size} patches: pass images whose sides are multiples of {multiple}."
            )

        # 3. Encode the prompt, one conditioning per image: text embeddings and pooled embeddings
        lora_scale = (joint_attention_kwargs or {}).get("scale", None)
        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
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

        # 4. Prepare the grid: the sigmas `__call__` walks down for latents of this size, ascending
        grid = self._flow_grid(num_inference_steps, (latent_height, latent_width), device, mu)
        num_train_timesteps = self.scheduler.config.num_train_timesteps

        # 5. Invert: z0 -> x_1 -> ... -> x_N
        with self.progress_bar(total=num_inference_steps * order) as progress_bar:

            def velocity_fn(x, s):
                x_in = torch.cat([x] * 2) if do_classifier_free_guidance else x
                # `s * num_train_timesteps` in float32, as the scheduler makes `__call__`'s timesteps from its sigmas
                timestep = (s * num_train_timesteps).expand(x_in.shape[0])
                v = self.transformer(
                    hidden_states=x_in.to(dtype),
                    timestep=timestep,
                    encoder_hidden_states=prompt_embeds,
                    pooled_projections=pooled_prompt_embeds,
                    joint_attention_kwargs=joint_attention_kwargs,
                    return_dict=False,
                )[0]
                if do_classifier_free_guidance:
                    v_uncond, v_text = v.chunk(2)
                    v = v_uncond + guidance_scale * (v_text - v_uncond)
                progress_bar.update()
                return v

            if order == 1:
                walk = flow_invert(velocity_fn, image_latents, grid)
            else:
                walk = flow_invert_fixed_point(velocity_fn, image_latents, grid, corrections=order - 1)

        # 6. Stack the walk: [N, B, C, h, w]
        trajectory = torch.stack(walk.latents)
        velocities = torch.stack(walk.velocities)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (trajectory[-1], trajectory, velocities, grid.timesteps, image_latents)
        return InversionPipelineOutput(
            latents=trajectory[-1],
            trajectory=trajectory,
            velocities=velocities,
            timesteps=grid.timesteps,
            image_latents=image_latents,
        )
