"""The objectives on hand-made tensors and a tiny linear denoiser whose 'adapter' can be switched off."""

import math
from unittest import mock

import pytest
import torch

from train_inversion_dpo import (
    LOSS_SPACES,
    OBJECTIVES,
    ObjectiveConfig,
    ddim_grid,
    ddim_move,
    ddpm_posterior_std,
    dpo_margin,
    inversion_step_weights,
    invert_pairs,
    mse,
    preference_loss,
    reference_distance_margin,
)


def test_links_at_zero_margin_and_by_hand():
    zero = torch.zeros(3)
    assert torch.allclose(preference_loss(zero, 5000.0, "sigmoid"), torch.full((3,), math.log(2)))
    assert torch.allclose(preference_loss(zero, 5000.0, "hinge"), torch.ones(3))
    assert torch.allclose(preference_loss(zero, 5000.0, "ipo"), torch.full((3,), 0.25))
    # beta 2000 and margin -1e-3 give the logit -beta/2 * margin = 1
    m = torch.tensor([-1e-3])
    assert preference_loss(m, 2000.0, "sigmoid").item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-5)
    assert preference_loss(m, 2000.0, "hinge").item() == pytest.approx(0.0, abs=1e-6)
    assert preference_loss(m, 2000.0, "ipo").item() == pytest.approx(0.25, rel=1e-5)
    assert preference_loss(-m, 2000.0, "hinge").item() == pytest.approx(2.0, rel=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(m, 1.0, "nope")


def test_dpo_margin_by_hand():
    one = torch.ones(1, 2)
    # winner: policy error 0, reference error 1 -> -1; loser: policy error 4, reference error 0 -> +4
    margin = dpo_margin(one, 0 * one, one, 3 * one, one, one)
    assert margin.item() == pytest.approx(-1.0 - 4.0)
    assert mse(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2)).item() == pytest.approx(5.0)
    assert reference_distance_margin(one, 0 * one, one, one).item() == pytest.approx(1.0)


def test_official_step_weights():
    alphas = torch.tensor([0.5, 0.25])
    assert torch.allclose(inversion_step_weights(alphas, "official"), torch.tensor([1.0, 2.0]))
    assert torch.allclose(inversion_step_weights(alphas, "uniform"), torch.ones(2))
    # zero terminal SNR: the pure-noise level weighs 0, not inf (0 * inf would make the loss nan)
    zero_snr = inversion_step_weights(torch.tensor([0.5, 0.0]), "official")
    assert zero_snr.tolist() == [1.0, 0.0]


