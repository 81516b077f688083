"""The reference-side cache (--inversion_cache): training from it equals recomputing, it is reused, resumed and
keyed, through the real SD script on a tiny SD."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file
from script_runner import QUICK, lora, metrics, run


SCRIPT = "train_inversion_dpo.py"


@pytest.fixture(scope="module")
def runs(tiny_sd_dir, tiny_pairs_parquet, tmp_path_factory):
    """One uncached 3-step run, and the same run from a float32 and from a float16 cache under one root (random
    flips on: the cache holds both flips; 6 pairs in shards of 2)."""
    root = tmp_path_factory.mktemp("cache")
    args = ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset_name", tiny_pairs_parquet,
            "--max_train_steps", 3, "--inversion_target", "x0", "--random_flip", *QUICK]  # fmt: skip
    cache = ["--inversion_cache", root / "caches", "--inversion_cache_shard_size", 2]
    out = {name: str(root / name) for name in ("recomputed", "float32", "float16")}
    run(SCRIPT, args + ["--output_dir", out["recomputed"]])
    run(SCRIPT, args + cache + ["--output_dir", out["float32"], "--inversion_cache_dtype", "float32"])
    proc = run(SCRIPT, args + cache + ["--output_dir", out["float16"]])
    return out, args, cache, root / "caches", proc.stderr


def losses(output_dir):
    return [r["loss"] for r in metrics(output_dir) if "loss" in r]


def update_difference(dir_a, dir_b):
    """||B_a - B_b|| / ||B_a|| over the LoRA up-projections, which start at 0: the relative difference of the updates."""
    a, b = lora(dir_a), lora(dir_b)
    up = [k for k in a if "lora_B" in k or "lora.up" in k]
    diff = sum((a[k] - b[k]).pow(2).sum() for k in up).sqrt()
    return (diff / sum(a[k].pow(2).sum() for k in up).sqrt()).item()


@pytest.mark.slow
def test_training_from_the_cache_equals_recomputing(runs):
    out, *_ = runs
    recomputed = losses(out["recomputed"])
    assert recomputed[0] == pytest.approx(math.log(2), abs=1e-6) and len(set(recomputed)) == 3
    # float32 storage: the same losses and adapter to float precision (only the UNet's batch composition differs,
    # which beta 5000 amplifies)
    assert losses(out["float32"]) == pytest.approx(recomputed, rel=1e-3)
    assert update_difference(out["recomputed"], out["float32"]) < 1e-3
    # float16 storage: margin 0 at initialisation (the reference saw the rounded inputs), then rounding-sized moves
    half = losses(out["float16"])
    assert half[0] == pytest.approx(math.log(2), abs=1e-4)
    assert half == pytest.approx(recomputed, abs=1e-2)
    assert update_difference(out["recomputed"], out["float16"]) < 5e-2


@pytest.mark.slow
def test_the_sft_anchor_trains_the_same_from_the_cache(runs, tmp_path):
    # --sft_weight needs each winner's clean latent, which the cache stores, and the null caption for its dropout,
    # which a cached run builds without the text encoder; the same draws follow either way
    out, args, cache, *_ = runs
    # --anchor_weight also calls the reference, which a cached run otherwise never does
    sft = ["--sft_weight", 10, "--sft_min_timestep", 500, "--sft_caption_dropout", 0.5, "--anchor_weight", 20,
           "--inversion_cache_dtype", "float32"]  # fmt: skip
    run(SCRIPT, args + sft + ["--output_dir", tmp_path / "recomputed"])
    run(SCRIPT, args + cache + sft + ["--output_dir", tmp_path / "cached"])
    recomputed, cached = ([r for r in metrics(tmp_path / name) if "loss" in r] for name in ("recomputed", "cached"))
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in recomputed], rel=1e-4)
    assert [r["sft"] for r in cached] == pytest.approx([r["sft"] for r in recomputed], rel=1e-4)
    assert [r["anchor"] for r in cached] == pytest.approx([r["anchor"] for r in recomputed], rel=1e-4, abs=1e-10)
    # the loss is the preference's log 2 plus 10 x the sft loss at the first step (policy == reference: no anchor
    # distance yet, but for rounding: the policy's rows share a batch with the sft rows, the reference's do not), and
    # the policy leaves the reference after it
    first = recomputed[0]
    assert first["anchor"] < 1e-9 and first["loss"] == pytest.approx(math.log(2) + 10 * first["sft"], rel=1e-5)
    assert all(r["anchor"] > 1e3 * max(first["anchor"], 1e-12) for r in recomputed[1:])
    assert losses(tmp_path / "recomputed") != pytest.approx(losses(out["recomputed"]), rel=1e-3)


@pytest.mark.slow
def test_each_key_has_its_folder_and_a_rerun_reuses_it(runs):
    out, args, cache, caches, stderr = runs
    folders = sorted(os.listdir(caches))
    assert len(folders) == 2  # float32 and float16: two keys, two folders
    assert "building 3 of 3 shards" in stderr and "MiB at most on disk" in stderr
    half = next(
        os.path.join(caches, f) for f in folders if "float16" in open(os.path.join(caches, f, "cache.json")).read()
    )
    shards = sorted(f for f in os.listdir(half) if f.startswith("shard-"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    # the flips are stored: the second pair's x is [flips, (winner, loser), steps, C, H, W]; the caption is stored once
    tensors = load_file(os.path.join(half, shards[0]))
    assert tensors["x.1"].shape[:3] == (2, 2, 3) and tensors["x.1"].dtype == torch.float16
    assert tensors["cond.encoder_hidden_states.1"].shape[:2] == (1, 1)

    mtimes = {f: os.path.getmtime(os.path.join(half, f)) for f in shards}
    proc = run(SCRIPT, args + cache + ["--output_dir", out["float16"] + "-again", "--inversion_cache_only"])
    assert "complete, reused" in proc.stderr
    assert {f: os.path.getmtime(os.path.join(half, f)) for f in shards} == mtimes

    # an interrupted build: the missing shard alone is built again, to the same values
    before = load_file(os.path.join(half, shards[1]))
    os.remove(os.path.join(half, shards[1]))
    proc = run(SCRIPT, args + cache + ["--output_dir", out["float16"] + "-again", "--inversion_cache_only"])
    assert "building 1 of 3 shards" in proc.stderr
    for f in (shards[0], shards[2]):
        assert os.path.getmtime(os.path.join(half, f)) == mtimes[f]
    rebuilt = load_file(os.path.join(half, shards[1]))
    assert not [f for f in os.listdir(half) if f.startswith(".")]  # no temporary file left
    assert rebuilt.keys() == before.keys() and all(torch.equal(rebuilt[k], before[k]) for k in before)


@pytest.mark.slow
def test_a_cache_of_other_settings_is_one_clear_line(runs, tmp_path):
    out, args, cache, caches, _ = runs
    one_cache = os.path.join(caches, sorted(os.listdir(caches))[0])
    proc = run(
        SCRIPT,
        args + ["--inversion_cache", one_cache, "--inversion_steps", 4, "--output_dir", tmp_path],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "inversion.steps: the cache has 3, this run 4" in proc.stderr and "Traceback" not in proc.stderr


def test_cache_flags_that_cannot_work_are_refused():
    from train_inversion_dpo import InputError, parse_args

    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--inversion_cache", "c"]
    for extra, message in [
        (["--random_crop"], "--random_crop cannot be cached"),
        (["--objective", "diffusion_dpo"], "--objective is diffusion_dpo"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_args(base + extra)
    for extra in (["--inversion_cache_only"], ["--cache_steps", "4"]):
        with pytest.raises(InputError, match="need --inversion_cache"):
            parse_args(base[:4] + extra)


def test_shard_layout_round_trips_to_the_trainers_rows(tmp_path):
    # what build_shard stores ([pairs, flips, (winner, loser), K, ...], shared conditioning cut to size 1) and what
    # CachedPairs and a training batch read back ([K, 2B, ...], winners then losers; SDXL's nested conditioning)
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from train_inversion_dpo import (
        CachedPairs,
        InversionCache,
        _pair_major,
        _shared,
        cached_inversion_steps,
        collate_cached,
        flatten_cond,
        per_pair,
    )

    K, B = 3, 2
    x = torch.randn(K, 2 * B, 4, 2, 2)
    ref_error = torch.randn(K, 2 * B)
    states = torch.randn(B, 5, 8).repeat(2, 1, 1)  # one caption per pair, the same for winner and loser
    cond = {"encoder_hidden_states": states, "added_cond_kwargs": {"time_ids": torch.randn(2 * B, 6)}}
    key = {"data": {"pairs": B, "flips": [False]}, "inversion": {"stored_steps": [4, 7, 9]}, "storage": "float32"}
    cache = InversionCache(str(tmp_path), key, shard_size=B)
    z0 = torch.randn(2 * B, 4, 2, 2)
    stored = {"x": _pair_major(x, B)[:, None], "ref_error": _pair_major(ref_error, B)[:, None]}  # one flip
    stored["z0"] = z0.reshape(2, B, 4, 2, 2).transpose(0, 1)[:, None]
    for k, v in flatten_cond(cond).items():
        stored[k] = _shared(v.reshape(2, B, *v.shape[1:]).transpose(0, 1)[:, None])
    assert stored["cond.encoder_hidden_states"].shape == (B, 1, 1, 5, 8)  # stored once per pair
    assert stored["cond.added_cond_kwargs.time_ids"].shape == (B, 1, 2, 6)  # per image
    save_file(per_pair(stored), cache.shard_path(0), {"hash": cache.hash})

    pairs = SimpleNamespace(draw_flip=lambda rng: False, augmentation_rng=lambda index: None, epoch=0)
    dataset = CachedPairs(cache, pairs)
    ref, read_cond, read_z0 = cached_inversion_steps(collate_cached([dataset[b] for b in range(B)]), cache.steps)
    assert torch.equal(ref.x, x) and torch.equal(ref.ref_error, ref_error) and ref.target is None
    assert torch.equal(read_z0, z0)  # the clean latents, for --sft_weight
    assert ref.steps.tolist() == [[4] * 4, [7] * 4, [9] * 4]
    assert torch.equal(read_cond["encoder_hidden_states"], states)
    assert torch.equal(read_cond["added_cond_kwargs"]["time_ids"], cond["added_cond_kwargs"]["time_ids"])
