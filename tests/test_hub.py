"""--push_to_hub uploads the adapter, the card and the samples, never checkpoints or logs (network calls stubbed)."""

import argparse
import os

import huggingface_hub
from huggingface_hub.utils import filter_repo_objects

from inversion_dpo.training import push_folder_to_hub


def test_push_uploads_the_adapter_card_and_samples_only(tmp_path, monkeypatch):
    for name in (
        "pytorch_lora_weights.safetensors",
        "README.md",
        "validation.png",
        "logs/metrics.jsonl",
        "validation/final-000004.png",
        "checkpoint-4/optimizer.bin",
        ".partial-checkpoint-5/x.bin",
    ):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("x")
    calls = {}

    class Repo:
        repo_id = "me/adapter"

    def create_repo(repo_id, exist_ok, token):
        calls["create"] = (repo_id, exist_ok, token)
        return Repo()

    def upload_folder(repo_id, folder_path, token, commit_message, ignore_patterns):
        files = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        calls["uploaded"] = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        calls["repo"] = repo_id

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    args = argparse.Namespace(hub_model_id="me/adapter", hub_token="t0k")
    assert push_folder_to_hub(args, str(tmp_path)) == "me/adapter"
    assert calls["create"] == ("me/adapter", True, "t0k") and calls["repo"] == "me/adapter"
    assert calls["uploaded"] == ["README.md", "pytorch_lora_weights.safetensors", "validation.png"]
