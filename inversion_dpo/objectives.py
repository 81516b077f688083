"""The preference objectives, as functions of tensors and noise predictors.

Each objective reads a batch of preference pairs and returns per-pair losses plus what it wants logged. It never
sees ``args`` or the accelerator: the UNet reaches it as two noise predictors, ``policy(x, t, cond)`` (the UNet
with the LoRA adapter on, with grad) and ``reference(x, t, cond)`` (the adapter off, under ``no_grad``), where
``x`` stacks winners then losers and ``cond`` is a dict of per-row conditioning tensors (any nesting).

All pair objectives share Diffusion-DPO's form (Wallace et al. 2023, arXiv 2311.12908, eq. 14)::

    loss = link(-beta / 2 * margin)        link(z) = -log sigmoid(z)   ("sigmoid", default)
                                                     relu(1 - z)       ("hinge")
                                                     (z - 1/2)^2       ("ipo", Azar et al. 2023, times beta^2)

``beta`` here is the beta of the Diffusion-DPO paper with its constant ``T`` folded in, and the 1/2 is applied
inside (as the diffusers SD1.5 DPO example does): beta 5000 here means what ``--beta_dpo 5000`` means there.
``margin < 0`` means the policy prefers the winner more than the reference does: that pair counts as correct in
``accuracy``. With policy == reference every margin is exactly 0 and the sigmoid loss is log 2.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .ddim import DDIMGrid, ddim_inverse_step, ddim_invert, ddpm_posterior_std, implied_noise


Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
INVERSION_TARGETS = ("reference", "step", "x0")
TIMESTEP_WEIGHTINGS = ("official", "uniform")


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
    """Weights of the inversion steps from their levels' alphas: official ``1 / (2 a_t)`` or uniform 1."""
    if weighting == "official":
        return 1.0 / (2.0 * alphas)
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
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else a


# ---------------------------------------------------------------------------------------------------------------
# Objectives


