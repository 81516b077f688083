"""The preference objectives, as functions of tensors and denoisers.

Each objective reads a batch of preference pairs and returns per-pair losses plus what it wants logged. It never
sees ``args`` or the accelerator: the UNet reaches it as two denoisers, ``policy(x, t, cond)`` (the UNet
with the LoRA adapter on, with grad) and ``reference(x, t, cond)`` (the adapter off, under ``no_grad``), where
``x`` stacks winners then losers and ``cond`` is a dict of per-row conditioning tensors (any nesting). A denoiser
returns the UNet's own output, of ``ObjectiveConfig.prediction_type``: DDIM steps use the noise it implies, and
errors are measured in ``ObjectiveConfig.loss_space`` (the model's own output by default: on v for a v-prediction
model, as diffusers' training examples do; the formulas below write eps for whichever it is).

All pair objectives share Diffusion-DPO's form (Wallace et al. 2023, arXiv 2311.12908, eq. 14)::

    loss = link(-beta / 2 * margin)        link(z) = -log sigmoid(z)   ("sigmoid", default)
                                                     relu(1 - z)       ("hinge")
                                                     (z - 1/2)^2       ("ipo", Azar et al. 2023, times beta^2)

``beta`` here is the beta of the Diffusion-DPO paper with its constant ``T`` folded in, and the 1/2 is applied
inside (as the diffusers SD1.5 DPO example does): beta 5000 here means what ``--beta_dpo 5000`` means there.
``margin < 0`` means the policy prefers the winner more than the reference does: that pair counts as correct in
``accuracy``. With policy == reference every margin is exactly 0 and the sigmoid loss is log 2.
"""

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .ddim import DDIMGrid, ddim_inverse_step, ddim_invert, ddpm_posterior_std, eps_from_prediction, implied_noise


Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
INVERSION_TARGETS = ("reference", "step", "x0")
TIMESTEP_WEIGHTINGS = ("official", "uniform")
INVERSION_MARGINS = ("trajectory", "step")
LOSS_SPACES = ("prediction", "epsilon")


