"""Deterministic DDIM (Song et al. 2021, arXiv 2010.02502, eq. 12 with eta = 0), both ways.

Sampling (denoising) and inversion are the same linear relation between two latents at noise levels
``a_s < a_t`` (``a`` = ``alphas_cumprod``, larger means cleaner) and one noise prediction ``e``::

    x_s / sqrt(a_s) - x_t / sqrt(a_t) = e * (sqrt(1 - a_s) / sqrt(a_s) - sqrt(1 - a_t) / sqrt(a_t))

so one pure function moves a latent between two levels, and the pipeline (inference) and the trainers import
it, so the two cannot drift apart. Nothing here sees a UNet, a prompt or a scheduler object: a noise
predictor is passed in as ``eps_fn(x, t) -> eps``.
"""

from typing import Callable, List, NamedTuple, Union

import torch


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


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, a_t: Alpha, a_s: Alpha) -> torch.Tensor:
    """Denoises ``x_t`` (level ``a_t``) to the lower noise level ``a_s``; ``eps = eps(x_t, t)``.

    Equals ``DDIMScheduler.step(eps, t, x_t, eta=0).prev_sample``.
    """
    return ddim_move(x_t, eps, a_t, a_s)


def ddim_inverse_step(x_s: torch.Tensor, eps: torch.Tensor, a_s: Alpha, a_t: Alpha) -> torch.Tensor:
    """Inverts ``x_s`` (level ``a_s``) up to the higher noise level ``a_t``.

    The noise is predicted at the lower latent with the upper label, ``eps = eps(x_s, t)`` (the convention of
    null-text inversion, of diffusers' ``DDIMInverseScheduler`` and of the official Inversion-DPO code).
    Equals ``DDIMInverseScheduler.step(eps, t, x_s).prev_sample``.
    """
    return ddim_move(x_s, eps, a_s, a_t)


def implied_noise(x_t: torch.Tensor, z0: torch.Tensor, a_t: Alpha) -> torch.Tensor:
    """The noise that a one-step denoise from ``x_t`` would need to land exactly on ``z0``.

    ``tau = (x_t - sqrt(a_t) z0) / sqrt(1 - a_t)`` (InPO's reparametrisation, arXiv 2503.18454).
    """
    a_t = _as_tensor(a_t, x_t)
    return (x_t.float() - a_t.sqrt() * z0.float()) / (1 - a_t).sqrt()


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


def ddim_sample(eps_fn: Callable, x_N: torch.Tensor, grid: DDIMGrid) -> torch.Tensor:
    """Denoises from the top of the grid down to the clean level (the exact reverse of ``ddim_invert``'s walk)."""
    x = x_N
    for i in reversed(range(len(grid.timesteps))):
        x = ddim_step(x, eps_fn(x, grid.timesteps[i]), grid.alphas[i + 1], grid.alphas[i])
    return x


def ddpm_posterior_std(a_s: Alpha, a_t: Alpha) -> torch.Tensor:
    """Std of q(x_s | x_t, x_0) for levels a_s > a_t (DDPM eq. 7 between two arbitrary levels); 0 between equal
    levels (no step), also where both are 0."""
    a_s, a_t = torch.as_tensor(a_s, dtype=torch.float32), torch.as_tensor(a_t, dtype=torch.float32)
    stay = a_s == a_t
    var = (1 - a_s) / torch.where(stay, 1.0, 1 - a_t) * (1 - a_t / torch.where(stay, 1.0, a_s))
    return torch.where(stay, 0.0, var).clamp(min=0).sqrt()
