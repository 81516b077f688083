"""The DDIM functions against diffusers' schedulers, which every Stable Diffusion user already trusts.

The pipeline's inversion and the trainers' targets are built from these functions (the trainers and the SDXL pipeline
hold marked copies of ``pipeline_inversion.py``'s), so an error here would be an error everywhere; each test states
the property in the words of their docstrings. Denoising is ``ddim_move`` from a higher level to a lower one.
"""

import itertools

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from pipeline_inversion import ddim_grid, ddim_inverse_step, ddim_invert, ddim_move, eps_from_prediction


SHAPE = (2, 4, 8, 8)

# Stable Diffusion's own schedule, crossed with the options that move the grid or its clean end
CONFIGS = [
    {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "prediction_type": "epsilon",
        "timestep_spacing": spacing,
        "set_alpha_to_one": alpha_to_one,
        "steps_offset": offset,
    }
    for spacing, alpha_to_one, offset in itertools.product(["leading", "trailing"], [True, False], [0, 1])
]
CONFIG_IDS = [f"{c['timestep_spacing']}-one{int(c['set_alpha_to_one'])}-offset{c['steps_offset']}" for c in CONFIGS]
# DDIMScheduler.step finds the previous level as t - T // N, which is on the grid for "leading" spacing, and for
# "trailing" only when N divides T; 7 steps exercise the leading grid's uneven division
CASES = [(c, n) for c in CONFIGS for n in ([10, 7] if c["timestep_spacing"] == "leading" else [10, 25])]
CASE_IDS = [f"{CONFIG_IDS[CONFIGS.index(c)]}-{n}steps" for c, n in CASES]


def schedulers(config, num_steps):
    forward, inverse = DDIMScheduler(**config), DDIMInverseScheduler(**config)
    forward.set_timesteps(num_steps)
    inverse.set_timesteps(num_steps)
    return forward, inverse


def denoise_down_the_grid(eps_fn, x_N, grid):
    """Denoises from the top of the grid down to the clean level with ``ddim_move``: the exact reverse of
    ``ddim_invert``'s walk, as ``DDIMScheduler`` samples (the pipeline's ``__call__``)."""
    x = x_N
    for i in reversed(range(len(grid.timesteps))):
        x = ddim_move(x, eps_fn(x, grid.timesteps[i]), grid.alphas[i + 1], grid.alphas[i])
    return x


def smooth_eps(seed=0):
    """A noise predictor that depends on both x and t, so an off-by-one label or level shows."""
    w = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed))
    return lambda x, t: torch.tanh(w * x + float(t) / 500.0)


@pytest.mark.parametrize("config,num_steps", CASES, ids=CASE_IDS)
def test_grid_is_the_schedulers_grid(config, num_steps):
    forward, inverse = schedulers(config, num_steps)
    grid = ddim_grid(DDIMScheduler(**config), num_steps)

    assert grid.timesteps.tolist() == forward.timesteps.flip(0).tolist() == inverse.timesteps.tolist()
    assert grid.timesteps.tolist() == sorted(grid.timesteps.tolist())
    assert grid.alphas.shape == (num_steps + 1,)
    assert grid.alphas[0] == forward.final_alpha_cumprod == inverse.initial_alpha_cumprod
    torch.testing.assert_close(grid.alphas[1:], forward.alphas_cumprod[grid.timesteps], rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config,num_steps", CASES, ids=CASE_IDS)
def test_ddim_move_down_is_ddim_scheduler_step(config, num_steps, prediction_type):
    """A move to the next lower level is ``DDIMScheduler.step(eps, t, x_t, eta=0).prev_sample``; v_prediction
    (SD 2.x's 768-v models): moving with ``eps_from_prediction(v)`` is DDIMScheduler's own v-prediction step."""
    config = dict(config, prediction_type=prediction_type)
    forward, _ = schedulers(config, num_steps)
    grid = ddim_grid(DDIMScheduler(**config), num_steps)
    gen = torch.Generator().manual_seed(1)
    for i in range(num_steps):
        x_t, out = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
        expected = forward.step(out, grid.timesteps[i], x_t, eta=0.0).prev_sample
        eps = eps_from_prediction(out, x_t, grid.alphas[i + 1], prediction_type)
        actual = ddim_move(x_t, eps, grid.alphas[i + 1], grid.alphas[i])
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_other_prediction_types_are_refused():
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="'sample' is not supported"):
        eps_from_prediction(x, x, 0.5, "sample")


