"""Sharing: the model card is a huggingface_hub ModelCard with the Hub's metadata, and --push_to_hub uploads the
adapter, the card and the samples and nothing else. Only the network is stubbed: huggingface_hub's own code decides
what to upload and sends the card to the Hub's validator."""

import ast
import json
import os
import re

import pytest
from huggingface_hub import ModelCard

from train_inversion_dpo import base_model_license, parse_args, push_folder_to_hub, write_model_card


def card_args(*extra):
    return parse_args(
        ["--pretrained_model_name_or_path", "stable-diffusion-v1-5/stable-diffusion-v1-5",
         "--dataset_name", "someone/pick-a-pic-v2", "--hub_model_id", "me/adapter", "--hub_token", "t0k", *extra]
    )  # fmt: skip


def test_card_metadata_round_trips_through_modelcard(tmp_path):
    write_model_card(card_args(), str(tmp_path), "stable-diffusion", 10, 5, [("a red circle", "samples/00.png")])
    card = ModelCard.load(str(tmp_path / "README.md"))
    data = card.data.to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["datasets"] == ["someone/pick-a-pic-v2"]
    assert data["license"] == "other"  # the base's card is not at hand offline
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"diffusers", "lora", "text-to-image", "inversion-dpo", "stable-diffusion"} <= set(data["tags"])
    assert data["widget"] == [{"text": "a red circle", "output": {"url": "samples/00.png"}}]
    assert "![a red circle](./samples/00.png)" in card.text and "`inversion_dpo`" in card.text
    assert "# Inversion-DPO LoRA for stable-diffusion-v1-5/stable-diffusion-v1-5\n" in card.text
    assert "10 preference pairs from `someone/pick-a-pic-v2` for 5 optimizer steps" in card.text


def snippet(card) -> str:
    """The card's usage code, checked to compile and to import nothing it does not use."""
    (code,) = re.findall(r"```python\n(.*?)```", card.text, re.S)
    tree = ast.parse(code)
    imported = {
        a.asname or a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names
    }
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert imported <= used, f"unused imports: {imported - used}"
    return code


def test_the_usage_snippet_loads_the_base_from_the_hub_and_the_adapter_by_its_repo_id(tmp_path):
    code = snippet(
        write_model_card(card_args(), str(tmp_path), "stable-diffusion", 10, 5, [("a red circle", "s.png")])
    )
    assert code.splitlines() == [
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", '
        "torch_dtype=torch.float16)",
        'pipe = pipe.to("cuda")',
        'pipe.load_lora_weights("me/adapter")',
        'image = pipe("a red circle").images[0]',
        'image.save("sample.png")',
    ]
    # no --hub_model_id, or one without an owner: the id a push would create, with a placeholder owner
    args = card_args("--output_dir", str(tmp_path / "sd15-inversion-dpo"))
    args.hub_model_id = None
    assert 'load_lora_weights("<your-username>/sd15-inversion-dpo")' in snippet(
        write_model_card(args, str(tmp_path), "stable-diffusion", 1, 1)
    )
    args.hub_model_id = "adapter"
    assert 'load_lora_weights("<your-username>/adapter")' in snippet(
        write_model_card(args, str(tmp_path), "stable-diffusion", 1, 1)
    )
    # the VAE trained with comes along, in the pipeline's dtype
    args = card_args("--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix")
    code = snippet(write_model_card(args, str(tmp_path), "stable-diffusion-xl", 1, 1))
    assert 'vae = AutoencoderKL.from_pretrained("madebyollin/sdxl-vae-fp16-fix", torch_dtype=torch.float16)' in code
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", vae=vae, torch_dtype=torch.float16)' in code


