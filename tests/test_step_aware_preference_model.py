"""The step-aware preference model (SPO, arXiv 2406.04314): the converted published layout scores as an independent,
plainly written forward of the official model does; the converter script; the full ViT-H/14 key layout."""

import copy
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

from tests.tiny import char_tokenizer
from train_spo import StepAwarePreferenceModel


SCRIPT = os.path.join(REPO, "scripts", "convert_step_aware_preference_model.py")
_spec = importlib.util.spec_from_file_location("convert_step_aware_preference_model", SCRIPT)
converter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(converter)
convert_published_state_dict = converter.convert_published_state_dict
FREQ = 256  # the official TimestepEmbedder's frequency_embedding_size


# ----------------------------------------------------------------------------------------------------------------
# The official layout, written out from the official classes (time_conditioned_clip.py of RockeyCoss/SPO)
# ----------------------------------------------------------------------------------------------------------------


def official_layout(
    text_width, text_layers, text_mlp, vocab, max_positions, vision_width, vision_layers, vision_mlp, patch, image,
    projection,
) -> dict:  # fmt: skip
    """Published key -> shape: ``StepAwarePreferenceModel.model`` (``model.``) is ``HFTimeConditionedCLIPModel``:
    CLIPModel's towers (transformers 4.27, position ids persistent), ``adaLN_modulation = Sequential(SiLU, Linear)``
    in each vision layer (6 D) and after the post-layernorm (2 D), ``t_embedder.mlp = Sequential(Linear, SiLU,
    Linear)``."""

    def layer(prefix, width, mlp):
        shapes = {}
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{prefix}.self_attn.{proj}.weight"] = (width, width)
            shapes[f"{prefix}.self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{prefix}.{norm}.weight"] = shapes[f"{prefix}.{norm}.bias"] = (width,)
        shapes.update({f"{prefix}.mlp.fc1.weight": (mlp, width), f"{prefix}.mlp.fc1.bias": (mlp,)})
        shapes.update({f"{prefix}.mlp.fc2.weight": (width, mlp), f"{prefix}.mlp.fc2.bias": (width,)})
        return shapes

    num_positions = (image // patch) ** 2 + 1
    m = "model."
    shapes = {m + "logit_scale": ()}
    shapes[m + "text_model.embeddings.token_embedding.weight"] = (vocab, text_width)
    shapes[m + "text_model.embeddings.position_embedding.weight"] = (max_positions, text_width)
    shapes[m + "text_model.embeddings.position_ids"] = (1, max_positions)
    for i in range(text_layers):
        shapes.update(layer(f"{m}text_model.encoder.layers.{i}", text_width, text_mlp))
    shapes[m + "text_model.final_layer_norm.weight"] = shapes[m + "text_model.final_layer_norm.bias"] = (text_width,)
    shapes[m + "vision_model.embeddings.class_embedding"] = (vision_width,)
    shapes[m + "vision_model.embeddings.patch_embedding.weight"] = (vision_width, 3, patch, patch)
    shapes[m + "vision_model.embeddings.position_embedding.weight"] = (num_positions, vision_width)
    shapes[m + "vision_model.embeddings.position_ids"] = (1, num_positions)
    shapes[m + "vision_model.pre_layrnorm.weight"] = shapes[m + "vision_model.pre_layrnorm.bias"] = (vision_width,)
    for i in range(vision_layers):
        prefix = f"{m}vision_model.encoder.layers.{i}"
        shapes.update(layer(prefix, vision_width, vision_mlp))
        shapes[f"{prefix}.adaLN_modulation.1.weight"] = (6 * vision_width, vision_width)
        shapes[f"{prefix}.adaLN_modulation.1.bias"] = (6 * vision_width,)
    shapes[m + "vision_model.post_layernorm.weight"] = (vision_width,)
    shapes[m + "vision_model.post_layernorm.bias"] = (vision_width,)
    shapes[m + "vision_model.adaLN_modulation.1.weight"] = (2 * vision_width, vision_width)
    shapes[m + "vision_model.adaLN_modulation.1.bias"] = (2 * vision_width,)
    shapes[m + "visual_projection.weight"] = (projection, vision_width)
    shapes[m + "text_projection.weight"] = (projection, text_width)
    shapes[m + "t_embedder.mlp.0.weight"] = (vision_width, FREQ)
    shapes[m + "t_embedder.mlp.0.bias"] = (vision_width,)
    shapes[m + "t_embedder.mlp.2.weight"] = (vision_width, vision_width)
    shapes[m + "t_embedder.mlp.2.bias"] = (vision_width,)
    return shapes


def random_published(shapes: dict, seed: int = 0) -> dict:
    """Random fp32 tensors in the published layout, views into one flat storage as DeepSpeed's zero_to_fp32 writes
    them; the position ids as fp32 ``arange`` (zero_to_fp32 casts buffers with ``.float()``)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.empty(sum(math.prod(s) for s in shapes.values()))
    state, offset = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape)
        tensor = flat.narrow(0, offset, n).view(shape)
        offset += n
        if key.endswith("position_ids"):
            tensor.copy_(torch.arange(shape[1]).float()[None])
        elif key.endswith("logit_scale"):
            tensor.fill_(math.log(100.0))
        elif "norm" in key and key.endswith("weight"):
            tensor.copy_(1 + 0.1 * torch.randn(shape, generator=g))
        else:
            std = 0.3 if ("adaLN" in key or "t_embedder" in key) else 0.1
            tensor.copy_(std * torch.randn(shape, generator=g))
        state[key] = tensor
    return state


# ----------------------------------------------------------------------------------------------------------------
# A tiny SPM
# ----------------------------------------------------------------------------------------------------------------

TINY = {"width": 32, "layers": 2, "heads": 4, "mlp": 64, "patch": 14, "image": 28, "projection": 16}


def tiny_config(tokenizer) -> CLIPConfig:
    common = {"hidden_size": TINY["width"], "intermediate_size": TINY["mlp"], "num_attention_heads": TINY["heads"],
              "num_hidden_layers": TINY["layers"], "hidden_act": "gelu"}  # fmt: skip
    text = {**common, "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    vision = {**common, "image_size": TINY["image"], "patch_size": TINY["patch"]}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY["projection"])


def tiny_published(tokenizer, seed=0) -> dict:
    return random_published(
        official_layout(
            TINY["width"], TINY["layers"], TINY["mlp"], len(tokenizer), tokenizer.model_max_length, TINY["width"],
            TINY["layers"], TINY["mlp"], TINY["patch"], TINY["image"], TINY["projection"],
        ),
        seed,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    tokenizer = char_tokenizer()
    config = tiny_config(tokenizer)
    published = tiny_published(tokenizer)
    model = StepAwarePreferenceModel(config)
    model.load_state_dict(convert_published_state_dict(published, config=config))
    return tokenizer, config, published, model.eval()


def inputs(tokenizer, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, TINY["image"], TINY["image"], generator=g)
    prompts = ["a cat", "two dogs on a sofa", "x"][:batch]
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return pixel_values, tokens.input_ids, tokens.attention_mask, torch.tensor([999, 500, 0][:batch])


# ----------------------------------------------------------------------------------------------------------------
# The independent reference: the official forward written plainly on the published tensors
# ----------------------------------------------------------------------------------------------------------------


def reference_scores(published, config, pixel_values, input_ids, timesteps):
    p = {k[len("model.") :]: v.double() for k, v in published.items() if not k.endswith("position_ids")}
    vc = config.vision_config
    width, heads, eps = vc.hidden_size, vc.num_attention_heads, vc.layer_norm_eps
    batch = pixel_values.shape[0]

    def linear(x, name):
        return x @ p[name + ".weight"].T + (p[name + ".bias"] if name + ".bias" in p else 0)

    def norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    def silu(x):
        return x / (1 + torch.exp(-x))

    # timestep: [cos | sin] of t * 10000^(-i/128), i < 128, t unscaled; in fp32 as the official code (t * f rounds
    # by up to ~6e-5 at t = 999, which these random weights carry into the score at ~1e-4)
    t = timesteps.float()
    freqs = torch.exp(-math.log(10000) * torch.arange(FREQ // 2, dtype=torch.float32) / (FREQ // 2))
    sinusoid = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1).double()
    cond = silu(linear(silu(linear(sinusoid, "t_embedder.mlp.0")), "t_embedder.mlp.2"))

    # patches: a strided convolution written as unfold + matmul, then [CLS] + patches + positions
    patch = vc.patch_size
    grid = vc.image_size // patch
    patches = pixel_values.double().reshape(batch, 3, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, grid * grid, 3 * patch * patch)
    x = patches @ p["vision_model.embeddings.patch_embedding.weight"].reshape(width, -1).T
    cls = p["vision_model.embeddings.class_embedding"].expand(batch, 1, width)
    x = torch.cat([cls, x], 1) + p["vision_model.embeddings.position_embedding.weight"]
    x = norm(x, "vision_model.pre_layrnorm")

    def attention(h, prefix):
        head = width // heads

        def split(y):
            return y.reshape(batch, -1, heads, head).transpose(1, 2)

        q, k, v = (split(linear(h, f"{prefix}.self_attn.{n}_proj")) for n in "qkv")
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head), -1)
        return linear((weights @ v).transpose(1, 2).reshape(batch, -1, width), f"{prefix}.self_attn.out_proj")

    for i in range(vc.num_hidden_layers):
        prefix = f"vision_model.encoder.layers.{i}"
        mod = linear(cond, f"{prefix}.adaLN_modulation.1")[:, None]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[..., j * width : (j + 1) * width]
                                                                         for j in range(6))  # fmt: skip
        x = x + gate_msa * attention(norm(x, f"{prefix}.layer_norm1") * (1 + scale_msa) + shift_msa, prefix)
        h = norm(x, f"{prefix}.layer_norm2") * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * linear(gelu(linear(h, f"{prefix}.mlp.fc1")), f"{prefix}.mlp.fc2")
    pooled = norm(x[:, 0], "vision_model.post_layernorm")
    mod = linear(cond, "vision_model.adaLN_modulation.1")
    pooled = pooled * (1 + mod[:, width:]) + mod[:, :width]
    image = linear(pooled, "visual_projection")

    # text: transformers' CLIPTextModel on the published tensors (EOS token pooled), then the projection
    text_model = CLIPTextModel(CLIPTextConfig(**config.text_config.to_dict())).double().eval()
    text_state = {k[len("text_model.") :]: v for k, v in p.items() if k.startswith("text_model.")}
    text_model.load_state_dict(text_state)
    with torch.no_grad():
        text = linear(text_model(input_ids=input_ids).pooler_output, "text_projection")

    cos = (image * text).sum(-1) / image.norm(dim=-1) / text.norm(dim=-1)
    return p["logit_scale"].exp() * cos


def test_converted_scores_equal_the_reference_forward(tiny):
    tokenizer, config, published, model = tiny
    pixel_values, input_ids, attention_mask, timesteps = inputs(tokenizer)
    with torch.no_grad():
        scores = model(pixel_values, input_ids, attention_mask, timesteps)
    expected = reference_scores(published, config, pixel_values, input_ids, timesteps)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert expected.abs().min() > 1  # the scores are not trivially near zero
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 rounding
    with torch.no_grad():  # in float64 the two agree to rounding: the same computation
        scores64 = copy.deepcopy(model).double()(pixel_values.double(), input_ids, attention_mask, timesteps)
    torch.testing.assert_close(scores64, expected, rtol=0, atol=1e-9)


def test_the_timestep_changes_the_score(tiny):
    tokenizer, _, _, model = tiny
    pixel_values, input_ids, attention_mask, _ = inputs(tokenizer)
    with torch.no_grad():
        by_t = [model(pixel_values, input_ids, attention_mask, torch.full((3,), t)) for t in (0, 250, 999)]
    assert (by_t[0] - by_t[1]).abs().min() > 1e-2 and (by_t[1] - by_t[2]).abs().min() > 1e-2


def test_score_resizes_crops_and_normalises_like_the_official_scorer(tiny):
    tokenizer, config, published, model = tiny
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 40, 60, generator=g) * 2.2 - 1.1  # off the [-1, 1] range: clamped after resizing
    prompts = ["a cat", "two dogs on a sofa"]
    timesteps = torch.tensor([700, 20])
    scores = model.score(images, prompts, timesteps, tokenizer)
    # by hand: bicubic to short side 28 (40x60 -> 28x42), centre crop 7 px off the left, [-1, 1] -> [0, 1], mean/std
    resized = F.interpolate(images, size=(28, 42), mode="bicubic", align_corners=False)[..., 7:35]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixel_values = ((resized / 2 + 0.5).clamp(0, 1) - mean) / std
    input_ids = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    expected = reference_scores(published, config, pixel_values, input_ids, timesteps)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)


def write_tiny_clip_folder(folder, tokenizer, config):
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_script_converts_a_published_bin_that_loads_and_scores_alike(tiny, tmp_path):
    tokenizer, config, published, model = tiny
    checkpoint = tmp_path / "spm.bin"
    torch.save(published, checkpoint)
    clip = write_tiny_clip_folder(tmp_path / "clip", tokenizer, config)
    out = tmp_path / "converted"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, str(checkpoint), "--clip", clip, "--output_dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 position-id buffers dropped" in proc.stdout
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))

    loaded = StepAwarePreferenceModel.from_pretrained(str(out))
    from transformers import AutoTokenizer

    loaded_tokenizer = AutoTokenizer.from_pretrained(str(out))
    pixel_values, input_ids, attention_mask, timesteps = inputs(loaded_tokenizer)
    with torch.no_grad():
        assert torch.equal(
            loaded(pixel_values, input_ids, attention_mask, timesteps),
            model(pixel_values, input_ids, attention_mask, timesteps),
        )
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["a", "bb", "a cat"]
    assert torch.equal(
        loaded.score(images, prompts, 10, loaded_tokenizer), model.score(images, prompts, 10, tokenizer)
    )

    # save_pretrained / from_pretrained round trip in process
    model.save_pretrained(str(tmp_path / "saved"))
    again = StepAwarePreferenceModel.from_pretrained(str(tmp_path / "saved"))
    assert again.config_dict() == model.config_dict() and not any(b.is_meta for b in again.buffers())


@pytest.mark.parametrize("change", ["drop", "add"])
def test_a_missing_or_extra_published_key_is_one_line_naming_it(tiny, change):
    _, config, published, _ = tiny
    state = dict(published)
    if change == "drop":
        del state["model.vision_model.encoder.layers.1.adaLN_modulation.1.bias"]
        match = "missing key 'model.vision_model.encoder.layers.1.adaLN_modulation.1.bias'"
    else:
        state["model.vision_model.adaLN_modulation.2.weight"] = torch.zeros(1)
        match = "unexpected key 'model.vision_model.adaLN_modulation.2.weight'"
    for cfg in (config, None):
        with pytest.raises(ValueError, match=match) as error:
            convert_published_state_dict(state, config=cfg)
        assert "\n" not in str(error.value)


def test_the_script_and_from_pretrained_refuse_in_one_line(tiny, tmp_path):
    tokenizer, config, published, _ = tiny
    state = dict(published)
    state["model.visual_projection.weight"] = torch.zeros(TINY["projection"], TINY["width"] + 1)
    checkpoint = tmp_path / "bad.bin"
    torch.save(state, checkpoint)
    clip = write_tiny_clip_folder(tmp_path / "clip", tokenizer, config)
    from scripts.convert_step_aware_preference_model import main, parse_args  # in process: no second start-up

    with pytest.raises(ValueError, match=r"'model.visual_projection.weight' has shape \[16, 33\]") as error:
        main(parse_args([str(checkpoint), "--clip", clip, "--output_dir", str(tmp_path / "out")]))
    assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "out")

    with pytest.raises(ValueError, match=f"'{clip}': no model.safetensors in it"):
        StepAwarePreferenceModel.from_pretrained(clip)
    with pytest.raises(ValueError, match="no such folder"):
        StepAwarePreferenceModel.from_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------------------
# The real layout: PickScore v1's ViT-H/14, on the meta device
# ----------------------------------------------------------------------------------------------------------------


def test_the_published_vit_h_layout_maps_one_to_one_onto_the_model():
    text = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
            "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"}  # fmt: skip
    vision = {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16, "intermediate_size": 5120,
              "patch_size": 14, "image_size": 224, "hidden_act": "gelu"}  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)
    shapes = official_layout(1024, 24, 4096, 49408, 77, 1280, 32, 5120, 14, 224, 1024)
    assert len(shapes) == 982  # 980 parameters + the two position-id buffers
    with torch.device("meta"):
        model = StepAwarePreferenceModel(config)
        published = {k: torch.empty(s) for k, s in shapes.items()}
    converted = convert_published_state_dict(published, config=config)
    assert convert_published_state_dict(published).keys() == converted.keys()  # layer counts read from the keys

    expected = model.state_dict()
    assert len(converted) == len(expected) == 980 and converted.keys() == expected.keys()
    by_id = {id(v): k for k, v in published.items()}
    sources = [by_id[id(v)] for v in converted.values()]
    assert len(set(sources)) == len(sources) == 980  # each published tensor used once
    assert set(shapes) - set(sources) == {
        "model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids"
    }  # fmt: skip
    for key, value in converted.items():
        assert value.shape == expected[key].shape, key
    assert (
        converted["block_modulations.31.weight"]
        is published["model.vision_model.encoder.layers.31.adaLN_modulation.1.weight"]
    )
    assert converted["time_embedder.0.weight"].shape == (1280, 256)
    assert sum(v.numel() for v in expected.values()) == sum(math.prod(s) for s in shapes.values()) - 77 - 257
