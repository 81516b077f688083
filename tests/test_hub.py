"""Sharing: the model card is a huggingface_hub ModelCard with the Hub's metadata, and --push_to_hub uploads the
adapter, the card and the samples and nothing else. Only the network is stubbed: huggingface_hub's own code decides
what to upload and sends the card to the Hub's validator."""

import json
import os

import pytest
from huggingface_hub import ModelCard

from train_inversion_dpo import parse_args, push_folder_to_hub, write_model_card


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
        if path == "/api/repos/create":
            body = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
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