def test_a_local_base_and_dataset_are_named_by_their_folder_and_file(tmp_path):
    base = tmp_path / "models" / "my-sd"
    base.mkdir(parents=True)
    args = card_args()
    args.pretrained_model_name_or_path, args.dataset_name = str(base), str(tmp_path / "data" / "pairs.parquet")
    card = write_model_card(args, str(tmp_path), "stable-diffusion", 1, 1)
    assert str(tmp_path) not in card.content
    assert "# Inversion-DPO LoRA for my-sd\n" in card.text and "from `pairs.parquet`" in card.text
    code = snippet(card)
    assert "# trained on the local model folder 'my-sd': put its path (or its Hub id) here" in code
    assert 'DiffusionPipeline.from_pretrained("path/to/my-sd", torch_dtype=torch.float16)' in code


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache; ``add(repo_id, filename, text)`` caches one file of a model and returns its snapshot."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id, filename, text):
        snapshot = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "abc"
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / filename).write_text(text)
        (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
        (snapshot.parent.parent / "refs" / "main").write_text("abc")
        return snapshot

    return add


def test_a_base_in_the_hub_cache_is_named_by_its_id_with_its_license(tmp_path, hub_cache):
    readme = "---\nlicense: openrail++\n---\n# a model\n"
    snapshot = hub_cache("stabilityai/stable-diffusion-xl-base-1.0", "README.md", readme)
    assert base_model_license("stabilityai/stable-diffusion-xl-base-1.0") == "openrail++"
    args = card_args()
    args.pretrained_model_name_or_path = str(snapshot)  # the cache's own folder, as a path
    card = write_model_card(args, str(tmp_path), "stable-diffusion-xl", 1, 1)
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0" and card.data.license == "openrail++"
    assert 'from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16)' in snippet(card)
    assert str(tmp_path) not in card.content


def test_the_card_shows_the_headline_metrics_of_the_last_steps(tmp_path):
    means = {"steps": 50, "loss": 12.5, "preference_loss": 0.61234, "accuracy": 0.7, "margin": -2.5e-05}
    card = write_model_card(card_args("--sft_weight", "1"), str(tmp_path), "stable-diffusion", 300, 1000, (), means)
    assert (
        "| pairs | optimizer steps | loss | preference loss | preference accuracy | margin |\n"
        "|---:|---:|---:|---:|---:|---:|\n| 300 | 1000 | 12.5000 | 0.6123 | 70.0% | -2.5e-05 |\n\n"
        "Loss, accuracy and margin: means over the last 50 steps." in card.text
    )
    sft = card_args("--objective", "sft")
    text = write_model_card(sft, str(tmp_path), "stable-diffusion", 3, 1, (), {"steps": 1, "loss": 0.25}).text
    assert "| pairs | optimizer steps | loss |\n|---:|---:|---:|\n| 3 | 1 | 0.2500 |" in text
    assert "means over the last 1 step." in text


def test_card_license_is_the_flag_or_the_local_base_models(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# a model\n")
    args = card_args()
    args.pretrained_model_name_or_path, args.dataset_name = str(base), str(tmp_path)
    data = write_model_card(args, str(tmp_path), "stable-diffusion", 1, 1).data.to_dict()
    assert data["license"] == "creativeml-openrail-m"
    # local paths are not Hub ids: they stay out of the metadata (the Hub would refuse them)
    assert "base_model" not in data and "datasets" not in data and "widget" not in data
    args.license = "apache-2.0"
    assert write_model_card(args, str(tmp_path), "stable-diffusion", 1, 1).data.license == "apache-2.0"


class FakeHub:
    """The Hub's HTTP API as far as a push uses it, behind httpx's MockTransport: huggingface_hub's client runs
    unchanged and only the network is replaced. Records what each endpoint received."""

    def __init__(self):
        self.calls, self.validated, self.committed = [], [], []

    def handle(self, request):
        import httpx2

        path = request.url.path
        self.calls.append((request.method, path, request.headers.get("authorization")))
        if path == "/api/repos/create":  # a name without an owner lands under the token's user, "me"
            body = json.loads(request.content)
            owner = body.get("organization") or "me"
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{owner}/{body['name']}"})
        if path == "/api/validate-yaml":
            self.validated.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={"warnings": []})
        if path.startswith("/api/models/me/adapter/preupload/"):  # every file as a regular git blob: no LFS step
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if path.startswith("/api/models/me/adapter/commit/"):
            lines = [json.loads(line) for line in request.content.splitlines()]
            self.committed = sorted(line["value"]["path"] for line in lines if line["key"] == "file")
            return httpx2.Response(
                200, json={"commitUrl": "https://huggingface.co/me/adapter/commit/0", "commitOid": "0"}
            )
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})


@pytest.fixture
def hub(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants

    fake = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain commits: what is sent is visible here
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle)))
    yield fake
    huggingface_hub.set_client_factory(httpx2.Client)
    huggingface_hub.close_session()