# ---------------------------------------------------------------------------------------------------------------
# Pure math


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b||^2`` as the mean over every element of one sample: shape [B]."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def preference_loss(margin: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """The link applied to ``-beta / 2 * margin``; see the module docstring."""
    z = -0.5 * beta * margin
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return F.relu(1 - z)
    if loss_type == "ipo":
        return (z - 0.5) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def dpo_margin(
    eps_pol_w: torch.Tensor,
    eps_ref_w: torch.Tensor,
    target_w: torch.Tensor,
    eps_pol_l: torch.Tensor,
    eps_ref_l: torch.Tensor,
    target_l: torch.Tensor,
) -> torch.Tensor:
    """Diffusion-DPO's margin: how much more the policy improved on the winner's target than on the loser's.

    ``(||tau_w - eps_pol_w||^2 - ||tau_w - eps_ref_w||^2) - (||tau_l - eps_pol_l||^2 - ||tau_l - eps_ref_l||^2)``
    """
    return (mse(target_w, eps_pol_w) - mse(target_w, eps_ref_w)) - (
        mse(target_l, eps_pol_l) - mse(target_l, eps_ref_l)
    )


def reference_distance_margin(eps_pol_w, eps_ref_w, eps_pol_l, eps_ref_l) -> torch.Tensor:
    """Inversion-DPO's per-step term with the reference as target (the paper's figure):
    ``||eps_pol_w - eps_ref_w||^2 - ||eps_pol_l - eps_ref_l||^2`` ("winner fitting, loser diverging").

    Every distance is 0 at policy == reference, so its gradient at initialisation is exactly zero.
    """
    return mse(eps_pol_w, eps_ref_w) - mse(eps_pol_l, eps_ref_l)


def inversion_step_weights(alphas: torch.Tensor, weighting: str) -> torch.Tensor:
    """Weights of the inversion steps from their levels' alphas: official ``1 / (2 a_t)`` or uniform 1.

    A level with ``a_t = 0`` (zero terminal SNR, Lin et al. 2024) gets 0 under ``official``: it holds no image, and
    there a v-prediction model's eps is ``x_t`` itself, the same for policy and reference, so its term is 0 anyway
    (``1 / 0`` would make it ``0 * inf = nan``)."""
    if weighting == "official":
        return torch.where(alphas > 0, 1.0 / (2.0 * alphas), 0.0)  # alphas carry no grad: the inf is never used
    if weighting == "uniform":
        return torch.ones_like(alphas)
    raise ValueError(f"unknown timestep weighting {weighting!r}; expected one of {TIMESTEP_WEIGHTINGS}")


def pair_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """1 where the implicit reward prefers the winner (margin < 0), else 0."""
    return (margin < 0).float()


# ---------------------------------------------------------------------------------------------------------------
# Conditioning helpers: rows follow the stacked batch (winners, then losers)


def map_cond(cond, fn):
    if isinstance(cond, dict):
        return {k: map_cond(v, fn) for k, v in cond.items()}
    return fn(cond) if isinstance(cond, torch.Tensor) else cond


def tile_cond(cond, k: int):
    """Repeats every row block ``k`` times: conditioning for ``k`` stacked copies of the batch."""
    return cond if k == 1 else map_cond(cond, lambda v: v.repeat(k, *([1] * (v.ndim - 1))))


def take_cond(cond, rows: slice):
    return map_cond(cond, lambda v: v[rows])


def map_cond_pair(a, b, fn):
    """``fn(a_leaf, b_leaf)`` over two conditionings of the same structure (tensor leaves; others from ``a``)."""
    if isinstance(a, dict):
        return {k: map_cond_pair(a[k], b[k], fn) for k in a}
    return fn(a, b) if isinstance(a, torch.Tensor) else a


def guided(denoiser: Denoiser, cond, null_cond, guidance_scale: float) -> Callable:
    """``eps(x, t)`` with classifier-free guidance: ``eps(null) + g (eps(c) - eps(null))``; g = 1 is one call."""
    if guidance_scale == 1.0:
        return lambda x, t: denoiser(x, t, cond)

    stacked_cond = _cat_cond(null_cond, cond)

    def eps(x, t):
        e_null, e_cond = denoiser(torch.cat([x, x]), torch.cat([t, t]), stacked_cond).chunk(2)
        return e_null + guidance_scale * (e_cond - e_null)

    return eps


def _cat_cond(a, b):
    return map_cond_pair(a, b, lambda x, y: torch.cat([x, y]))


# ---------------------------------------------------------------------------------------------------------------
# Objectives


@dataclass
class ObjectiveConfig:
    alphas_cumprod: torch.Tensor  # [T] float32, the model's own schedule
    beta: float = 5000.0
    loss_type: str = "sigmoid"
    inversion_grid: Optional[DDIMGrid] = None  # inversion_dpo: the N-step grid
    inversion_guidance_scale: float = 1.0
    inversion_target: str = "x0"
    inversion_grad_steps: Optional[int] = None  # k of N steps back-propagated (unbiased); None = all (exact)
    inversion_chunk_steps: Optional[int] = None  # steps per policy call with grad; None or >= N: one graph
    inversion_margin: str = "trajectory"  # or "step": one sampled step per pair (this project's extension)
    timestep_weighting: str = "uniform"
    inpo_grid: Optional[DDIMGrid] = None  # inpo: the coarse grid
    inpo_eta: float = 0.0
    prediction_type: str = "epsilon"  # what the denoisers return: the UNet's own output
    loss_space: str = "prediction"  # errors in that output's space, or "epsilon" (converted) whatever it is
    sft_weight: float = 0.0  # pair objectives: + sft_weight x the sft loss on the winners (``with_winner_sft``)
    sft_min_timestep: int = 0  # the sft loss draws t from [sft_min_timestep, T)
    sft_caption_dropout: float = 0.0  # share of the sft loss's rows conditioned on the null caption instead
    anchor_weight: float = 0.0  # + anchor_weight x the policy's distance to the reference below anchor_max_timestep
    anchor_max_timestep: int = 0  # the anchor draws t from [0, anchor_max_timestep)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def __post_init__(self):
        if self.loss_space not in LOSS_SPACES:
            raise ValueError(f"unknown loss_space {self.loss_space!r}; expected one of {LOSS_SPACES}")

    @property
    def v_space(self) -> bool:
        """Errors are measured on v (a v-prediction model with ``loss_space="prediction"``), else on the noise."""
        return self.loss_space == "prediction" and self.prediction_type == "v_prediction"

    def eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise prediction implied by a denoiser's output ``out`` at ``(x, t)`` (what DDIM steps with)."""
        return eps_from_prediction(out.float(), x.float(), self.alphas_cumprod[t], self.prediction_type)

    def pred(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A denoiser's output in the space where errors are measured."""
        return out.float() if self.v_space else self.eps(out, x, t)

    def target(self, noise: torch.Tensor, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of a row whose noisy latent is ``sqrt(a_t) z0 + sqrt(1 - a_t) noise``, in the
        loss space: ``noise``, or ``v = sqrt(a_t) noise - sqrt(1 - a_t) z0``. On v, a zero-terminal-SNR model's
        top level (``a_t = 0``, where its noise prediction is ``x_t`` whatever the weights) still has an error:
        its estimate of ``z0``, which decides the layout."""
        if not self.v_space:
            return noise.float()
        a = self.alphas_cumprod[t].reshape(-1, *([1] * (noise.ndim - 1)))
        return a.sqrt() * noise.float() - (1 - a).sqrt() * z0.float()

    def eps_fn(self, denoiser: "Denoiser") -> "Denoiser":
        """``denoiser`` returning the noise prediction, for DDIM steps."""
        return lambda x, t, cond: self.eps(denoiser(x, t, cond), x, t)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # [B], with grad
    margin: Optional[torch.Tensor] = None  # [B], detached; None for sft
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, detached
    # two-pass objectives: ``loss`` carries no grad; each callable recomputes one chunk with grad and returns a [B]
    # surrogate, and back-propagating every chunk in turn accumulates exactly the gradient of ``loss``
    grad_chunks: Optional[List[Callable[[], torch.Tensor]]] = None

    def backward_terms(self) -> List[Callable[[], torch.Tensor]]:
        """What to back-propagate (each ``.mean()``), in order: the chunks, or the loss itself."""
        return self.grad_chunks or [lambda: self.loss]


def _pair_output(margin: torch.Tensor, cfg: ObjectiveConfig, **logs) -> ObjectiveOutput:
    loss = preference_loss(margin, cfg.beta, cfg.loss_type)
    return ObjectiveOutput(loss, margin.detach(), {k: v.detach() for k, v in logs.items()})


def _add_noise(z0, noise, a_t):
    a_t = a_t.reshape(-1, *([1] * (z0.ndim - 1)))
    return a_t.sqrt() * z0 + (1 - a_t).sqrt() * noise


def diffusion_dpo(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908): one ``t ~ U{0..T-1}`` and one noise ``n`` shared by
    winner and loser, ``x_t = sqrt(a_t) z0 + sqrt(1 - a_t) n``, ``margin = dpo_margin(..., target = n)``.

    ``z0`` is [2B, ...], winners then losers. Cost: 2 policy rows with grad + 2 reference rows per pair.
    """
    B = z0.shape[0] // 2
    t = torch.randint(0, cfg.num_train_timesteps, (B,), device=z0.device).repeat(2)
    noise = torch.randn_like(z0[:B]).repeat(2, *([1] * (z0.ndim - 1)))
    x_t = _add_noise(z0, noise, cfg.alphas_cumprod[t])
    eps_pol = cfg.pred(policy(x_t, t, cond), x_t, t)
    with torch.no_grad():
        eps_ref = cfg.pred(reference(x_t, t, cond), x_t, t)
    target = cfg.target(noise, z0, t)
    margin = dpo_margin(eps_pol[:B], eps_ref[:B], target[:B], eps_pol[B:], eps_ref[B:], target[B:])
    return _pair_output(margin, cfg, timestep=t[:B].float().mean())


class InversionSteps(NamedTuple):
    """The reference side of ``inversion_dpo`` for a batch: everything the policy side needs and nothing more. It
    depends only on the frozen reference, so it can be computed once per dataset and cached (``inversion_dpo/cache.py``).

    Rows stack winners then losers, as everywhere; ``K`` is the number of trajectory steps held for each row (all N,
    the cache's stored subset, or one sampled step per pair), and a pair's two rows always hold the same steps.
    """

    steps: torch.Tensor  # [K, 2B] long: the grid index of each row's step (0 = the step to timesteps[0])
    x: torch.Tensor  # [K, 2B, C, H, W]: the policy's inputs, x_i (x_{i-1} for the reference target)
    target: Optional[torch.Tensor]  # [K, 2B, C, H, W]: tau_i; None for the reference target
    ref_error: Optional[torch.Tensor]  # [K, 2B]: ||tau_i - eps_ref(x_i, t_i)||^2; None for the reference target
    eps_ref: Optional[torch.Tensor]  # [K, 2B, C, H, W]: eps_ref(x_{i-1}, t_i), the reference target's target

    def take(self, index: torch.Tensor) -> "InversionSteps":
        """The steps ``index`` ([K', 2B], positions along K) of every row."""
        rows = torch.arange(index.shape[1], device=index.device)
        return InversionSteps(*(None if v is None else v[index, rows] for v in self))


def invert_pairs(reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig, steps=None, round_to=None):
    """The reference's DDIM inversion of each image (with the caption, at the inversion guidance scale) and what the
    policy side needs at the grid ``steps`` ([K, 2B] long, default every step): the inputs, the targets and the
    reference's errors. The inversion walks only as far as the highest step asked for.

    ``round_to``: the dtype a cache stores inputs and targets in. They are rounded before the reference is evaluated
    on them, so that a policy reading them back sees exactly what the reference saw: margin 0 at initialisation.
    """
    grid = cfg.inversion_grid
    N, B2 = len(grid.timesteps), z0.shape[0]
    if steps is None:
        steps = torch.arange(N, device=z0.device)[:, None].expand(N, B2)
    rows = torch.arange(B2, device=z0.device)

    def rounded(v):
        return v if round_to is None else v.to(round_to).float()

    with torch.no_grad():
        # walk only as far as needed: the grid up to the highest step asked for (a sub-grid keeps the same levels)
        top = N if steps.device.type == "meta" else int(steps.max()) + 1  # meta: benchmarks/memory_at_scale.py
        invert_eps = guided(cfg.eps_fn(reference), cond, null_cond, cfg.inversion_guidance_scale)
        sub_grid = DDIMGrid(grid.timesteps[:top], grid.alphas[: top + 1])
        trajectory = ddim_invert(lambda x, t: invert_eps(x, t.expand(B2)), z0, sub_grid)
        latents = torch.stack(trajectory.latents)  # [top, 2B, C, H, W]: x_i
        if cfg.inversion_target in ("reference", "step"):
            inputs = torch.cat([z0[None], latents[:-1]])  # x_{i-1}: the inversion's own inputs
        x = rounded((inputs if cfg.inversion_target == "reference" else latents)[steps, rows])  # [K, 2B, C, H, W]
        t = grid.timesteps[steps]

        # in chunks, as the policy side: one no-grad forward of all K steps would hold K steps' activations
        def reference_rows(c):  # the steps at positions c, their rows flattened step-major as tile_cond repeats cond
            x_c, t_c = x[c].flatten(0, 1), t[c].flatten()
            return cfg.pred(reference(x_c, t_c, tile_cond(cond, len(c))), x_c, t_c)

        chunks = _chunks(list(range(len(steps))), cfg.inversion_chunk_steps or len(steps))
        eps_ref = torch.cat([reference_rows(c) for c in chunks]).view_as(x)
        if cfg.inversion_target == "reference":
            return InversionSteps(steps, x, None, None, eps_ref)
        if cfg.inversion_target == "step":
            noise = torch.stack(trajectory.noises)[steps, rows].float()
            # the clean latent of that step: the DDIM estimate from x_{i-1} (level a_{i-1} > 0) with e_i
            a_prev = grid.alphas[steps].reshape(*steps.shape, *([1] * (z0.ndim - 1)))
            x_prev = inputs[steps, rows].float()
            clean = (x_prev - (1 - a_prev).sqrt() * noise) / a_prev.sqrt()
        elif cfg.inversion_target == "x0":
            a_i = grid.alphas[1:][steps]
            noise = implied_noise(x.flatten(0, 1), z0.repeat(len(steps), 1, 1, 1), a_i.flatten()).view_as(x)
            clean = z0[None].expand_as(x)
        else:
            raise ValueError(f"unknown inversion_target {cfg.inversion_target!r}; expected one of {INVERSION_TARGETS}")
        target = cfg.target(noise.flatten(0, 1), clean.flatten(0, 1), t.flatten()).view_as(x)
        target = rounded(target)
        ref_error = mse(target.flatten(0, 1), eps_ref.flatten(0, 1)).view(steps.shape)
    return InversionSteps(steps, x, target, ref_error, None)


def inversion_dpo(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """Inversion-DPO (Li et al. 2025, arXiv 2507.11554): the noisy latents are the reference's deterministic DDIM
    inversion ``x_1 .. x_N`` of each image (with the caption, at the inversion guidance scale), not random draws.

    ``margin = (1/N) sum_i w_i m_i`` over every step of the trajectory, inside one link (exact, not a sampled
    step), with ``w_i = 1 / (2 a_{t_i})`` ("official") or 1, and per-step term ``m_i`` by ``inversion_target``:

    - ``reference`` (the paper's figure and official code): ``||eps_pol - eps_ref||^2`` of winner minus loser at
      the inversion's own inputs ``(x_{i-1}, t_i)``, both conditional. Zero gradient at initialisation.
    - ``step`` (this project's extension): ``dpo_margin`` at ``(x_i, t_i)`` with target ``e_i``, the noise with
      which one DDIM denoising step from ``x_i`` lands exactly on ``x_{i-1}``: "fit the winner's trajectory".
    - ``x0`` (this project's extension): ``dpo_margin`` at ``(x_i, t_i)`` with target
      ``(x_i - sqrt(a_i) z0) / sqrt(1 - a_i)``, the noise with which one step lands on ``z0``.

    ``inversion_margin = "step"`` (this project's extension) samples one step i per pair instead and takes
    ``margin = w_i m_i``, whose expectation is the trajectory margin (Diffusion-DPO's per-timestep form; by Jensen its
    expected loss bounds the trajectory loss from above). The inversion then walks only up to the sampled steps.

    Cost per pair: N (x2 with guidance) reference inversion rows and N reference rows (the reference side, which
    ``invert_pairs`` computes and a cache can hold), then the policy side: see ``inversion_policy``.
    """
    steps = None
    if cfg.inversion_margin == "step":
        steps = _one_step_per_pair(len(cfg.inversion_grid.timesteps), z0.shape[0] // 2, z0.device)
    return inversion_policy(policy, invert_pairs(reference, z0, cond, null_cond, cfg, steps), cond, cfg)


def _one_step_per_pair(num_steps: int, B: int, device) -> torch.Tensor:
    """[1, 2B]: one position in 0..num_steps-1 per pair, shared by its winner and loser."""
    return torch.randint(0, num_steps, (1, B), device=device).repeat(1, 2)


def inversion_policy(policy: Denoiser, ref: InversionSteps, cond, cfg: ObjectiveConfig) -> ObjectiveOutput:
    """The policy side of ``inversion_dpo`` on the reference side ``ref`` (computed now or read from a cache).

    - ``inversion_margin = "step"``: one held step per pair, sampled here (unless only one is held); one policy
      call with grad.
    - ``"trajectory"`` with ``inversion_chunk_steps >= K`` and no ``inversion_grad_steps``: all K held steps in one
      policy call with grad (one pass; activation memory grows with K).
    - otherwise the two-pass scheme of method.md, exact and with activation memory of ``inversion_chunk_steps``
      steps whatever K: pass 1 evaluates every step without grad, giving the margin and the link's slope; the
      returned ``grad_chunks`` recompute steps with grad, a chunk at a time, as ``slope * (1/K) sum w_i m_i``, whose
      gradients add up to the loss's. With ``inversion_grad_steps = k < K`` only k random steps are recomputed,
      scaled K/k: an unbiased gradient (the sum sits inside the link, so sampling steps for the loss itself would be
      biased; sampling them only for d margin is not). Cost: K policy rows without grad, then k (or K) with grad.
    """
    if cfg.inversion_margin == "step" and ref.steps.shape[0] > 1:  # (one held step: already sampled)
        ref = ref.take(_one_step_per_pair(ref.steps.shape[0], ref.steps.shape[1] // 2, ref.steps.device))
    K, B = ref.steps.shape[0], ref.steps.shape[1] // 2
    grid = cfg.inversion_grid
    weights = inversion_step_weights(grid.alphas[1:], cfg.timestep_weighting)[ref.steps[:, :B]]  # [K, B]

    def weighted_terms(chunk):  # [len(chunk), B]: w_i m_i of the held steps at positions `chunk`, one policy call
        x = ref.x[chunk]
        t = grid.timesteps[ref.steps[chunk]].flatten()
        eps_pol = cfg.pred(policy(x.flatten(0, 1), t, tile_cond(cond, len(chunk))), x.flatten(0, 1), t).view_as(x)
        if ref.eps_ref is not None:
            pw, pl, rw, rl = eps_pol[:, :B], eps_pol[:, B:], ref.eps_ref[chunk, :B], ref.eps_ref[chunk, B:]
            terms = reference_distance_margin(pw.flatten(0, 1), rw.flatten(0, 1), pl.flatten(0, 1), rl.flatten(0, 1))
            terms = terms.view(len(chunk), B)
        else:
            errors = mse(ref.target[chunk].flatten(0, 1), eps_pol.flatten(0, 1)).view(len(chunk), 2 * B)
            errors = errors - ref.ref_error[chunk]
            terms = errors[:, :B] - errors[:, B:]
        return weights[chunk] * terms

    everything = list(range(K))
    chunk_size, k = cfg.inversion_chunk_steps or K, cfg.inversion_grad_steps or K
    if cfg.inversion_margin == "step" or (chunk_size >= K and k >= K):
        return _pair_output(weighted_terms(everything).mean(0), cfg)

    with torch.no_grad():
        margin = torch.cat([weighted_terms(c) for c in _chunks(everything, chunk_size)]).mean(0)
    slope = _link_slope(margin, cfg)
    grad_steps = everything if k >= K else torch.randperm(K).tolist()[:k]

    def grad_chunk(chunk):
        return lambda: slope * weighted_terms(chunk).sum(0) / len(grad_steps)

    grad_chunks = [grad_chunk(c) for c in _chunks(grad_steps, chunk_size)]
    return ObjectiveOutput(preference_loss(margin, cfg.beta, cfg.loss_type), margin, {}, grad_chunks)


def _chunks(items: list, size: int) -> List[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _link_slope(margin: torch.Tensor, cfg) -> torch.Tensor:
    """d loss / d margin at ``margin``, per pair."""
    with torch.enable_grad():
        m = margin.detach().clone().requires_grad_(True)
        (slope,) = torch.autograd.grad(preference_loss(m, cfg.beta, cfg.loss_type).sum(), m)
    return slope


def inpo(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """DDIM-InPO (Lu et al., CVPR 2025, arXiv 2503.18454): one ``t ~ U{0..T-1}`` shared by the pair; each image is
    inverted without grad by the *current policy* (conditional, guidance 1) on the coarse grid up to its last level
    at or below ``t``, then one inversion step to ``t`` itself, adding ``eta`` times the DDPM posterior std of fresh
    noise (shared by the pair) after each step; the target is the implied noise ``tau = (x_t - sqrt(a_t) z0) / sqrt(1 - a_t)``, and the
    margin is ``dpo_margin`` with ``tau`` in place of Diffusion-DPO's ``n``.
    """
    grid, a = cfg.inpo_grid, cfg.alphas_cumprod
    B = z0.shape[0] // 2
    t = torch.randint(0, cfg.num_train_timesteps, (B,), device=z0.device).repeat(2)
    a_t = a[t]

    def step(x, a_from, a_to, label):
        x_next = ddim_inverse_step(x, cfg.eps(policy(x, label, cond), x, label), a_from, a_to)
        if cfg.inpo_eta > 0:
            std = ddpm_posterior_std(a_from, a_to).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
            # one draw per pair, shared by winner and loser, as Diffusion-DPO shares its noise
            fresh = torch.randn_like(x[:B]).repeat(2, *([1] * (x.ndim - 1)))
            x_next = x_next + cfg.inpo_eta * std * fresh
        return x_next

    with torch.no_grad():
        x, a_cur = z0, grid.alphas[0].expand(z0.shape[0])
        for i, s in enumerate(grid.timesteps):
            active = s <= t  # [2B]
            if not active.any():
                break
            x_next = step(x, a_cur, grid.alphas[i + 1].expand_as(a_cur), s.expand_as(t))
            x = torch.where(active.view(-1, *([1] * (x.ndim - 1))), x_next, x)
            a_cur = torch.where(active, grid.alphas[i + 1], a_cur)
        x_t = step(x, a_cur, a_t, t)
        tau = cfg.target(implied_noise(x_t, z0, a_t), z0, t)
        eps_ref = cfg.pred(reference(x_t, t, cond), x_t, t)
    eps_pol = cfg.pred(policy(x_t, t, cond), x_t, t)
    margin = dpo_margin(eps_pol[:B], eps_ref[:B], tau[:B], eps_pol[B:], eps_ref[B:], tau[B:])
    return _pair_output(margin, cfg, timestep=t[:B].float().mean())


def winner_sft_loss(policy: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig) -> torch.Tensor:
    """[B]: the usual diffusion loss ``||n - eps_pol(x_t^w, t)||^2`` of the winners (rows ``:B`` of the stacked
    batch), with fresh noise and ``t ~ U{sft_min_timestep .. T-1}``; a ``sft_caption_dropout`` share of the rows is
    conditioned on the null caption instead, as text-to-image fine-tuning drops captions to keep the unconditional
    branch that classifier-free guidance subtracts in step with the conditional one."""
    return _winner_losses(policy, [_sft_rows(z0, cond, null_cond, cfg)], cfg)[0]


def reference_anchor_loss(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """[B]: ``||pred_pol(x_t^w, t) - pred_ref(x_t^w, t)||^2`` on the winners with fresh noise and
    ``t ~ U{0 .. anchor_max_timestep-1}`` (the same ``sft_caption_dropout`` share on the null caption): it holds the
    policy to the reference at the levels below the ones the sft term trains. One LoRA serves every level, so a
    change learnt where the layout is decided also moves the levels that draw the objects' shapes; this keeps them."""
    return _winner_losses(policy, [_anchor_rows(reference, z0, cond, null_cond, cfg)], cfg)[0]


@dataclass
class _WinnerRows:
    """Noisy winner rows for the policy and what its prediction there is regressed on (no grad)."""

    x: torch.Tensor
    t: torch.Tensor
    cond: object
    target: torch.Tensor


def _winner_rows(z0, cond, null_cond, dropout):
    """The winners' latents and conditioning (rows ``:B``), a ``dropout`` share of the rows on the null caption."""
    B = z0.shape[0] // 2
    z0_w, cond_w = z0[:B], take_cond(cond, slice(0, B))
    if dropout > 0:
        drop = torch.rand(B, device=z0.device) < dropout
        null_w = take_cond(null_cond, slice(0, B))
        cond_w = map_cond_pair(cond_w, null_w, lambda c, n: torch.where(drop.view(-1, *([1] * (c.ndim - 1))), n, c))
    return z0_w, cond_w


def _sft_rows(z0, cond, null_cond, cfg: ObjectiveConfig) -> _WinnerRows:
    z0_w, cond_w = _winner_rows(z0, cond, null_cond, cfg.sft_caption_dropout)
    t = torch.randint(cfg.sft_min_timestep, cfg.num_train_timesteps, (z0_w.shape[0],), device=z0.device)
    noise = torch.randn_like(z0_w)
    return _WinnerRows(_add_noise(z0_w, noise, cfg.alphas_cumprod[t]), t, cond_w, cfg.target(noise, z0_w, t))


def _anchor_rows(reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig) -> _WinnerRows:
    z0_w, cond_w = _winner_rows(z0, cond, null_cond, cfg.sft_caption_dropout)
    t = torch.randint(0, cfg.anchor_max_timestep, (z0_w.shape[0],), device=z0.device)
    x_t = _add_noise(z0_w, torch.randn_like(z0_w), cfg.alphas_cumprod[t])
    with torch.no_grad():
        ref = cfg.pred(reference(x_t, t, cond_w), x_t, t)
    return _WinnerRows(x_t, t, cond_w, ref)


def _winner_losses(policy: Denoiser, rows: List[_WinnerRows], cfg: ObjectiveConfig) -> List[torch.Tensor]:
    """``mse(target, pred_pol)`` per row, [B] per entry of ``rows``, from one policy call on all of them: the sft
    and anchor rows together cost one batched call instead of two (on the tiny CPU model: 0.79 s a step against
    0.90 s, ``N = 3``, batch 16)."""
    x, t = torch.cat([r.x for r in rows]), torch.cat([r.t for r in rows])
    cond = rows[0].cond
    for r in rows[1:]:
        cond = _cat_cond(cond, r.cond)
    pred = cfg.pred(policy(x, t, cond), x, t)
    errors = mse(torch.cat([r.target for r in rows]), pred)
    return list(errors.split([r.x.shape[0] for r in rows]))


def sft(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """Supervised fine-tuning on the winners only (``winner_sft_loss``), plus ``anchor_weight`` times the reference
    anchor when set: the pair objectives' two terms on the winners (``with_winner_sft``, the sft term at weight 1)
    without a preference term, with the same draws and one policy call."""
    no_preference = lambda: ObjectiveOutput(z0.new_zeros(z0.shape[0] // 2))  # noqa: E731
    return with_winner_sft(no_preference, policy, z0, cond, null_cond, replace(cfg, sft_weight=1.0), reference)


def with_winner_sft(
    objective: Callable[[], ObjectiveOutput], policy: Denoiser, z0, cond, null_cond, cfg, reference=None
):
    """A pair objective's output plus ``sft_weight`` times the winners' sft loss (``winner_sft_loss``): a supervised
    anchor on the preferred images, as RPO (Pang et al. 2024) adds the winner's NLL to DPO. The preference term
    moves what the pair's images differ in; the anchor keeps the policy's likelihood of the winners from falling,
    and with fresh noise at high ``t`` it reaches the layout a sample decides from pure noise, which inverted
    latents (that already hold their image's layout) do not train. One more policy call with grad, on B rows.
    In the two-pass scheme the term is one more gradient chunk; its gradient adds to the preference's.

    ``objective()`` computes the preference term. The sft term draws its t and noise first, so that they are the
    same whatever the objective draws (Diffusion-DPO and InPO draw theirs; a run from the cache draws none).

    With ``anchor_weight`` (and ``reference``) it adds ``anchor_weight`` times ``reference_anchor_loss`` too, drawn
    after the sft term: one reference call without grad on B rows, and B more rows in the sft term's policy call."""
    terms = []  # (name, weight, rows), drawn in this order
    if cfg.sft_weight:
        terms.append(("sft", cfg.sft_weight, _sft_rows(z0, cond, null_cond, cfg)))
    if cfg.anchor_weight:
        terms.append(("anchor", cfg.anchor_weight, _anchor_rows(reference, z0, cond, null_cond, cfg)))
    if not terms:
        return objective()
    losses = _winner_losses(policy, [rows for _, _, rows in terms], cfg)
    out = objective()
    logs = {**out.logs, **{name: loss.detach().mean() for (name, _, _), loss in zip(terms, losses)}}
    term = sum(weight * loss for (_, weight, _), loss in zip(terms, losses))
    if out.grad_chunks is None:
        return ObjectiveOutput(out.loss + term, out.margin, logs)
    return ObjectiveOutput(out.loss + term.detach(), out.margin, logs, out.grad_chunks + [lambda: term])


OBJECTIVES: Dict[str, Callable[..., ObjectiveOutput]] = {
    "diffusion_dpo": diffusion_dpo,
    "inversion_dpo": inversion_dpo,
    "inpo": inpo,
    "sft": sft,
}
