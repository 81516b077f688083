"""Data parallel on the CPU: two processes (gloo) through `accelerate launch`, against one process at the same global
batch. The two-pass objective back-propagates several chunks per micro-step, all but the last under no_sync."""

import os

import pytest
import torch
from safetensors.torch import load_file
from script_runner import QUICK, lora, metrics, run


pytestmark = pytest.mark.slow  # two processes through accelerate launch


SCRIPT = "train_inversion_dpo.py"


def common(tiny_sd_dir, tiny_pairs_parquet):
    # 4 pairs, a global batch of 4 (2 pairs x accumulation 2 in one process, 1 x 2 x 2 processes): 2 steps are 2 epochs
    return ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset_name", tiny_pairs_parquet,
            *QUICK, "--max_train_samples", 4, "--max_train_steps", 2, "--gradient_accumulation_steps", 2]  # fmt: skip


@pytest.mark.parametrize("script, model", [(SCRIPT, "tiny_sd_dir"), ("train_inversion_dpo_sd3.py", "tiny_sd3_dir")])
def test_two_processes_train_the_adapter_of_one(script, model, tiny_pairs_parquet, tmp_path, request):
    # an exact, deterministic objective; Adam with an epsilon far above |grad| is SGD (lr / eps = 0.01), so that the
    # gradient's scale shows in the adapter too (plain Adam would hide a wrongly scaled all-reduce). SD3: each
    # process embeds the captions into its own table, and the reference unwraps the DDP-wrapped transformer
    args = common(request.getfixturevalue(model), tiny_pairs_parquet)
    args += ["--inversion_target", "x0", "--learning_rate", 1e2, "--adam_epsilon", 1e4, "--max_grad_norm", 0]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(script, args + ["--output_dir", one, "--train_batch_size", 2])
    run(script, args + ["--output_dir", two, "--train_batch_size", 1], launcher="accelerate", num_processes=2)
    a, b = lora(one), lora(two)
    assert a.keys() == b.keys()
    up = [k for k in a if "lora_B" in k or "lora.up" in k]  # they start at 0: they are the update
    norm = sum(a[k].pow(2).sum() for k in up).sqrt().item()
    assert norm > 1e-4  # it moved
    assert sum((a[k] - b[k]).pow(2).sum() for k in up).sqrt().item() < 1e-3 * norm
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3 * norm)
    # the logged loss is the mean over the global batch in both
    assert [r["loss"] for r in metrics(two) if "loss" in r] == pytest.approx(
        [r["loss"] for r in metrics(one) if "loss" in r], rel=1e-3
    )


def test_two_processes_build_the_cache_of_one(tiny_sd_dir, tiny_pairs_parquet, tmp_path):
    args = common(tiny_sd_dir, tiny_pairs_parquet) + ["--inversion_cache_only", "--inversion_cache_shard_size", 1,
                                                      "--train_batch_size", 1]  # fmt: skip
    run(SCRIPT, args + ["--output_dir", tmp_path / "o1", "--inversion_cache", tmp_path / "one"])
    proc = run(
        SCRIPT,
        args + ["--output_dir", tmp_path / "o2", "--inversion_cache", tmp_path / "two"],
        launcher="accelerate",
        num_processes=2,
    )
    # the main process (the one that logs) built shards 0 and 2; process 1 built 1 and 3
    assert "shard 2 written (2/2 of this process)" in proc.stderr and "shard 1 written" not in proc.stderr
    [key] = os.listdir(tmp_path / "one")
    assert os.listdir(tmp_path / "two") == [key]  # the same key: the number of processes is not in it
    shards = sorted(f for f in os.listdir(tmp_path / "one" / key) if f.startswith("shard-"))
    assert len(shards) == 4
    for f in shards:
        a, b = load_file(tmp_path / "one" / key / f), load_file(tmp_path / "two" / key / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