def test_push_uploads_the_adapter_card_and_samples_only(tmp_path, hub):
    for name in (
        "pytorch_lora_weights.safetensors",
        "validation.png",
        "samples/00.png",
        "samples/01.png",
        "logs/metrics.jsonl",
        "logs/bad_rows.jsonl",
        "logs/inversion-dpo/events.out.tfevents",
        "validation/final-000004.png",
        "checkpoint-4/optimizer.safetensors",
        "checkpoint-4/pytorch_lora_weights.safetensors",
        ".partial-checkpoint-5/optimizer.safetensors",
        "notes.txt",
    ):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("x")
    args = card_args()
    write_model_card(
        args, str(tmp_path), "stable-diffusion", 10, 4, [("a", "samples/00.png"), ("b", "samples/01.png")]
    )
    assert push_folder_to_hub(args, str(tmp_path)) == "me/adapter"
    assert hub.committed == [
        "README.md", "pytorch_lora_weights.safetensors", "samples/00.png", "samples/01.png", "validation.png"
    ]  # fmt: skip
    # the card went to the Hub's validator before anything was uploaded, every call with the token
    calls = [c for c in hub.calls if c[1] != "/api/agent-harnesses"]  # huggingface_hub's own look-up, not ours
    paths = [path for _, path, _ in calls]
    assert paths[0] == "/api/repos/create" and paths[-1] == "/api/models/me/adapter/commit/main"
    assert paths.index("/api/validate-yaml") < paths.index("/api/models/me/adapter/preupload/main")
    assert all(token == "Bearer t0k" for _, _, token in calls)
    assert set(hub.validated) == {open(tmp_path / "README.md").read()}
    assert ModelCard(hub.validated[0]).data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_a_push_puts_the_repo_id_it_created_into_the_cards_snippet(tmp_path, hub):
    for name in ("pytorch_lora_weights.safetensors", "validation.png"):
        (tmp_path / name).write_text("x")
    args = card_args()
    args.hub_model_id = "adapter"  # no owner: the Hub puts it under the token's user
    write_model_card(args, str(tmp_path), "stable-diffusion", 10, 4)
    assert 'load_lora_weights("<your-username>/adapter")' in open(tmp_path / "README.md").read()
    assert push_folder_to_hub(args, str(tmp_path)) == "me/adapter"
    (sent,) = set(hub.validated)
    assert 'pipe.load_lora_weights("me/adapter")' in sent and "<your-username>" not in sent
    assert sent == open(tmp_path / "README.md").read()  # the card kept beside the adapter says the same
    assert ModelCard(sent).data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_an_spo_adapter_has_its_own_card_and_pushes_the_same_way(tmp_path, hub):
    """train_spo.py's card (prompts, pairs kept and skipped, the kept pairs' loss and accuracy) through the Hub's
    validator and a push, with the copied push code."""
    import train_spo

    for name in ("pytorch_lora_weights.safetensors", "validation.png", "samples/00.png", "checkpoint-4/x", "logs/y"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("x")
    args = train_spo.parse_args(
        [
            "--pretrained_model_name_or_path",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "--prompts",
            "yuvalkirstain/pickapic_v1_no_images",
            "--preference_model",
            "shapes",
            "--output_dir",
            str(tmp_path),
            "--hub_model_id",
            "adapter",
            "--hub_token",
            "t0k",
            "--license",
            "openrail",
        ]  # fmt: skip
    )
    metrics = train_spo.headline_metrics(
        [
            {"step": 1, "pairs_kept": 2, "pairs_skipped": 2, "loss": 0.7, "accuracy": 0.5},
            {"step": 2, "pairs_kept": 0, "pairs_skipped": 4},
        ]  # fmt: skip
    )
    assert metrics == {"steps": 2, "pairs_kept": 2, "pairs_skipped": 6, "loss": 0.7, "accuracy": 0.5}
    train_spo.write_model_card(args, str(tmp_path), 4000, 2, [("a cat", "samples/00.png")], metrics)
    assert train_spo.push_folder_to_hub(args, str(tmp_path)) == "me/adapter"
    assert hub.committed == ["README.md", "pytorch_lora_weights.safetensors", "samples/00.png", "validation.png"]
    (sent,) = set(hub.validated)
    card = ModelCard(sent)
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and card.data.license == "openrail"
    assert card.data.datasets == ["yuvalkirstain/pickapic_v1_no_images"] and "spo" in card.data.tags
    assert "# SPO LoRA for stable-diffusion-v1-5/stable-diffusion-v1-5" in sent and "4000 prompts" in sent
    assert "| 4000 | 2 | 2 | 6 | 0.7000 | 50.0% |" in sent and 'pipe.load_lora_weights("me/adapter")' in sent