class LinearDenoiser(torch.nn.Module):
    """eps = W x * (1 + t / T) + cond bias; the 'adapter' adds D x. D = 0 means policy == reference."""

    def __init__(self, channels=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(channels, channels, generator=g) * 0.3
        self.D = torch.nn.Parameter(torch.zeros(channels, channels))

    def forward(self, x, t, cond, adapter=True):
        M = self.W + (self.D if adapter else 0)
        scale = (1 + t.float() / 1000).view(-1, 1, 1, 1)
        return torch.einsum("ij,bjhw->bihw", M, x) * scale + cond["bias"].view(-1, x.shape[1], 1, 1)

    def policy(self, x, t, cond):
        return self(x, t, cond)

    def reference(self, x, t, cond):
        return self(x, t, cond, adapter=False)


def make_cfg(**kw):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    grid = lambda n: ddim_grid(DDIMScheduler.from_config(sched.config), n)  # noqa: E731
    base = {
        "alphas_cumprod": sched.alphas_cumprod.float(),
        "beta": 500.0,
        "inversion_grid": grid(5),
        "inpo_grid": grid(4),
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


PAIR_CASES = [
    ("diffusion_dpo", {}),
    ("inversion_dpo", {"inversion_target": "reference"}),
    ("inversion_dpo", {"inversion_target": "step"}),
    ("inversion_dpo", {"inversion_target": "x0"}),
    ("inversion_dpo", {"inversion_target": "step", "inversion_guidance_scale": 2.0, "timestep_weighting": "uniform"}),
    ("inversion_dpo", {"inversion_target": "x0", "inversion_chunk_steps": 2}),
    ("inversion_dpo", {"inversion_target": "step", "inversion_margin": "step"}),
    ("inpo", {}),
    ("inpo", {"inpo_eta": 0.1}),
]


@pytest.mark.parametrize("name,kw", PAIR_CASES)
def test_policy_equal_reference_gives_log2(name, kw):
    model = LinearDenoiser()
    z0, cond, null = pair_batch()
    torch.manual_seed(0)
    out = OBJECTIVES[name](model.policy, model.reference, z0, cond, null, make_cfg(**kw))
    assert torch.equal(out.margin, torch.zeros(3))
    assert torch.allclose(out.loss, torch.full((3,), math.log(2)))


@pytest.mark.parametrize("name,kw", PAIR_CASES)
def test_swapping_winner_and_loser_flips_the_margin(name, kw):
    model = LinearDenoiser()
    with torch.no_grad():
        model.D.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.1)
    z0, cond, null = pair_batch()
    torch.manual_seed(0)
    a = OBJECTIVES[name](model.policy, model.reference, z0, cond, null, make_cfg(**kw)).margin
    torch.manual_seed(0)
    b = OBJECTIVES[name](model.policy, model.reference, swap(z0), cond, null, make_cfg(**kw)).margin
    assert a.abs().min() > 0
    assert torch.allclose(a, -b, rtol=1e-4, atol=1e-7)


def backward(out):
    """What the trainer does: back-propagate the loss, or each chunk of a two-pass objective in turn."""
    for term in out.backward_terms():
        term().mean().backward()


def grad_norm_at_init(name, **kw):
    model = LinearDenoiser()
    z0, cond, null = pair_batch()
    torch.manual_seed(0)
    backward(OBJECTIVES[name](model.policy, model.reference, z0, cond, null, make_cfg(**kw)))
    return model.D.grad.norm().item()


def test_reference_target_has_zero_gradient_at_initialisation():
    # method.md's warning, reproduced: every term is a squared distance that is 0 at policy == reference
    assert grad_norm_at_init("inversion_dpo", inversion_target="reference") == 0.0
    assert grad_norm_at_init("inversion_dpo", inversion_target="reference", inversion_chunk_steps=1) == 0.0
    assert grad_norm_at_init("inversion_dpo", inversion_target="step") > 0.0
    assert grad_norm_at_init("inversion_dpo", inversion_target="x0") > 0.0


@pytest.mark.parametrize("name,kw", PAIR_CASES[:1] + PAIR_CASES[2:])
def test_gradient_steps_lower_the_loss_and_prefer_the_winner(name, kw):
    model = LinearDenoiser()
    z0, cond, null = pair_batch()
    optimizer = torch.optim.Adam([model.D], lr=1e-3)  # bounded steps: the official weights reach 1/(2 a_T) ~ 100
    losses = []
    for _ in range(5):
        torch.manual_seed(0)  # the same t and noise each time: a deterministic descent test
        out = OBJECTIVES[name](model.policy, model.reference, z0, cond, null, make_cfg(**kw))
        losses.append(out.loss.mean().item())
        optimizer.zero_grad()
        backward(out)
        optimizer.step()
    assert losses[-1] < losses[0] - 1e-3
    assert (out.margin < 0).all()  # the implicit reward now prefers every winner


def test_step_target_is_the_noise_that_denoises_onto_the_previous_latent():
    from train_inversion_dpo import ddim_invert

    model = LinearDenoiser()
    z0, cond, _ = pair_batch()
    cfg = make_cfg()
    grid = cfg.inversion_grid
    traj = ddim_invert(lambda x, t: model.reference(x, t.expand(len(x)), cond), z0, grid)
    previous = [z0] + traj.latents[:-1]
    for i in range(len(grid.timesteps)):
        landed = ddim_move(traj.latents[i], traj.noises[i], grid.alphas[i + 1], grid.alphas[i])
        assert torch.allclose(landed, previous[i], atol=1e-4)


def test_sft_is_the_winners_denoising_error():
    model = LinearDenoiser()
    z0, cond, null = pair_batch()
    cfg = make_cfg()
    torch.manual_seed(0)
    out = OBJECTIVES["sft"](model.policy, model.reference, z0, cond, null, cfg)
    torch.manual_seed(0)
    t = torch.randint(0, 1000, (3,))
    n = torch.randn(3, 4, 4, 4)
    a = cfg.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = a.sqrt() * z0[:3] + (1 - a).sqrt() * n
    expected = mse(n, model.policy(x, t, {"bias": cond["bias"][:3]}))
    assert out.margin is None
    assert torch.allclose(out.loss, expected)


def test_inpo_target_reaches_the_sampled_level():
    # with eps == 0 the inversion is a pure rescaling x = sqrt(a_t / a_clean) z0, so tau is known in closed form
    cfg = make_cfg()
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    seen = {}

    def policy(x, t, c):
        seen["t"], seen["x"] = t, x
        return torch.zeros_like(x)

    z0, cond, null = pair_batch()
    torch.manual_seed(0)
    OBJECTIVES["inpo"](policy, zero, z0, cond, null, cfg)
    a_t = cfg.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    clean = cfg.inpo_grid.alphas[0]
    assert torch.allclose(seen["x"], (a_t / clean).sqrt() * z0, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_inpo_at_the_top_level_of_a_zero_snr_schedule_is_finite(eta):
    """With zero terminal SNR the top level has a = 0; InPO's inversion reaches it on its grid and then steps "to t
    itself", a move from a = 0 to a = 0 that divided 0 by 0 (nan loss mid-run on the shapes base, t = 999)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    assert sched.alphas_cumprod[-1] == 0
    T = len(sched.alphas_cumprod)
    cfg = ObjectiveConfig(sched.alphas_cumprod.float(), beta=500.0, inpo_grid=ddim_grid(sched, 4), inpo_eta=eta)
    model = LinearDenoiser()
    z0, cond, null = pair_batch()
    real_randint = torch.randint
    with mock.patch.object(torch, "randint", lambda lo, hi=None, *a, **k: real_randint(T - 1, T, *a, **k)):
        out = OBJECTIVES["inpo"](model.policy, model.reference, z0, cond, null, cfg)
    assert torch.isfinite(out.loss).all() and torch.isfinite(out.margin).all()
    assert torch.allclose(out.loss, torch.full_like(out.loss, math.log(2)))  # policy == reference at init


def test_a_move_between_equal_levels_is_the_identity():
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for a in (0.0, 0.3, 1.0):
        assert torch.equal(ddim_move(x, eps, a, a), x)
        assert ddpm_posterior_std(a, a) == 0
    assert torch.allclose(ddim_move(x, eps, torch.tensor([0.5, 0.0]), torch.tensor([0.5, 0.0])), x)


@pytest.mark.parametrize("target", ["step", "x0"])
def test_k_of_n_gradient_is_unbiased_and_the_loss_exact(target):
    from train_inversion_dpo import inversion_dpo

    z0, cond, null = pair_batch()
    model = LinearDenoiser()
    with torch.no_grad():
        model.D.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) * 0.05)

    def grad_and_loss(k):
        model.D.grad = None
        out = inversion_dpo(
            model.policy, model.reference, z0, cond, null, make_cfg(inversion_target=target, inversion_grad_steps=k)
        )
        backward(out)
        return model.D.grad.clone(), out.loss.detach()

    exact_grad, exact_loss = grad_and_loss(None)
    # N = 5, k = 2: all 10 subsets are equally likely, so averaging over enough draws approaches the exact gradient
    torch.manual_seed(0)
    draws = [grad_and_loss(2) for _ in range(400)]
    assert all(torch.allclose(loss, exact_loss, atol=1e-6) for _, loss in draws)
    mean_grad = torch.stack([g for g, _ in draws]).mean(0)
    assert torch.allclose(mean_grad, exact_grad, rtol=0.1, atol=0.05 * exact_grad.abs().max().item())
    single = draws[0][0]
    assert not torch.allclose(single, exact_grad, rtol=1e-3)  # one draw really is a sample
    assert torch.allclose(grad_and_loss(5)[0], exact_grad, atol=1e-6)  # k = N is the exact path


def moved_model(seed=5):
    model = LinearDenoiser()
    with torch.no_grad():
        model.D.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model


@pytest.mark.parametrize("target", ["reference", "step", "x0"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_two_pass_gradient_equals_the_one_graph_gradient(target, loss_type):
    # method.md's flat-memory scheme: pass 1 without grad, then chunk after chunk with its own backward; the
    # gradients accumulate in .grad to exactly the one-graph gradient of the whole trajectory inside one link
    from train_inversion_dpo import inversion_dpo

    z0, cond, null = pair_batch()
    model = moved_model()

    def grad_and_loss(chunk):
        model.D.grad = None
        cfg = make_cfg(inversion_target=target, loss_type=loss_type, inversion_chunk_steps=chunk, beta=50.0)
        out = inversion_dpo(model.policy, model.reference, z0, cond, null, cfg)
        assert (out.grad_chunks is None) == (chunk is None)
        backward(out)
        return model.D.grad.clone(), out.loss.detach()

    one_graph_grad, one_graph_loss = grad_and_loss(None)
    assert one_graph_grad.abs().max() > 0
    for chunk in (1, 2, 4):  # N = 5: 5, 3 and 2 backward calls
        grad, loss = grad_and_loss(chunk)
        assert torch.allclose(loss, one_graph_loss, atol=1e-6)
        assert torch.allclose(grad, one_graph_grad, rtol=1e-4, atol=1e-7), chunk


def test_per_step_margin_averages_to_the_trajectory_margin():
    # inversion_margin "step": E_i[w_i m_i] over the N steps is the trajectory margin (1/N) sum_i w_i m_i
    from train_inversion_dpo import inversion_policy, invert_pairs

    z0, cond, null = pair_batch()
    model = moved_model()
    cfg = make_cfg()
    every = invert_pairs(model.reference, z0, cond, null, cfg)
    trajectory = inversion_policy(model.policy, every, cond, cfg).margin
    step_cfg = make_cfg(inversion_margin="step")
    per_step = []
    for i in range(5):
        steps = torch.full((1, 6), i)
        one = invert_pairs(model.reference, z0, cond, null, step_cfg, steps)  # walks only up to step i
        for a, b in zip(one, every.take(steps)):
            assert a is None and b is None or torch.allclose(a.float(), b.float(), atol=1e-6)
        per_step.append(inversion_policy(model.policy, one, cond, step_cfg).margin)
    assert torch.allclose(torch.stack(per_step).mean(0), trajectory, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(per_step[0], trajectory, rtol=1e-2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_trainers_denoisers_return_the_unets_output_and_the_config_reads_it(tiny_sd_dir, prediction_type):
    """The denoisers return the UNet's own output, with the adapter on (policy) and off (reference); the objective
    config turns it into the noise per row's own label (for DDIM) and measures errors on v for a v model (SD 2.x
    768-v) unless told to use the noise."""
    from accelerate import Accelerator
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from train_inversion_dpo import InputError, make_denoisers

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    scheduler = DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler", prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([10, 500, 990])
    cond = {"encoder_hidden_states": torch.randn(3, 4, unet.config.cross_attention_dim, generator=gen)}
    with torch.no_grad():
        plain = unet(x, t, **cond).sample
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False))
        with_adapter = unet(x, t, **cond).sample
        policy, reference = make_denoisers(Accelerator(cpu=True), unet, torch.float32, scheduler)
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        for space in LOSS_SPACES:
            cfg = ObjectiveConfig(scheduler.alphas_cumprod, prediction_type=prediction_type, loss_space=space)
            for denoiser, out in [(policy, with_adapter), (reference, plain)]:
                got = denoiser(x, t, cond)
                torch.testing.assert_close(got, out)
                eps = out if prediction_type == "epsilon" else a.sqrt() * out + (1 - a).sqrt() * x
                torch.testing.assert_close(cfg.eps(got, x, t), eps)
                v_space = prediction_type == "v_prediction" and space == "prediction"
                assert cfg.v_space == v_space
                torch.testing.assert_close(cfg.pred(got, x, t), out if v_space else eps)
        assert (with_adapter - plain).abs().max() > 1e-4
    if prediction_type == "v_prediction":
        sample = DDIMScheduler.from_config(scheduler.config, prediction_type="sample")
        with pytest.raises(InputError, match="predicts 'sample'; only"):
            make_denoisers(Accelerator(cpu=True), unet, torch.float32, sample)


def zero_snr_cfg(**kw):
    """A v-prediction model on a zero-terminal-SNR schedule (as the shapes base): its top level has a = 0."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
        timestep_spacing="trailing", prediction_type="v_prediction",
    )  # fmt: skip
    grid = ddim_grid(DDIMScheduler.from_config(sched.config), 5)
    assert grid.alphas[-1] == 0
    base = {"alphas_cumprod": sched.alphas_cumprod.float(), "inversion_grid": grid, "prediction_type": "v_prediction"}
    return ObjectiveConfig(**{**base, **kw})