@dataclass
class ObjectiveConfig:
    alphas_cumprod: torch.Tensor  # [T] float32, the model's own schedule
    beta: float = 5000.0
    loss_type: str = "sigmoid"
    inversion_grid: Optional[DDIMGrid] = None  # inversion_dpo: the N-step grid
    inversion_guidance_scale: float = 1.0
    inversion_target: str = "step"
    inversion_grad_steps: Optional[int] = None  # k of N steps back-propagated (unbiased); None = all (exact)
    timestep_weighting: str = "official"
    inpo_grid: Optional[DDIMGrid] = None  # inpo: the coarse grid
    inpo_eta: float = 0.0

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # [B], with grad
    margin: Optional[torch.Tensor] = None  # [B], detached; None for sft
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, detached


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
    eps_pol = policy(x_t, t, cond)
    with torch.no_grad():
        eps_ref = reference(x_t, t, cond)
    margin = dpo_margin(eps_pol[:B], eps_ref[:B], noise[:B], eps_pol[B:], eps_ref[B:], noise[B:])
    return _pair_output(margin, cfg, timestep=t[:B].float().mean())


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

    Cost per pair: N (x2 with guidance) reference inversion rows, N reference rows, N policy rows with grad. With
    ``inversion_grad_steps = k < N``: N policy rows without grad and k with grad, an unbiased gradient.
    """
    grid = cfg.inversion_grid
    N, B2 = len(grid.timesteps), z0.shape[0]
    B = B2 // 2
    with torch.no_grad():
        invert_eps = guided(reference, cond, null_cond, cfg.inversion_guidance_scale)
        trajectory = ddim_invert(lambda x, t: invert_eps(x, t.expand(B2)), z0, grid)
        x_i = torch.stack(trajectory.latents)  # [N, 2B, C, H, W]
        t_i = grid.timesteps[:, None].expand(N, B2)  # [N, 2B]
        a_i = grid.alphas[1:, None].expand(N, B2)
        if cfg.inversion_target == "reference":
            x_in = torch.stack([z0] + trajectory.latents[:-1])  # x_{i-1}: the inversion's own inputs
        else:
            x_in = x_i
        cond_n = tile_cond(cond, N)
        eps_ref = reference(x_in.flatten(0, 1), t_i.flatten(), cond_n).view_as(x_in)
        if cfg.inversion_target == "step":
            target = torch.stack(trajectory.noises)
        elif cfg.inversion_target == "x0":
            target = implied_noise(x_i.flatten(0, 1), z0.repeat(N, 1, 1, 1), a_i.flatten()).view_as(x_i)
        elif cfg.inversion_target != "reference":
            raise ValueError(f"unknown inversion_target {cfg.inversion_target!r}; expected one of {INVERSION_TARGETS}")
    weights = inversion_step_weights(grid.alphas[1:], cfg.timestep_weighting)  # [N]

    def weighted_terms(steps, eps_pol):  # [len(steps), B]: w_i m_i of the given steps
        rows = []
        for j, i in enumerate(steps):
            pw, pl, rw, rl = eps_pol[j, :B], eps_pol[j, B:], eps_ref[i, :B], eps_ref[i, B:]
            if cfg.inversion_target == "reference":
                rows.append(reference_distance_margin(pw, rw, pl, rl))
            else:
                rows.append(dpo_margin(pw, rw, target[i, :B], pl, rl, target[i, B:]))
        return weights[steps, None] * torch.stack(rows)

    def policy_on(steps):  # one policy call over the given steps: one forward per backward keeps DDP's reducer happy
        x = x_in[steps]
        return policy(x.flatten(0, 1), t_i[steps].flatten(), tile_cond(cond, len(steps))).view_as(x)

    k = cfg.inversion_grad_steps or N
    if k >= N:  # exact: every step with grad
        margin = weighted_terms(list(range(N)), policy_on(list(range(N)))).mean(0)
        return _pair_output(margin, cfg)

    # Unbiased k-of-N gradient (method.md): the margin, and so the link's slope, from every step without grad; the
    # gradient from k random steps scaled N/k. The sum sits inside the sigmoid, so sampling steps for the loss itself
    # would be biased; sampling them only for d margin is not.
    with torch.no_grad():
        margin = weighted_terms(list(range(N)), policy_on(list(range(N)))).mean(0)
    steps = torch.randperm(N, device=z0.device)[:k].tolist()
    margin_estimate = weighted_terms(steps, policy_on(steps)).mean(0)  # E[.] = margin
    slope = _link_slope(margin, cfg)
    loss = preference_loss(margin, cfg.beta, cfg.loss_type) + slope * (margin_estimate - margin_estimate.detach())
    return ObjectiveOutput(loss, margin.detach(), {})


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
        x_next = ddim_inverse_step(x, policy(x, label, cond), a_from, a_to)
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
        tau = implied_noise(x_t, z0, a_t)
        eps_ref = reference(x_t, t, cond)
    eps_pol = policy(x_t, t, cond)
    margin = dpo_margin(eps_pol[:B], eps_ref[:B], tau[:B], eps_pol[B:], eps_ref[B:], tau[B:])
    return _pair_output(margin, cfg, timestep=t[:B].float().mean())


def sft(policy: Denoiser, reference: Denoiser, z0, cond, null_cond, cfg: ObjectiveConfig):
    """Supervised fine-tuning on the winners only: ``||n - eps_pol(x_t^w, t)||^2`` (the usual diffusion loss)."""
    B = z0.shape[0] // 2
    z0_w, cond_w = z0[:B], take_cond(cond, slice(0, B))
    t = torch.randint(0, cfg.num_train_timesteps, (B,), device=z0.device)
    noise = torch.randn_like(z0_w)
    eps_pol = policy(_add_noise(z0_w, noise, cfg.alphas_cumprod[t]), t, cond_w)
    return ObjectiveOutput(mse(noise, eps_pol))


OBJECTIVES: Dict[str, Callable[..., ObjectiveOutput]] = {
    "diffusion_dpo": diffusion_dpo,
    "inversion_dpo": inversion_dpo,
    "inpo": inpo,
    "sft": sft,
}
