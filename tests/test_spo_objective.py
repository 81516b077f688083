"""SPO's pieces as functions of tensors (train_spo.py sections 3 and 4): the DDIM step with noise, the transition's
log-probability and its ratio, the clipped loss, and the pools of a trajectory on a denoiser whose output is known."""

import json
import math
import os

import pytest
import torch
from diffusers import DDIMScheduler

import train_spo as spo


def test_the_step_distribution_is_ddim_schedulers_step_with_eta():
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, prediction_type=prediction_type, steps_offset=1, clip_sample=False
        )
        scheduler.set_timesteps(20)
        grid = spo.ddim_grid(DDIMScheduler.from_config(scheduler.config), 20)
        g = torch.Generator().manual_seed(0)
        x, out, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        for level in (20, 11, 1):
            t = int(grid.timesteps[level - 1])
            expected = scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
            mean, sigma = spo.ddim_step_distribution(
                x, out, grid.alphas[level], grid.alphas[level - 1], 1.0, prediction_type
            )
            torch.testing.assert_close(mean + sigma * z, expected, atol=1e-5, rtol=1e-5)


def test_the_clean_latent_of_a_v_model_is_defined_at_zero_terminal_snr():
    x, v = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    x0, eps = spo.clean_and_noise(x, v, 0.0, "v_prediction")
    assert torch.equal(x0, -v) and torch.equal(eps, x)  # a = 0: x0 = -v, eps = x_t


def test_the_log_probability_is_the_gaussians_per_element_mean_up_to_constants():
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor(0.37)
    by_hand = torch.stack([-((x[i] - mean[i]) ** 2).sum() / (2 * 0.37**2) / x[i].numel() for i in range(3)])
    torch.testing.assert_close(spo.transition_log_prob(x, mean, sigma), by_hand)
    # a ratio of two such densities is the Gaussians' ratio (per element): the constants cancel
    other = torch.randn(3, 4, 5, 5, generator=g)
    gaussian = torch.distributions.Normal
    ratio = (gaussian(mean, sigma).log_prob(x) - gaussian(other, sigma).log_prob(x)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(
        spo.transition_log_prob(x, mean, sigma) - spo.transition_log_prob(x, other, sigma), ratio
    )


def test_the_loss_is_log_2_at_the_reference_and_lower_when_the_policy_favours_the_winner():
    zero = torch.zeros(4)
    loss, margin = spo.spo_loss(zero, zero, zero, zero, beta=10.0, clip=0.1)
    torch.testing.assert_close(loss, torch.full((4,), math.log(2)))
    assert torch.equal(margin, zero)
    up = torch.full((4,), 0.05)
    better, margin = spo.spo_loss(up, zero, zero, zero, beta=10.0, clip=0.1)
    assert (better < math.log(2)).all() and (margin > 0).all()
    worse, _ = spo.spo_loss(zero, zero, up, zero, beta=10.0, clip=0.1)
    assert (worse > math.log(2)).all()
    # swapping winner and loser flips the margin
    _, swapped = spo.spo_loss(zero, zero, up, zero, beta=10.0, clip=0.1)
    assert torch.equal(swapped, -spo.spo_loss(up, zero, zero, zero, beta=10.0, clip=0.1)[1])


def test_the_clipped_ratio_has_no_gradient_beyond_the_trust_region():
    beta, clip = 10.0, 0.1
    inside = torch.tensor([0.05], requires_grad=True)
    spo.spo_loss(inside, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, clip)[0].sum().backward()
    assert inside.grad.abs().item() > 0
    beyond = torch.tensor([math.log(1.2)], requires_grad=True)  # ratio 1.2 > 1 + clip
    loss = spo.spo_loss(beyond, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, clip)[0]
    loss.sum().backward()
    assert beyond.grad.item() == 0
    # the clamped value is the bound's: log(1.1)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(torch.tensor([beta * math.log1p(clip)])))


def test_the_preference_gap_is_the_softmax_difference():
    gap = spo.preference_gap(torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]))
    p = math.exp(1) / (math.exp(1) + 1)
    torch.testing.assert_close(gap, torch.tensor([2 * p - 1, 0.0, 2 * p - 1]))


# ---------------------------------------------------------------------------------------------------------------
# A trajectory's pools, on a linear "UNet" (eps = 0.1 x + adapter) whose calls are recorded


class Recorder:
    def __init__(self, scale=0.0):
        self.calls = []  # (rows, timestep, grad enabled, which)
        self.weight = torch.tensor(scale, requires_grad=True)  # the "adapter": 0 at the start, like a LoRA's B

    def policy(self, x, t, cond):
        self.calls.append((x.shape[0], int(t[0]), torch.is_grad_enabled(), "policy", x.detach().clone()))
        return 0.1 * x + self.weight * cond["encoder_hidden_states"].reshape(-1, 1, 1, 1)

    def reference(self, x, t, cond):
        self.calls.append((x.shape[0], int(t[0]), torch.is_grad_enabled(), "reference", x.detach().clone()))
        return 0.1 * x