@pytest.mark.parametrize("objective", ["diffusion_dpo", "sft"])
def test_on_v_a_rows_error_is_its_noise_error_over_a_t(objective):
    """Measured on v, a row's squared error is its noise error divided by a_t (same x_t, v = (eps - sqrt(1-a) x_t)
    / sqrt(a)): the same margin or loss, reweighted toward high noise, where the layout is decided."""
    model = LinearDenoiser()
    with torch.no_grad():
        model.D.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    z0, cond, null = pair_batch(B=1)
    out = {}
    for space in LOSS_SPACES:
        torch.manual_seed(7)
        cfg = zero_snr_cfg(loss_space=space)
        res = OBJECTIVES[objective](model.policy, model.reference, z0, cond, null, cfg)
        torch.manual_seed(7)
        t = torch.randint(0, 1000, (1,))
        out[space] = (res.margin if objective != "sft" else res.loss).detach(), cfg.alphas_cumprod[t]
    (v_value, a_t), (eps_value, _) = out["prediction"], out["epsilon"]
    assert 0 < a_t.item() < 1 and eps_value.abs().item() > 0
    torch.testing.assert_close(v_value * a_t, eps_value, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("objective", ["diffusion_dpo", "sft"])
def test_on_v_the_top_level_of_a_zero_snr_model_still_has_a_gradient(objective):
    """At a = 0 a v model's noise prediction is x_t whatever its weights: measured on the noise, that level has no
    error and no gradient; measured on v it is the model's estimate of z0 and trains."""
    model = LinearDenoiser()
    with torch.no_grad():
        model.D.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    z0, cond, null = pair_batch()
    top = torch.zeros(1)  # a one-level schedule: its only level is the top of a zero-SNR one
    grads = {}
    for space in LOSS_SPACES:
        model.D.grad = None
        cfg = ObjectiveConfig(top, prediction_type="v_prediction", loss_space=space)
        res = OBJECTIVES[objective](model.policy, model.reference, z0, cond, null, cfg)
        res.loss.mean().backward()
        grads[space] = model.D.grad.abs().max().item()
    assert grads["epsilon"] == 0.0
    assert grads["prediction"] > 1e-4


@pytest.mark.parametrize("target", ["step", "x0"])
def test_on_v_the_inversion_targets_still_land_where_they_should(target):
    """On v the inversion targets keep their meaning at every level, the top one (a = 0) included: read as a
    prediction at (x_i, t_i), the step target denoises exactly to x_{i-1}, the x0 target to z0."""
    model = LinearDenoiser()
    z0, cond, null = pair_batch(B=2)
    cfg = zero_snr_cfg(inversion_target=target)
    ref = invert_pairs(model.reference, z0, cond, null, cfg)
    grid = cfg.inversion_grid
    N = len(grid.timesteps)
    previous = torch.cat([z0[None], ref.x[:-1]])  # x_{i-1}, level i-1
    for i in range(N):
        a_i, a_prev = grid.alphas[i + 1], grid.alphas[i]
        v, x = ref.target[i], ref.x[i]
        clean = a_i.sqrt() * x - (1 - a_i).sqrt() * v  # the prediction's z0 and noise, exact also at a = 0
        noise = a_i.sqrt() * v + (1 - a_i).sqrt() * x
        landed = a_prev.sqrt() * clean + (1 - a_prev).sqrt() * noise
        torch.testing.assert_close(landed if target == "step" else clean, previous[i] if target == "step" else z0,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    # policy == reference: every margin 0 on v too
    out = OBJECTIVES["inversion_dpo"](model.policy, model.reference, z0, cond, null, cfg)
    assert out.margin.abs().max().item() < 1e-6


def test_an_unknown_loss_space_is_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="unknown loss_space 'v'; expected one of"):
        make_cfg(loss_space="v")


# --sft_weight: the preference plus a supervised anchor on the winners


def sft_call(model, z0, cond, null, cfg, seed=0):
    from train_inversion_dpo import inversion_dpo, with_winner_sft

    torch.manual_seed(seed)
    out = inversion_dpo(model.policy, model.reference, z0, cond, null, cfg)
    torch.manual_seed(seed)
    return out, with_winner_sft(lambda: out, model.policy, z0, cond, null, cfg)


def test_winner_sft_adds_the_weighted_sft_loss_and_its_gradient():
    from train_inversion_dpo import winner_sft_loss

    z0, cond, null = pair_batch()
    model = moved_model()
    cfg = make_cfg(inversion_target="x0", sft_weight=3.0, beta=50.0)
    plain, mixed = sft_call(model, z0, cond, null, cfg)
    torch.manual_seed(0)  # the sft term draws first, from the seed
    expected_sft = winner_sft_loss(model.policy, z0, cond, null, cfg)
    assert torch.allclose(mixed.loss, plain.loss + 3.0 * expected_sft)
    assert torch.allclose(mixed.logs["sft"], expected_sft.mean())
    assert torch.equal(mixed.margin, plain.margin)

    # the gradient is the preference's plus 3x the sft loss's
    def grad_of(fn):
        model.D.grad = None
        fn().mean().backward()
        return model.D.grad.clone()

    g_mixed = grad_of(lambda: sft_call(model, z0, cond, null, cfg)[1].loss)
    g_pref = grad_of(lambda: sft_call(model, z0, cond, null, cfg)[0].loss)
    torch.manual_seed(0)
    g_sft = grad_of(lambda: winner_sft_loss(model.policy, z0, cond, null, cfg))
    assert torch.allclose(g_mixed, g_pref + 3.0 * g_sft, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(g_mixed, g_pref)
    # weight 0 leaves the objective as it was
    _, unchanged = sft_call(model, z0, cond, null, make_cfg(inversion_target="x0", beta=50.0))
    assert torch.equal(unchanged.loss, plain.loss) and "sft" not in unchanged.logs


def test_winner_sft_two_pass_gradient_equals_the_one_graph_gradient():
    z0, cond, null = pair_batch()
    model = moved_model()

    def grad_and_loss(chunk):
        model.D.grad = None
        cfg = make_cfg(inversion_target="x0", inversion_chunk_steps=chunk, beta=50.0, sft_weight=10.0)
        _, out = sft_call(model, z0, cond, null, cfg)
        assert (out.grad_chunks is None) == (chunk is None)
        backward(out)
        return model.D.grad.clone(), out.loss.detach()

    one_graph_grad, one_graph_loss = grad_and_loss(None)
    for chunk in (1, 2):
        grad, loss = grad_and_loss(chunk)
        assert torch.allclose(loss, one_graph_loss, atol=1e-5)
        assert torch.allclose(grad, one_graph_grad, rtol=1e-4, atol=1e-7), chunk


def test_winner_sft_draws_high_timesteps_and_drops_captions():
    from train_inversion_dpo import winner_sft_loss

    B = 400
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(2 * B, 4, 2, 2, generator=g)
    cond = {"bias": torch.ones(2 * B, 4)}
    null = {"bias": torch.zeros(2 * B, 4)}
    seen = {}

    def spy(x, t, c):
        seen["t"], seen["bias"], seen["x"] = t, c["bias"], x
        return torch.zeros_like(x)

    torch.manual_seed(0)
    winner_sft_loss(spy, z0, cond, null, make_cfg(sft_min_timestep=600, sft_caption_dropout=0.25))
    assert len(seen["t"]) == B and seen["t"].min() >= 600 and seen["t"].max() <= 999
    dropped = (seen["bias"] == 0).all(1)
    assert ((seen["bias"] == 0) | (seen["bias"] == 1)).all()  # each row is its caption or the null one
    assert 0.15 < dropped.float().mean() < 0.35
    # the winners' latents are noised (rows :B), not the losers'
    a = make_cfg().alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    noise = (seen["x"] - a.sqrt() * z0[:B]) / (1 - a).sqrt()
    assert noise.std() > 0.9 and noise.std() < 1.1
    torch.manual_seed(0)
    winner_sft_loss(spy, z0, cond, null, make_cfg())
    assert seen["t"].min() < 600 and (seen["bias"] == 1).all()  # the defaults: any t, no dropout


def test_the_reference_anchor_pulls_the_policy_back_at_its_levels_only():
    from train_inversion_dpo import inversion_dpo, reference_anchor_loss, with_winner_sft

    z0, cond, null = pair_batch()
    cfg = make_cfg(inversion_target="x0", beta=50.0, anchor_weight=5.0, anchor_max_timestep=400)
    # policy == reference: nothing to hold
    still = LinearDenoiser()
    assert reference_anchor_loss(still.policy, still.reference, z0, cond, null, cfg).abs().max() == 0

    model = moved_model()
    plain = inversion_dpo(model.policy, model.reference, z0, cond, null, cfg)
    torch.manual_seed(0)
    mixed = with_winner_sft(lambda: plain, model.policy, z0, cond, null, cfg, model.reference)
    torch.manual_seed(0)
    anchor = reference_anchor_loss(model.policy, model.reference, z0, cond, null, cfg)
    assert (anchor > 0).all() and torch.allclose(mixed.loss, plain.loss + 5.0 * anchor)
    assert torch.allclose(mixed.logs["anchor"], anchor.mean()) and "sft" not in mixed.logs
    # its gradient points back to the reference: a step against it shrinks the distance
    model.D.grad = None
    torch.manual_seed(0)
    reference_anchor_loss(model.policy, model.reference, z0, cond, null, cfg).mean().backward()
    with torch.no_grad():
        model.D -= 0.5 * model.D.grad / model.D.grad.norm() * model.D.norm()
    torch.manual_seed(0)
    assert reference_anchor_loss(model.policy, model.reference, z0, cond, null, cfg).mean() < anchor.mean()

    # it draws t below anchor_max_timestep, on the winners
    seen = {}

    def spy(x, t, c):
        seen["t"] = t
        return torch.zeros_like(x)

    big = torch.randn(800, 4, 2, 2)
    reference_anchor_loss(spy, spy, big, {"bias": torch.ones(800, 4)}, None, cfg)
    assert len(seen["t"]) == 400 and seen["t"].max() < 400 and seen["t"].min() < 40


def test_the_sft_and_anchor_rows_share_one_policy_call_and_keep_their_values():
    # batched for speed, each term must still be what it is alone, with the same draws (sft first, then the anchor)
    from train_inversion_dpo import ObjectiveOutput, reference_anchor_loss, winner_sft_loss, with_winner_sft

    z0, cond, null = pair_batch()
    cfg = make_cfg(sft_weight=3.0, sft_min_timestep=600, sft_caption_dropout=0.5, anchor_weight=7.0,
                   anchor_max_timestep=600)  # fmt: skip
    model = moved_model()
    calls = []

    def policy(x, t, c):
        calls.append(x.shape[0])
        return model.policy(x, t, c)

    none = ObjectiveOutput(torch.zeros(z0.shape[0] // 2), torch.zeros(z0.shape[0] // 2))
    torch.manual_seed(0)
    mixed = with_winner_sft(lambda: none, policy, z0, cond, null, cfg, model.reference)
    assert calls == [z0.shape[0]]  # the winners twice: B sft rows and B anchor rows
    torch.manual_seed(0)
    sft_alone = winner_sft_loss(model.policy, z0, cond, null, cfg)
    anchor_alone = reference_anchor_loss(model.policy, model.reference, z0, cond, null, cfg)
    assert torch.allclose(mixed.logs["sft"], sft_alone.mean()) and torch.allclose(
        mixed.logs["anchor"], anchor_alone.mean()
    )
    assert torch.allclose(mixed.loss, 3.0 * sft_alone + 7.0 * anchor_alone)


def test_the_sft_objective_with_the_anchor_is_the_pair_recipes_terms_without_the_preference():
    # benchmarks/shapes_seeds.py's no_preference variant: the sft objective with --anchor_weight a / w must train what
    # a pair objective's --sft_weight w --anchor_weight a terms train, scaled by 1 / w, with the same draws
    from train_inversion_dpo import OBJECTIVES, ObjectiveOutput, with_winner_sft

    z0, cond, null = pair_batch()
    model = moved_model()
    recipe = make_cfg(sft_weight=300.0, sft_min_timestep=600, sft_caption_dropout=0.5, anchor_weight=30000.0,
                      anchor_max_timestep=600)  # fmt: skip
    none = ObjectiveOutput(torch.zeros(z0.shape[0] // 2), torch.zeros(z0.shape[0] // 2))
    torch.manual_seed(0)
    terms = with_winner_sft(lambda: none, model.policy, z0, cond, null, recipe, model.reference)
    calls = []

    def policy(x, t, c):
        calls.append(x.shape[0])
        return model.policy(x, t, c)

    alone = make_cfg(sft_min_timestep=600, sft_caption_dropout=0.5, anchor_weight=100.0, anchor_max_timestep=600)
    torch.manual_seed(0)
    out = OBJECTIVES["sft"](policy, model.reference, z0, cond, null, alone)
    assert calls == [z0.shape[0]]  # the sft and anchor rows in one call, as in the pair objectives
    assert torch.allclose(300.0 * out.loss, terms.loss, rtol=1e-5)
    assert torch.allclose(out.logs["anchor"], terms.logs["anchor"]) and out.margin is None
    model.D.grad = None
    (300.0 * out.loss.mean()).backward()
    g_alone = model.D.grad.clone()
    model.D.grad = None
    terms.loss.mean().backward()
    assert torch.allclose(g_alone, model.D.grad, rtol=1e-5)


def test_sft_flags_that_cannot_work_are_refused():
    # the sft loss's flags act on the sft objective, or on a pair objective's --sft_weight term; set without either,
    # a run would train something else than asked without a word
    from train_inversion_dpo import InputError, parse_args

    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"]
    for extra, message in [
        (["--sft_min_timestep", "600"], "--sft_min_timestep shape the sft loss, which --objective inversion_dpo only"),
        (["--objective", "diffusion_dpo", "--sft_caption_dropout", "0.2"], "--sft_caption_dropout shape"),
        (["--sft_weight", "-1"], "--sft_weight must be at least 0"),
        (["--sft_weight", "1", "--objective", "sft"], "--objective sft is that loss alone"),
        (["--sft_weight", "1", "--sft_caption_dropout", "1"], r"--sft_caption_dropout must be in \[0, 1\)"),
        (["--anchor_weight", "10"], "--anchor_weight needs --anchor_max_timestep"),
        (["--anchor_weight", "-1"], "--anchor_weight must be at least 0"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_args(base + extra)
    for extra in (
        ["--objective", "sft", "--sft_min_timestep", "600"],
        ["--sft_weight", "3", "--sft_caption_dropout", "0.2"],
    ):
        assert parse_args(base + extra).objective in ("sft", "inversion_dpo")
    # the anchor keeps the levels below the sft term's unless told otherwise
    anchored = parse_args(base + ["--sft_weight", "3", "--sft_min_timestep", "600", "--anchor_weight", "9"])
    assert anchored.anchor_max_timestep == 600
    assert parse_args(base + ["--anchor_weight", "9", "--anchor_max_timestep", "300"]).anchor_max_timestep == 300


def test_implied_noise_lands_on_z0_in_one_step_and_broadcasts_per_sample():
    from diffusers import DDIMScheduler

    from train_inversion_dpo import implied_noise

    gen = torch.Generator().manual_seed(8)
    x_t, z0, n = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    alphas_cumprod = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    a_t = alphas_cumprod[torch.tensor([999, 250])]  # one noisy level per sample

    # any x_t: the implied noise is the one a single denoising step to the clean level (a = 1) needs to hit z0
    tau = implied_noise(x_t, z0, a_t)
    torch.testing.assert_close(ddim_move(x_t, tau, a_t, 1.0), z0, rtol=1e-5, atol=1e-5)
    one_by_one = torch.stack([implied_noise(x_t[b], z0[b], float(a_t[b])) for b in range(2)])
    torch.testing.assert_close(tau, one_by_one)

    # a forward-noised x_t: the implied noise is the noise that was added
    a = a_t.reshape(-1, 1, 1, 1)
    noised = a.sqrt() * z0 + (1 - a).sqrt() * n
    torch.testing.assert_close(implied_noise(noised, z0, a_t), n, rtol=1e-4, atol=1e-4)


def test_latents_of_large_images_are_encoded_a_megapixel_at_a_time():
    """At 1024 px the VAE's activations are the largest item of a step, so each encoder call holds one image; the
    latents are those of each image encoded alone, winners first, shifted and scaled as the pipelines do."""
    from tests.tiny import tiny_vae
    from train_inversion_dpo import encode_latents

    torch.manual_seed(0)
    vae = tiny_vae(16, shift_factor=0.1, scaling_factor=0.5, mid_block_add_attention=False).eval()
    calls = []
    encode = vae.encode
    vae.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    pairs = torch.rand(3, 2, 3, 512, 512) * 2 - 1  # 512 px: four images a call (no mid-block attention: slow on a CPU)
    with torch.no_grad():
        latents = encode_latents(vae, pairs)
        alone = [encode(pairs[i % 3, i // 3][None]).latent_dist.mode() for i in range(6)]
    assert calls == [4, 2]
    torch.testing.assert_close(latents, (torch.cat(alone) - 0.1) * 0.5, rtol=1e-5, atol=1e-5)

    calls.clear()
    with torch.no_grad():
        encode_latents(vae, torch.rand(16, 2, 3, 32, 32))
    assert calls == [32]  # small images still go in one call
