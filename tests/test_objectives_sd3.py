"""The SD3 trainer's objectives in flow space, on hand-made tensors and a tiny linear velocity model whose 'adapter'
can be switched off; and its Euler inversion against diffusers' FlowMatchEulerDiscreteScheduler."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from train_inversion_dpo_sd3 import (
    OBJECTIVES,
    ObjectiveConfig,
    flow_grid,
    flow_invert,
    inversion_dpo,
    inversion_policy,
    inversion_step_weights,
    invert_pairs,
)


class LinearVelocity(torch.nn.Module):
    """v = W x * (1 + s) + cond bias; the 'adapter' adds D x. D = 0 means policy == reference."""

    def __init__(self, channels=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(channels, channels, generator=g) * 0.3
        self.D = torch.nn.Parameter(torch.zeros(channels, channels))

    def forward(self, x, s, cond, adapter=True):
        M = self.W + (self.D if adapter else 0)
        scale = (1 + s.float()).reshape(-1, 1, 1, 1)
        return torch.einsum("ij,bjhw->bihw", M, x) * scale + cond["bias"].view(-1, x.shape[1], 1, 1)

    def policy(self, x, s, cond):
        return self(x, s, cond)

    def reference(self, x, s, cond):
        return self(x, s, cond, adapter=False)


def scheduler():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def make_cfg(**kw):
    base = {
        "sigmas": scheduler().sigmas.flip(0).float(),
        "beta": 500.0,
        "inversion_grid": flow_grid(scheduler(), 5),
        "inpo_grid": flow_grid(scheduler(), 4),
    }
    base.update(kw)
    return ObjectiveConfig(**base)


def pair_batch(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(2 * B, 4, 4, 4, generator=g)
    bias = torch.randn(B, 4, generator=g) * 0.1
    cond = {"bias": torch.cat([bias, bias])}
    return z0, cond, {"bias": torch.zeros_like(cond["bias"])}


def swap(z0):
    B = z0.shape[0] // 2
    return torch.cat([z0[B:], z0[:B]])


def moved_model(seed=5, scale=0.05):
    model = LinearVelocity()
    with torch.no_grad():
        model.D.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * scale)
    return model


def backward(out):
    for term in out.backward_terms():
        term().mean().backward()


PAIR_CASES = [
    ("diffusion_dpo", {}),
    ("diffusion_dpo", {"weighting_scheme": "logit_normal"}),
    ("inversion_dpo", {"inversion_target": "reference"}),
    ("inversion_dpo", {"inversion_target": "step"}),
    ("inversion_dpo", {"inversion_target": "x0"}),
    ("inversion_dpo", {"inversion_target": "x0", "timestep_weighting": "x0", "inversion_guidance_scale": 2.0}),
    ("inversion_dpo", {"inversion_target": "x0", "inversion_chunk_steps": 2}),
    ("inversion_dpo", {"inversion_target": "step", "inversion_margin": "step"}),
    ("inpo", {}),
]


@pytest.mark.parametrize("name,kw", PAIR_CASES)
def test_policy_equal_reference_gives_log2(name, kw):
    model = LinearVelocity()
    z0, cond, null = pair_batch()
    torch.manual_seed(0)
    out = OBJECTIVES[name](model.policy, model.reference, z0, cond, null, make_cfg(**kw))
    assert torch.equal(out.margin, torch.zeros(3))
    assert torch.allclose(out.loss, torch.full((3,), math.log(2)))


@pytest.mark.parametrize("name,kw", PAIR_CASES)
def test_swapping_winner_and_loser_flips_the_margin(name, kw):
    model = moved_model(seed=3, scale=0.1)
    z0, cond, null = pair_batch()
    torch.manual_seed(0)
    a = OBJECTIVES[name](model.policy, model.reference, z0, cond, null, make_cfg(**kw)).margin
    torch.manual_seed(0)
    b = OBJECTIVES[name](model.policy, model.reference, swap(z0), cond, null, make_cfg(**kw)).margin
    assert a.abs().min() > 0
    assert torch.allclose(a, -b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name,kw", [c for c in PAIR_CASES if c[1].get("inversion_target") != "reference"])
def test_gradient_steps_lower_the_loss_and_prefer_the_winner(name, kw):
    model = LinearVelocity()
    z0, cond, null = pair_batch()
    optimizer = torch.optim.Adam([model.D], lr=1e-3)
    losses = []
    for _ in range(5):
        torch.manual_seed(0)  # the same levels and noise each time: a deterministic descent test
        out = OBJECTIVES[name](model.policy, model.reference, z0, cond, null, make_cfg(**kw))
        losses.append(out.loss.mean().item())
        optimizer.zero_grad()
        backward(out)
        optimizer.step()
    assert losses[-1] < losses[0] - 1e-3
    assert (out.margin < 0).all()  # the implicit reward now prefers every winner


def test_the_reference_target_has_zero_gradient_at_initialisation():
    model = LinearVelocity()
    z0, cond, null = pair_batch()
    backward(inversion_dpo(model.policy, model.reference, z0, cond, null, make_cfg(inversion_target="reference")))
    assert model.D.grad.abs().max() == 0


def test_flow_dpo_is_the_velocity_error_margin_by_hand():
    model = moved_model()
    z0, cond, null = pair_batch(B=1)
    cfg = make_cfg()
    torch.manual_seed(7)
    out = OBJECTIVES["diffusion_dpo"](model.policy, model.reference, z0, cond, null, cfg)
    # the same draws by hand: the level, then the noise
    torch.manual_seed(7)
    s = cfg.sigmas[cfg.levels(1, "cpu")].repeat(2)
    n = torch.randn_like(z0[:1]).repeat(2, 1, 1, 1)
    x = (1 - s.view(-1, 1, 1, 1)) * z0 + s.view(-1, 1, 1, 1) * n
    target = n - z0
    with torch.no_grad():
        e_pol = (model.policy(x, s, cond) - target).pow(2).mean((1, 2, 3))
        e_ref = (model.reference(x, s, cond) - target).pow(2).mean((1, 2, 3))
    margin = (e_pol[0] - e_ref[0]) - (e_pol[1] - e_ref[1])
    assert torch.allclose(out.margin, margin.reshape(1), rtol=1e-5)
    assert torch.allclose(out.loss, -torch.nn.functional.logsigmoid(-250.0 * margin).reshape(1), rtol=1e-5)


def test_levels_follow_the_weighting_scheme_and_stay_in_bounds():
    cfg = make_cfg()
    torch.manual_seed(0)
    uniform = cfg.levels(20000, "cpu")
    assert uniform.min() >= 0 and uniform.max() <= 999 and abs(uniform.float().mean().item() - 499.5) < 10
    logit = make_cfg(weighting_scheme="logit_normal").levels(20000, "cpu")
    # logit-normal piles up in the middle: fewer draws in the outer fifths than uniform
    outer = lambda t: ((t < 200) | (t >= 800)).float().mean().item()  # noqa: E731
    assert outer(logit) < outer(uniform) - 0.1
    bounded = cfg.levels(5000, "cpu", low=600)
    assert bounded.min() >= 600 and bounded.max() == 999
    assert cfg.levels(5000, "cpu", high=100).max() == 99


def test_the_inversion_is_diffusers_euler_run_upwards_and_samples_back():
    # the trainer's inversion grid is the sampler's: stepping the scheduler down from x_N with the same velocity
    # (a velocity that does not depend on x) lands exactly on z0
    grid = flow_grid(scheduler(), 6)
    sched = scheduler()
    sched.set_timesteps(6)
    assert torch.allclose(grid.sigmas, sched.sigmas.flip(0))
    assert torch.allclose(grid.timesteps * 1000, sched.timesteps.flip(0))

    def velocity(x, s):
        return torch.ones_like(x) * torch.cos(3 * s)

    z0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x = flow_invert(velocity, z0, grid).latents[-1]
    for t in sched.timesteps:
        x = sched.step(velocity(x, t / 1000), t, x).prev_sample
    assert torch.allclose(x, z0, atol=1e-5)


@pytest.mark.parametrize("target", ["step", "x0"])
def test_the_targets_land_where_they_should(target):
    # step: one Euler step down from x_i with the target lands on x_{i-1}; x0: one step from x_i to sigma 0 lands
    # on z0. Both at every level, the lowest (sigma about 0.009) included.
    model = moved_model()
    z0, cond, null = pair_batch()
    cfg = make_cfg(inversion_target=target)
    inv = invert_pairs(model.reference, z0, cond, null, cfg)
    grid = cfg.inversion_grid
    trajectory = flow_invert(lambda x, s: model.reference(x, s.expand(6), cond), z0, grid).latents
    for i in range(5):
        x_i = inv.x[i]
        assert torch.allclose(x_i, trajectory[i], atol=1e-6)
        land = x_i - (grid.sigmas[i + 1] - (grid.sigmas[i] if target == "step" else 0)) * inv.target[i]
        expected = z0 if target == "x0" or i == 0 else trajectory[i - 1]
        assert torch.allclose(land, expected, atol=1e-5), i
    assert grid.sigmas[1] < 0.01


def test_the_x0_weighting_is_the_clean_latents_error():
    sigmas = torch.tensor([0.01, 0.5, 1.0])
    assert torch.allclose(inversion_step_weights(sigmas, "x0"), sigmas**2)
    assert torch.equal(inversion_step_weights(sigmas, "uniform"), torch.ones(3))
    with pytest.raises(ValueError, match="timestep weighting"):
        inversion_step_weights(sigmas, "official")


@pytest.mark.parametrize("target", ["reference", "step", "x0"])
def test_two_pass_gradient_equals_the_one_graph_gradient(target):
    z0, cond, null = pair_batch()
    model = moved_model()

    def grad_and_loss(chunk):
        model.D.grad = None
        cfg = make_cfg(inversion_target=target, inversion_chunk_steps=chunk, beta=50.0)
        out = inversion_dpo(model.policy, model.reference, z0, cond, null, cfg)
        assert (out.grad_chunks is None) == (chunk is None)
        backward(out)
        return model.D.grad.clone(), out.loss.detach()

    one_graph_grad, one_graph_loss = grad_and_loss(None)
    assert one_graph_grad.abs().max() > 0
    for chunk in (1, 2, 4):
        grad, loss = grad_and_loss(chunk)
        assert torch.allclose(loss, one_graph_loss, atol=1e-6)
        assert torch.allclose(grad, one_graph_grad, rtol=1e-4, atol=1e-7), chunk


def test_k_of_n_gradient_is_unbiased_and_the_loss_exact():
    z0, cond, null = pair_batch()
    model = moved_model()

    def grad_and_loss(k):
        model.D.grad = None
        out = inversion_dpo(model.policy, model.reference, z0, cond, null, make_cfg(inversion_grad_steps=k))
        backward(out)
        return model.D.grad.clone(), out.loss.detach()

    exact_grad, exact_loss = grad_and_loss(None)
    torch.manual_seed(0)
    draws = [grad_and_loss(2) for _ in range(400)]
    assert all(torch.allclose(loss, exact_loss, atol=1e-6) for _, loss in draws)
    mean_grad = torch.stack([g for g, _ in draws]).mean(0)
    assert torch.allclose(mean_grad, exact_grad, rtol=0.1, atol=0.05 * exact_grad.abs().max().item())
    assert not torch.allclose(draws[0][0], exact_grad, rtol=1e-3)


def test_per_step_margin_averages_to_the_trajectory_margin():
    z0, cond, null = pair_batch()
    model = moved_model()
    cfg = make_cfg()
    trajectory = inversion_policy(model.policy, invert_pairs(model.reference, z0, cond, null, cfg), cond, cfg).margin
    step_cfg = make_cfg(inversion_margin="step")
    per_step = []
    for i in range(5):
        one = invert_pairs(model.reference, z0, cond, null, step_cfg, torch.full((1, 6), i))
        per_step.append(inversion_policy(model.policy, one, cond, step_cfg).margin)
    assert torch.allclose(torch.stack(per_step).mean(0), trajectory, rtol=1e-5, atol=1e-9)


def test_inpo_target_lands_on_the_image_from_the_sampled_level():
    # the policy's inversion to each pair's sigma, then one step to sigma 0 with the target lands on z0
    model = moved_model()
    z0, cond, null = pair_batch()
    seen = []

    def policy(x, s, c):
        seen.append(s.clone())
        return model.policy(x, s, c)

    torch.manual_seed(4)
    OBJECTIVES["inpo"](policy, model.reference, z0, cond, null, make_cfg())
    s = seen[-1]  # the last policy call is the one with grad, at each pair's own level
    assert torch.equal(s[:3], s[3:]) and s.min() > 0


def test_sft_is_the_winners_flow_matching_error():
    model = moved_model()
    z0, cond, null = pair_batch()
    cfg = make_cfg(sft_min_timestep=900)
    torch.manual_seed(2)
    out = OBJECTIVES["sft"](model.policy, model.reference, z0, cond, null, cfg)
    torch.manual_seed(2)
    s = cfg.sigmas[cfg.levels(3, "cpu", low=900)]
    assert s.min() >= cfg.sigmas[900]
    n = torch.randn_like(z0[:3])
    x = (1 - s.view(-1, 1, 1, 1)) * z0[:3] + s.view(-1, 1, 1, 1) * n
    with torch.no_grad():
        expected = (model.policy(x, s, {"bias": cond["bias"][:3]}) - (n - z0[:3])).pow(2).mean((1, 2, 3))
    assert torch.allclose(out.loss, expected, rtol=1e-5)