def config(**overrides):
    scheduler = DDIMScheduler(num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False)  # as SD's
    values = {
        "grid": spo.ddim_grid(scheduler, 10),
        "eta": 1.0,
        "guidance_scale": 3.0,
        "pool_size": 3,
        "untrained_steps": 2,
        "segment_steps": 1,
        "threshold": 0.3,
        "beta": 10.0,
        "clip": 0.1,
    }
    values.update(overrides)
    return spo.SPOConfig(**values)


def trajectories(cfg, score, recorder=None, batch=2, seed=0):
    recorder = recorder or Recorder()
    cond = {"encoder_hidden_states": torch.ones(batch, 1)}
    null = {"encoder_hidden_states": torch.zeros(batch, 1)}
    generators = [torch.Generator().manual_seed(seed * 100 + i) for i in range(batch)]
    x = torch.stack([torch.randn(4, 4, 4, generator=g) for g in generators])
    prompts = [f"p{i}" for i in range(batch)]
    pools = list(
        spo.spo_trajectories(recorder.policy, recorder.reference, score, x, cond, null, prompts, cfg, generators)
    )
    return pools, recorder


def brightness(latents, prompts, timesteps):
    return latents.float().mean(dim=(1, 2, 3)) * 100


def test_each_pool_shares_its_x_t_and_the_chosen_candidate_continues():
    cfg = config()
    pools, recorder = trajectories(cfg, brightness)
    assert [p.timestep for p in pools] == [int(t) for t in cfg.grid.timesteps.flip(0)[cfg.untrained_steps :]]
    for pool, following in zip(pools, pools[1:]):
        rows = torch.arange(pool.x_t.shape[0])
        torch.testing.assert_close(following.x_t, pool.candidates[pool.chosen, rows])
    # the policy (with grad) and the reference are called on the pool's own x_t, both guided (2 rows a prompt)
    for pool in pools:
        at_pool = [c for c in recorder.calls if c[1] == pool.timestep and c[0] == 4]
        assert {c[3] for c in at_pool} == {"policy", "reference"}
        for call in at_pool:
            torch.testing.assert_close(call[4], torch.cat([pool.x_t, pool.x_t]))
        policy_call = next(c for c in at_pool if c[3] == "policy")
        assert policy_call[2]  # with grad: the loss back-propagates through it
    # the winner scores highest: the brightest first step here, as the linear model keeps the order
    chosen = torch.cat([p.chosen for p in pools])
    assert len(set(chosen.tolist())) > 1  # drawn at random, not always the winner


def test_near_ties_are_skipped_and_clear_preferences_kept():
    def tie_for_the_second_prompt(latents, prompts, timesteps):
        scores = brightness(latents, prompts, timesteps) * 1e4  # the last steps' candidates differ little
        return torch.where(torch.tensor([p == "p1" for p in prompts]), torch.zeros_like(scores), scores)

    pools, _ = trajectories(config(), tie_for_the_second_prompt)
    kept = torch.stack([p.kept for p in pools])
    assert kept[:, 0].all() and not kept[:, 1].any()
    # a threshold that these small score differences do not reach skips them all
    pools, _ = trajectories(config(threshold=0.3), lambda latents, p, t: brightness(latents, p, t) * 1e-3)
    assert not torch.stack([p.kept for p in pools]).any()


def test_at_the_start_every_pool_loss_is_log_2_and_its_gradient_moves_the_adapter():
    pools, recorder = trajectories(config(), brightness)
    for pool in pools:
        torch.testing.assert_close(pool.loss, torch.full_like(pool.loss, math.log(2)))
    total = sum(torch.where(p.kept, p.loss, 0).sum() for p in pools)
    assert sum(p.kept.sum() for p in pools) > 0
    total.backward()
    assert recorder.weight.grad is not None and recorder.weight.grad.abs().item() > 0


def test_the_unet_calls_per_pool():
    """k candidates of B prompts, guidance (2 rows each): per trained step 2B rows with grad (the policy), 2B for the
    reference, 2kB to score the candidates (none at the last step, whose candidates are clean); a plain step 2B."""
    k, B, cfg = 3, 2, config()
    _, recorder = trajectories(cfg, brightness, batch=B)
    grad_rows = sum(c[0] for c in recorder.calls if c[2])
    no_grad_rows = sum(c[0] for c in recorder.calls if not c[2])
    pools = len(cfg.grid.timesteps) - cfg.untrained_steps
    assert grad_rows == pools * 2 * B
    assert no_grad_rows == cfg.untrained_steps * 2 * B + pools * 2 * B + (pools - 1) * 2 * k * B