@pytest.mark.parametrize("config,num_steps", CASES, ids=CASE_IDS)
def test_ddim_inverse_step_is_ddim_inverse_scheduler_step(config, num_steps):
    _, inverse = schedulers(config, num_steps)
    grid = ddim_grid(DDIMScheduler(**config), num_steps)
    gen = torch.Generator().manual_seed(2)
    for i in range(num_steps):
        x_s, eps = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
        expected = inverse.step(eps, grid.timesteps[i], x_s).prev_sample
        actual = ddim_inverse_step(x_s, eps, grid.alphas[i], grid.alphas[i + 1])
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,num_steps", CASES, ids=CASE_IDS)
def test_ddim_invert_is_a_ddim_inverse_scheduler_loop(config, num_steps):
    _, inverse = schedulers(config, num_steps)
    eps_fn = smooth_eps()
    z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    x, latents, noises = z0, [], []
    for t in inverse.timesteps:
        e = eps_fn(x, t)
        x = inverse.step(e, t, x).prev_sample
        latents.append(x)
        noises.append(e)

    walk = ddim_invert(eps_fn, z0, ddim_grid(DDIMScheduler(**config), num_steps))
    assert len(walk.latents) == len(walk.noises) == num_steps
    torch.testing.assert_close(torch.stack(walk.latents), torch.stack(latents), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(walk.noises), torch.stack(noises), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,num_steps", CASES, ids=CASE_IDS)
def test_moving_down_the_grid_is_a_ddim_scheduler_loop(config, num_steps):
    forward, _ = schedulers(config, num_steps)
    eps_fn = smooth_eps()
    x_N = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))

    x = x_N
    for t in forward.timesteps:
        x = forward.step(eps_fn(x, t), t, x, eta=0.0).prev_sample

    actual = denoise_down_the_grid(eps_fn, x_N, ddim_grid(DDIMScheduler(**config), num_steps))
    torch.testing.assert_close(actual, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_sample_undoes_invert_when_eps_ignores_x(config):
    # eps(x, t) = table[t]: sampling sees at each level the very noise the inversion used, so the round trip is
    # exact whatever the grid; it is the linear relation of the module docstring, walked both ways
    table = torch.randn((1000,) + SHAPE, generator=torch.Generator().manual_seed(5))
    eps_fn = lambda x, t: table[int(t)]  # noqa: E731
    grid = ddim_grid(DDIMScheduler(**config), 50)
    z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))

    walk = ddim_invert(eps_fn, z0, grid)
    assert (walk.latents[-1] - z0).abs().max() > 0.5  # it did go somewhere
    torch.testing.assert_close(denoise_down_the_grid(eps_fn, walk.latents[-1], grid), z0, rtol=0, atol=2e-5)
    # and every intermediate latent is reached on the way down: one denoising step from x_i with e_i gives x_{i-1}
    below = [z0] + walk.latents[:-1]
    for i, (x_i, e_i) in enumerate(zip(walk.latents, walk.noises)):
        torch.testing.assert_close(
            ddim_move(x_i, e_i, grid.alphas[i + 1], grid.alphas[i]), below[i], atol=2e-5, rtol=0
        )


def test_per_sample_alphas_broadcast():
    gen = torch.Generator().manual_seed(7)
    x, eps = (torch.randn(SHAPE, generator=gen) for _ in range(2))
    a_t, a_s = torch.tensor([0.3, 0.05]), torch.tensor([0.9, 0.5])

    for fn in (ddim_move, ddim_inverse_step):
        batched = fn(x, eps, a_t, a_s)
        one_by_one = torch.stack([fn(x[b], eps[b], float(a_t[b]), float(a_s[b])) for b in range(2)])
        torch.testing.assert_close(batched, one_by_one)
        assert not torch.allclose(batched, fn(x, eps, float(a_t[0]), float(a_s[0])))


def test_a_move_to_the_clean_level_lands_on_z0():
    gen = torch.Generator().manual_seed(8)
    x_t, z0, n = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    alphas_cumprod = DDIMScheduler(**CONFIGS[0]).alphas_cumprod
    a_t = alphas_cumprod[torch.tensor([999, 250])]  # one noisy level per sample
    a = a_t.reshape(-1, 1, 1, 1)

    # a forward-noised x_t and the noise that was added: one denoising move to the clean level (a = 1) hits z0
    noised = a.sqrt() * z0 + (1 - a).sqrt() * n
    torch.testing.assert_close(ddim_move(noised, n, a_t, 1.0), z0, rtol=1e-4, atol=1e-4)
    # any x_t: the noise (x_t - sqrt(a_t) z0) / sqrt(1 - a_t) is the one that move needs to hit z0
    tau = (x_t - a.sqrt() * z0) / (1 - a).sqrt()
    torch.testing.assert_close(ddim_move(x_t, tau, a_t, 1.0), z0, rtol=1e-5, atol=1e-5)


def test_a_move_between_equal_levels_stays_also_at_zero_snr():
    gen = torch.Generator().manual_seed(9)
    x, eps = (torch.randn(SHAPE, generator=gen) for _ in range(2))
    for a in (0.0, 0.5, torch.tensor([0.0, 0.3])):
        assert torch.equal(ddim_move(x, eps, a, a), x)
        assert torch.equal(ddim_inverse_step(x, eps, a, a), x)