def test_segments_branch_once_and_score_at_the_segment_end():
    """The SDXL recipe: 2 candidates branch at the segment's first step, run 3 more each, and are scored at the
    segment's end level; the next pool starts from the chosen candidate's end."""
    cfg = config(segment_steps=4, pool_size=2, untrained_steps=2, threshold=0.0)
    seen = []

    def record(latents, prompts, timesteps):
        seen.append(timesteps[0])
        return brightness(latents, prompts, timesteps)

    pools, _ = trajectories(cfg, record)
    levels = spo.pool_levels(cfg)
    assert levels == [8, 4]
    ts = cfg.grid.timesteps
    assert [p.timestep for p in pools] == [int(ts[7]), int(ts[3])]
    assert seen == [int(ts[3]), 0]  # the first segment ends at level 4, the second at the clean level


def test_pool_levels_follow_the_untrained_steps():
    assert spo.pool_levels(config(untrained_steps=4, segment_steps=1)) == [6, 5, 4, 3, 2, 1]
    with pytest.raises(spo.InputError, match="spo_untrained_steps"):
        spo.parse_args(
            [
                "--pretrained_model_name_or_path",
                "m",
                "--prompts",
                "p.txt",
                "--preference_model",
                "shapes",
                "--num_inference_steps",
                "4",
                "--spo_untrained_steps",
                "4",
            ]  # fmt: skip
        )


def test_the_prompt_stream_is_a_function_of_the_position():
    prompts = [f"p{i}" for i in range(5)]
    whole = spo.prompt_stream(prompts, seed=3, start=0, count=12)
    assert sorted(whole[:5]) == prompts and sorted(whole[5:10]) == prompts  # each epoch a permutation
    assert spo.prompt_stream(prompts, seed=3, start=7, count=5) == whole[7:12]  # resumes mid-stream
    assert whole[:5] != whole[5:10] or whole[5:10] != whole[10:12] + whole[:3]


def test_a_step_without_noise_is_never_kept():
    """Onto alpha 1 (``set_alpha_to_one``) the last step has sigma 0 and no density: its pair is skipped."""
    cfg = config(grid=spo.ddim_grid(DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=True), 10), threshold=0)
    pools, _ = trajectories(cfg, lambda latents, p, t: brightness(latents, p, t) * 1e6)
    assert pools[-1].timestep == int(cfg.grid.timesteps[0]) and not pools[-1].kept.any()
    assert all(p.kept.all() for p in pools[:-1])


# ---------------------------------------------------------------------------------------------------------------
# Flags and prompts


@pytest.mark.parametrize(
    "change, message",
    [
        (["--preference_model", "step_aware"], "--preference_model step_aware needs --preference_model_path"),
        (["--preference_model", "nosuch"], "--preference_model 'nosuch' is none of"),
        (["--preference_model", "aesthetic", "--preference_model_path", "c"], "needs --preference_model_head"),
        (["--spo_pool_size", "1"], "--spo_pool_size must be at least 2"),
        (["--spo_threshold", "1"], "--spo_threshold must be in [0, 1)"),
        (["--eta", "0"], "--eta must be above 0"),
        (["--spo_clip", "1"], "--spo_clip must be below 1"),
    ],
)
def test_flags_that_cannot_work_are_one_line(change, message):
    args = ["--pretrained_model_name_or_path", "m", "--prompts", "p.txt", "--preference_model", "shapes", *change]
    with pytest.raises(spo.InputError) as error:
        spo.parse_args(args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_plugin_that_is_missing_or_lacks_its_function_is_one_line(tmp_path):
    with pytest.raises(spo.InputError, match="no such file 'missing.py'"):
        spo.load_plugin("missing.py:score")
    (tmp_path / "mine.py").write_text("def other(images, prompts, timesteps):\n    return []\n")
    with pytest.raises(spo.InputError, match="has no function 'score'"):
        spo.load_plugin(f"{tmp_path / 'mine.py'}:score")
    assert spo.load_plugin(f"{tmp_path / 'mine.py'}:other")([], [], []) == []


def test_the_shapes_alias_is_the_plugin_beside_the_script():
    path, _, name = spo.resolve_alias("shapes").rpartition(":")
    assert name == "score" and path.endswith(os.path.join("shapes", "preference.py")) and os.path.isfile(path)
    score = spo.load_plugin(spo.resolve_alias("shapes"))
    from PIL import Image

    from shapes import world

    prompt = "a red circle above a blue square"
    right = world.render(prompt, rng=0)
    empty = Image.new("RGB", right.size, "white")
    extra = world.draw(
        world.sample_layout("a red circle above a blue square", rng=0) + world.sample_layout("a green triangle", rng=1)
    )
    scores = score([right, empty, extra], [prompt] * 3, [0, 0, 0])
    assert scores[0] == 3 * 2.5  # both objects and the relation, nothing extra
    assert scores[1] == 0 < scores[0]  # an empty image earns nothing (it would hold "no extra object")
    assert scores[2] < scores[0]


def test_prompts_come_from_text_csv_jsonl_and_dataset_folders(tmp_path):
    import datasets

    train_spo = spo

    def prompts(source, column="caption"):
        args = train_spo.parse_args(
            [
                "--pretrained_model_name_or_path",
                "m",
                "--prompts",
                str(source),
                "--prompt_column",
                column,
                "--preference_model",
                "shapes",
            ]  # fmt: skip
        )
        return train_spo.load_prompts(args)

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \na cat\n")
    assert prompts(tmp_path / "p.txt") == (
        ["a cat", "a dog"],
        {"prompt_rows": 4, "empty_prompts": 1, "duplicate_prompts": 1, "prompts": 2},
    )
    (tmp_path / "p.csv").write_text('caption,other\n"a cat, sitting",1\n,2\n')
    assert prompts(tmp_path / "p.csv")[0] == ["a cat, sitting"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x", "y", "x"]))
    assert prompts(tmp_path / "p.jsonl", "text")[0] == ["x", "y"]
    # Pick-a-Pic's schema: the captions beside the image columns, which are never decoded
    datasets.Dataset.from_dict({"caption": ["a", "b"], "jpg_0": [b"not an image", b"x"]}).save_to_disk(tmp_path / "d")
    assert prompts(tmp_path / "d")[0] == ["a", "b"]
    with pytest.raises(train_spo.DataError, match="no prompt in its 2 rows"):
        (tmp_path / "empty.txt").write_text("\n \n")
        prompts(tmp_path / "empty.txt")


def test_a_trajectory_depends_on_its_own_seed_alone():
    """Trajectory b draws from its own generator: sampled alone or beside another, it is the same (so a run on two
    processes of one prompt each samples what one process does with batches of two)."""
    cfg = config(segment_steps=2)
    pair, _ = trajectories(cfg, brightness, batch=2, seed=0)
    generator = torch.Generator().manual_seed(1)  # trajectories() seeds row i with seed * 100 + i: row 1 is seed 1
    x = torch.randn(4, 4, 4, generator=generator).unsqueeze(0)
    recorder = Recorder()
    one = {"encoder_hidden_states": torch.ones(1, 1)}
    null = {"encoder_hidden_states": torch.zeros(1, 1)}
    alone = list(spo.spo_trajectories(recorder.policy, recorder.reference, brightness, x, one, null, ["p1"], cfg,
                                      [generator]))  # fmt: skip
    for a, b in zip(alone, pair):
        torch.testing.assert_close(a.x_t[0], b.x_t[1])
        torch.testing.assert_close(a.candidates[:, 0], b.candidates[:, 1])
        assert a.chosen[0] == b.chosen[1]


def test_lookahead_scores_the_image_the_candidate_leads_to():
    """--spo_lookahead_steps: the candidates are scored at t = 0 on the image that deterministic steps make of them;
    with as many steps as levels left, that is DDIM with eta 0 down the grid."""
    seen = []

    def record(latents, prompts, timesteps):
        seen.append((timesteps[0], latents.clone()))
        return brightness(latents, prompts, timesteps)

    cfg = config(lookahead_steps=100)
    pools, recorder = trajectories(cfg, record, batch=1)
    assert [t for t, _ in seen] == [0] * len(pools)
    # the first pool's candidates, walked down the grid with eta 0 by hand
    one = {"encoder_hidden_states": torch.ones(3, 1)}
    null = {"encoder_hidden_states": torch.zeros(3, 1)}
    x, level = pools[0].candidates[:, 0], spo.pool_levels(cfg)[0] - 1
    grid = cfg.grid
    while level > 0:
        out = spo.guided_at(recorder.reference, x, int(grid.timesteps[level - 1]), one, null, cfg.guidance_scale)
        x = spo.ddim_step_distribution(x, out, grid.alphas[level], grid.alphas[level - 1], 0.0, "epsilon")[0]
        level -= 1
    torch.testing.assert_close(seen[0][1], x)
    # 2 steps instead: fewer calls, and still clean latents at t = 0
    calls = len(recorder.calls)
    _, fewer = trajectories(config(lookahead_steps=2), record, batch=1)
    assert len(fewer.calls) < calls
