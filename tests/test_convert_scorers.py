"""scripts/convert_scorer_weights.py: the published HPSv2 (open_clip) and ImageReward (BLIP) checkpoints into the
folders scorers.py reads. Each is checked against an independent reference forward of the original architecture,
written here from the layouts at toy sizes, with random weights saved the way the published file is, converted by
the command a user runs, and scored through scorers.py."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from torch import nn

from evaluation.scorers import ClipScorer, ImageRewardScorer, InputError
from tests.tiny import char_tokenizer


SCRIPT = os.path.join(REPO, "scripts", "convert_scorer_weights.py")
PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "cat"]
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def random_images():
    """Noise images, landscape, portrait and square, whose crop margins are even (where torchvision's centre crop
    rounds and transformers' floors, an odd margin moves the crop by one pixel; see docs/evaluation.md)."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(48, 36), (36, 61), (32, 32)]
    ]


def reference_pixels(image, size):
    """open_clip's evaluation transform, and ImageReward's: shortest side to ``size`` (bicubic), centre crop, [0, 1],
    OpenAI's mean and std."""
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.convert("RGB").resize(new, Image.BICUBIC)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    x = torch.from_numpy(np.array(image.crop((left, top, left + size, top + size)))).permute(2, 0, 1).float() / 255
    return (x - OPENAI_MEAN[:, None, None]) / OPENAI_STD[:, None, None]


def randomize(module, seed):
    """Every bias and LayerNorm away from its initial value, so that a swapped or dropped one shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if isinstance(dict(module.named_modules()).get(name.rsplit(".", 1)[0]), nn.LayerNorm):
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
    return module


def convert(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *[str(a) for a in args]],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )  # fmt: skip


def converter_module():
    spec = importlib.util.spec_from_file_location("convert_scorer_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# HPSv2: a reference of open_clip's CLIP (OpenAI's layout)
# ---------------------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefResidualBlock(nn.Module):
    """Pre-LayerNorm block, torch's MultiheadAttention on (sequence, batch, width)."""

    def __init__(self, width, heads, mlp, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=act(), c_proj=nn.Linear(mlp, width)))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads, mlp, act):
        super().__init__()
        self.resblocks = nn.ModuleList([RefResidualBlock(width, heads, mlp, act) for _ in range(layers)])

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class RefOpenClip(nn.Module):
    """Vision: 32 px, patch 8, width 48 in 3 heads of 16 (not 64: the heads flag matters), 2 layers; text: 16 tokens,
    width 32 in 2 heads, 2 layers, the char tokenizer's 514 ids; embedding 24."""

    SIZE, PATCH, V_WIDTH, V_HEADS, T_WIDTH, T_HEADS, CONTEXT, VOCAB, EMBED = 32, 8, 48, 3, 32, 2, 16, 514, 24

    def __init__(self, act=nn.GELU):
        super().__init__()
        grid = self.SIZE // self.PATCH
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, self.V_WIDTH, self.PATCH, self.PATCH, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(self.V_WIDTH) * 0.5)
        self.visual.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, self.V_WIDTH) * 0.5)
        self.visual.ln_pre = nn.LayerNorm(self.V_WIDTH)
        self.visual.transformer = RefTransformer(self.V_WIDTH, 2, self.V_HEADS, 80, act)
        self.visual.ln_post = nn.LayerNorm(self.V_WIDTH)
        self.visual.proj = nn.Parameter(torch.randn(self.V_WIDTH, self.EMBED) * self.V_WIDTH**-0.5)
        self.token_embedding = nn.Embedding(self.VOCAB, self.T_WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(self.CONTEXT, self.T_WIDTH) * 0.5)
        self.transformer = RefTransformer(self.T_WIDTH, 2, self.T_HEADS, 64, act)
        self.ln_final = nn.LayerNorm(self.T_WIDTH)
        self.text_projection = nn.Parameter(torch.randn(self.T_WIDTH, self.EMBED) * self.T_WIDTH**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        causal = torch.full((self.CONTEXT, self.CONTEXT), float("-inf")).triu(1)
        self.register_buffer("attn_mask", causal)  # persistent, as in older open_clip: the converter ignores it

    def encode_image(self, pixels):
        v = self.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)  # (batch, patches, width), patches row by row
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, ids):
        """``ids``: (batch, context), zero-padded as open_clip's tokenizer pads; pooled at the largest id (the end
        of text)."""
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x.transpose(0, 1), self.attn_mask).transpose(0, 1))
        return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection


def open_clip_ids(tokenizer, prompts, context):
    rows = tokenizer(list(prompts), truncation=True, max_length=context).input_ids
    return torch.tensor([row + [0] * (context - len(row)) for row in rows])


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip-tokenizer"))
    char_tokenizer(max_length=RefOpenClip.CONTEXT).save_pretrained(folder)
    return folder


def save_published_hpsv2(model, path):
    """As xswu/HPSv2's files are: ``{"state_dict": ...}`` of a DataParallel-wrapped model (``module.`` keys)."""
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)


@pytest.mark.slow
@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_hpsv2_converted_matches_an_open_clip_reference(quick_gelu, clip_tokenizer_dir, tmp_path):
    ref = randomize(RefOpenClip(QuickGELU if quick_gelu else nn.GELU), seed=1).eval()
    save_published_hpsv2(ref, tmp_path / "HPS_v2.1_compressed.pt")
    out = tmp_path / "hpsv2"
    flags = ["--vision_heads", 3, "--text_heads", 2] + (["--quick_gelu"] if quick_gelu else [])
    proc = convert("hpsv2", tmp_path / "HPS_v2.1_compressed.pt", "--output_dir", out, "--tokenizer", clip_tokenizer_dir,
                   *flags)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 heads, patch 8, 32 px" in proc.stdout and "16 tokens, vocabulary 514" in proc.stdout

    scorer = ClipScorer("hpsv2", str(out))
    images = random_images()
    inputs = scorer.processor(text=PROMPTS, images=images, return_tensors="pt", padding=True, truncation=True)
    pixels = torch.stack([reference_pixels(im, RefOpenClip.SIZE) for im in images])
    assert torch.equal(inputs.pixel_values, pixels)  # open_clip's preprocessing, to the bit
    with torch.no_grad():
        ref_image = ref.encode_image(pixels)
        ref_text = ref.encode_text(open_clip_ids(scorer.processor.tokenizer, PROMPTS, RefOpenClip.CONTEXT))
        image = scorer.model.get_image_features(pixel_values=pixels).pooler_output
        text = scorer.model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    torch.testing.assert_close(image, ref_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text.pooler_output, ref_text, atol=1e-4, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(ref_image, ref_text).tolist()
    assert scorer(images, PROMPTS) == pytest.approx(cos, abs=1e-4)
    assert scorer.model.logit_scale.item() == pytest.approx(ref.logit_scale.item(), abs=1e-6)
    assert inputs.input_ids.shape[1] == RefOpenClip.CONTEXT  # the long prompt was cut to the context length

    report = json.loads((out / "conversion.json").read_text())
    assert sorted(report["used"] + report["ignored"]) == sorted(ref.state_dict()) and report["ignored"] == [
        "attn_mask"
    ]


@pytest.mark.slow
def test_hpsv2_heads_matter(clip_tokenizer_dir, tmp_path):
    """The heads are the one size the shapes do not give: other heads give other embeddings (so the reference test
    above is sensitive to them), and the default for ViT-H/14's 1280-wide vision tower is open_clip's 16."""
    ref = randomize(RefOpenClip(), seed=2).eval()
    save_published_hpsv2(ref, tmp_path / "hps.pt")
    proc = convert("hpsv2", tmp_path / "hps.pt", "--output_dir", tmp_path / "wrong", "--tokenizer", clip_tokenizer_dir,
                   "--vision_heads", 1, "--text_heads", 1)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scorer = ClipScorer("hpsv2", str(tmp_path / "wrong"))
    pixels = torch.stack([reference_pixels(im, RefOpenClip.SIZE) for im in random_images()])
    with torch.no_grad():
        assert not torch.allclose(
            scorer.model.get_image_features(pixel_values=pixels).pooler_output, ref.encode_image(pixels), atol=1e-3
        )


def meta_open_clip_vit_h14():
    """An open_clip ViT-H/14 state dict at its real shapes (ViT-H-14.json: vision 32 layers of 1280 in 16 heads of
    80, patch 14, 224 px; text 24 layers of 1024, 77 tokens, 49408 ids; embedding 1024), on the meta device."""
    shapes = {"visual.conv1.weight": (1280, 3, 14, 14), "visual.class_embedding": (1280,),
              "visual.positional_embedding": (257, 1280), "visual.proj": (1280, 1024),
              "token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
              "text_projection": (1024, 1024), "logit_scale": ()}  # fmt: skip
    for prefix, width, layers in (("visual.", 1280, 32), ("", 1024, 24)):
        for p in ("weight", "bias"):
            shapes.update({f"{prefix}{n}.{p}": (width,) for n in (["ln_pre", "ln_post"] if prefix else ["ln_final"])})
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            shapes.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,), b + "ln_2.weight": (width,),
                           b + "ln_2.bias": (width,), b + "attn.in_proj_weight": (3 * width, width),
                           b + "attn.in_proj_bias": (3 * width,), b + "attn.out_proj.weight": (width, width),
                           b + "attn.out_proj.bias": (width,), b + "mlp.c_fc.weight": (4 * width, width),
                           b + "mlp.c_fc.bias": (4 * width,), b + "mlp.c_proj.weight": (width, 4 * width),
                           b + "mlp.c_proj.bias": (width,)})  # fmt: skip
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_hpsv2_at_vit_h14_shapes_fits_transformers_clip():
    """Structural only (no weights at that size here): every tensor of a ViT-H/14 state dict maps once onto
    CLIPModel's parameters, names and shapes, with the sizes and heads open_clip's ViT-H-14 has."""
    from transformers import CLIPModel

    conv = converter_module()
    args = conv.parse_args(["hpsv2", "x.pt", "--output_dir", "y"])
    tensors, config, src, summary = conv.convert_hpsv2_state(meta_open_clip_vit_h14(), "x.pt", args)
    conv.check_against(CLIPModel, config, tensors, "hpsv2")
    v, t = config.vision_config, config.text_config
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.patch_size, v.image_size) == (
        32,
        1280,
        16,
        14,
        224,
    )
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.max_position_embeddings) == (24, 1024, 16, 77)
    assert (v.hidden_act, t.hidden_act, v.layer_norm_eps, config.projection_dim) == ("gelu", "gelu", 1e-5, 1024)
    assert (t.eos_token_id, t.bos_token_id) == (49407, 49406)
    assert len(src.taken) == len(meta_open_clip_vit_h14()) and not src.ignored


# ---------------------------------------------------------------------------------------------------------------
# ImageReward: a reference of BLIP's ViT and cross-attention BERT, and ImageReward's MLP
# ---------------------------------------------------------------------------------------------------------------


def attend(q, k, v, heads, bias=None):
    """Scaled dot-product attention of (batch, n, width) tensors split into ``heads``; ``bias`` added to the
    scores."""
    (b, n, width), d = q.shape, q.shape[-1] // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, width)


def linear_module(**layers):
    m = nn.Module()
    for name, layer in layers.items():
        setattr(m, name, layer)
    return m


class RefViTBlock(nn.Module):
    """timm's block as BLIP uses it: pre-LayerNorm (eps 1e-6), one packed qkv Linear ([q; k; v] rows), GELU MLP."""

    def __init__(self, width, heads, mlp):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = linear_module(qkv=nn.Linear(width, 3 * width), proj=nn.Linear(width, width))
        self.mlp = linear_module(fc1=nn.Linear(width, mlp), fc2=nn.Linear(mlp, width))

    def forward(self, x):
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.attn.proj(attend(q, k, v, self.heads))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class RefViT(nn.Module):
    def __init__(self, size, patch, width, heads, layers, mlp):
        super().__init__()
        self.patch_embed = linear_module(proj=nn.Conv2d(3, width, patch, patch))
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, width) * 0.5)
        self.blocks = nn.ModuleList([RefViTBlock(width, heads, mlp) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class RefBertAttention(nn.Module):
    """BERT's attention with its output: LayerNorm(x + dense(attention)), post-LayerNorm. Cross-attention takes its
    keys and values from the image (another width)."""

    def __init__(self, hidden, heads, kv_width, eps):
        super().__init__()
        self.heads = heads
        self.self = linear_module(query=nn.Linear(hidden, hidden), key=nn.Linear(kv_width, hidden),
                                  value=nn.Linear(kv_width, hidden))  # fmt: skip
        self.output = linear_module(dense=nn.Linear(hidden, hidden), LayerNorm=nn.LayerNorm(hidden, eps=eps))

    def forward(self, x, context, bias=None):
        a = attend(self.self.query(x), self.self.key(context), self.self.value(context), self.heads, bias)
        return self.output.LayerNorm(x + self.output.dense(a))


class RefBertLayer(nn.Module):
    def __init__(self, hidden, heads, image_width, mlp, eps):
        super().__init__()
        self.attention = RefBertAttention(hidden, heads, hidden, eps)
        self.crossattention = RefBertAttention(hidden, heads, image_width, eps)
        self.intermediate = linear_module(dense=nn.Linear(hidden, mlp))
        self.output = linear_module(dense=nn.Linear(mlp, hidden), LayerNorm=nn.LayerNorm(hidden, eps=eps))

    def forward(self, x, pad_bias, image):
        x = self.attention(x, x, pad_bias)  # bidirectional: the encoder, not the decoder
        x = self.crossattention(x, image)  # every image token
        return self.output.LayerNorm(x + self.output.dense(nn.functional.gelu(self.intermediate.dense(x))))


class RefBert(nn.Module):
    def __init__(self, vocab, hidden, heads, layers, mlp, positions, image_width, eps=1e-12):
        super().__init__()
        self.embeddings = linear_module(word_embeddings=nn.Embedding(vocab, hidden),
                                        position_embeddings=nn.Embedding(positions, hidden),
                                        LayerNorm=nn.LayerNorm(hidden, eps=eps))  # fmt: skip
        self.embeddings.register_buffer("position_ids", torch.arange(positions)[None])  # saved, as in BLIP's
        self.encoder = linear_module(
            layer=nn.ModuleList([RefBertLayer(hidden, heads, image_width, mlp, eps) for _ in range(layers)])
        )

    def forward(self, ids, mask, image):
        e = self.embeddings
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1])))
        pad_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, pad_bias, image)
        return x


class RefImageReward(nn.Module):
    """ImageReward: BLIP_Pretrain's ViT (32 px, patch 8, width 48 in 3 heads, 2 blocks) and BERT (width 32 in 2
    heads, 2 layers, 40 positions, cross-attention to width 48), its vision_proj/text_proj, and the MLP
    32 -> 12 -> 8 -> 6 -> 4 -> 1 as nn.Sequential with dropouts at 1, 3, 5: Linear layers 0, 2, 4, 6, 7."""

    SIZE, PATCH, V_WIDTH, V_HEADS, HIDDEN, T_HEADS = 32, 8, 48, 3, 32, 2

    def __init__(self, vocab, mean=0.16717362830052426, std=1.0333394966054072):
        super().__init__()
        self.mean, self.std = mean, std
        self.blip = nn.Module()
        self.blip.visual_encoder = RefViT(self.SIZE, self.PATCH, self.V_WIDTH, self.V_HEADS, 2, 72)
        self.blip.text_encoder = RefBert(vocab, self.HIDDEN, self.T_HEADS, 2, 56, 40, self.V_WIDTH)
        self.blip.vision_proj, self.blip.text_proj = nn.Linear(self.V_WIDTH, 16), nn.Linear(self.HIDDEN, 16)
        sizes = [self.HIDDEN, 12, 8, 6, 4, 1]
        layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.mlp = linear_module(layers=nn.Sequential(layers[0], nn.Dropout(0.2), layers[1], nn.Dropout(0.2),
                                                      layers[2], nn.Dropout(0.1), layers[3], layers[4]))  # fmt: skip

    def reward(self, pixels, ids, mask):
        image = self.blip.visual_encoder(pixels)
        cls = self.blip.text_encoder(ids, mask, image)[:, 0]
        return ((self.mlp.layers(cls).squeeze(-1) - self.mean) / self.std).tolist()


def save_bert_vocab(folder):
    """bert-base-uncased's kind of vocabulary at toy size: specials, letters, word-piece letters."""
    from transformers import BertTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]) + "\n"
        )
    BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return folder


def imagereward_tokenizer(folder):
    """ImageReward's tokenizer as BLIP's init_tokenizer builds it: BERT plus [DEC] (bos) and [ENC]."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(os.path.join(folder, "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


# ImageReward's med_config.json at toy sizes
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 56,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
              "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 59, "encoder_width": 48,
              "add_cross_attention": True}  # fmt: skip


@pytest.fixture(scope="module")
def imagereward_published(tmp_path_factory):
    """``ImageReward.pt`` (a bare state dict, as THUDM/ImageReward's) with ``med_config.json`` beside it, a BERT
    tokenizer folder without [DEC]/[ENC] (as bert-base-uncased), and the reference model."""
    root = tmp_path_factory.mktemp("imagereward")
    tokenizer_dir = save_bert_vocab(str(root / "bert"))
    vocab = len(imagereward_tokenizer(tokenizer_dir))
    ref = randomize(RefImageReward(vocab), seed=3).eval()
    with torch.no_grad():  # a head of default-initialised layers squeezes the rewards together: spread them
        for layer in ref.mlp.layers[::2]:
            layer.weight.mul_(3.0)
    torch.save(ref.state_dict(), root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps(dict(MED_CONFIG, vocab_size=vocab)))
    return {"checkpoint": root / "ImageReward.pt", "tokenizer": tokenizer_dir, "ref": ref, "root": root}


@pytest.mark.slow
def test_imagereward_converted_matches_a_blip_reference(imagereward_published, tmp_path):
    pub, out = imagereward_published, tmp_path / "imagereward"
    # the text heads come from med_config.json
    proc = convert("imagereward", pub["checkpoint"], "--output_dir", out, "--tokenizer", pub["tokenizer"],
                   "--vision_heads", RefImageReward.V_HEADS)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "text: 2 layers, width 32, 2 heads" in proc.stdout and "head: layers [0, 2, 4, 6, 7]" in proc.stdout

    scorer, ref = ImageRewardScorer(str(out)), pub["ref"]
    images = random_images()
    # the token ids are ImageReward's: its tokenizer, padded to 35, truncated, [CLS] first (its score() does not
    # put [ENC] there, unlike BLIP's image-text matching)
    expected = imagereward_tokenizer(pub["tokenizer"])(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    inputs = scorer.processor(images=images, text=PROMPTS, return_tensors="pt", padding="max_length",
                              truncation=True, max_length=35)  # fmt: skip
    assert torch.equal(inputs.input_ids, expected.input_ids) and torch.equal(
        inputs.attention_mask, expected.attention_mask
    )
    assert (inputs.input_ids[:, 0] == scorer.processor.tokenizer.cls_token_id).all()
    assert scorer.processor.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [57, 58]
    pixels = torch.stack([reference_pixels(im, RefImageReward.SIZE) for im in images])
    assert torch.equal(inputs.pixel_values, pixels)  # ImageReward's resize, centre crop and normalisation

    with torch.no_grad():
        torch.testing.assert_close(  # the vision tower alone
            scorer.model.vision_model(pixel_values=pixels)[0], ref.blip.visual_encoder(pixels), atol=1e-4, rtol=1e-4
        )
        expected_rewards = ref.reward(pixels, expected.input_ids, expected.attention_mask)
        image = scorer.model.vision_model(pixel_values=pixels)[0]
        text = scorer.model.text_encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                         encoder_hidden_states=image)[0]  # fmt: skip
        ref_text = ref.blip.text_encoder(expected.input_ids, expected.attention_mask, ref.blip.visual_encoder(pixels))
        torch.testing.assert_close(text, ref_text, atol=1e-4, rtol=1e-4)  # every token of the image-grounded text
    rewards = scorer(images, PROMPTS)
    assert rewards == pytest.approx(expected_rewards, abs=1e-4)
    assert max(expected_rewards) - min(expected_rewards) > 0.1  # the rewards differ: the test can tell

    # every tensor of the checkpoint used once (or ignored: the position_ids buffer), none made up but the unused
    # itm_head (ImageReward's BLIP has none; BlipForImageTextRetrieval does)
    report = json.loads((out / "conversion.json").read_text())
    assert sorted(report["used"] + report["ignored"]) == sorted(ref.state_dict())
    assert report["ignored"] == ["blip.text_encoder.embeddings.position_ids"]
    assert report["zero_filled"] == ["itm_head.weight", "itm_head.bias"]


def test_imagereward_at_published_shapes_fits_transformers_blip():
    """Structural only: ImageReward's BLIP at its real shapes (ViT-L/16 at 224 px: 24 blocks of 1024; BERT-base
    with cross-attention to 1024: 12 layers of 768, 512 positions, 30524 ids; MLP 768 -> 1024 -> 128 -> 64 -> 16
    -> 1) maps once onto BlipForImageTextRetrieval's parameters, names and shapes; heads 16 and 12."""
    from transformers import BlipForImageTextRetrieval

    shapes = {"blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
              "blip.visual_encoder.patch_embed.proj.bias": (1024,), "blip.visual_encoder.cls_token": (1, 1, 1024),
              "blip.visual_encoder.pos_embed": (1, 197, 1024), "blip.visual_encoder.norm.weight": (1024,),
              "blip.visual_encoder.norm.bias": (1024,), "blip.vision_proj.weight": (256, 1024),
              "blip.vision_proj.bias": (256,), "blip.text_proj.weight": (256, 768), "blip.text_proj.bias": (256,),
              "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
              "blip.text_encoder.embeddings.position_embeddings.weight": (512, 768),
              "blip.text_encoder.embeddings.LayerNorm.weight": (768,),
              "blip.text_encoder.embeddings.LayerNorm.bias": (768,),
              "blip.text_encoder.embeddings.position_ids": (1, 512)}  # fmt: skip
    for i in range(24):
        b = f"blip.visual_encoder.blocks.{i}."
        for name, (n_out, n_in) in {"attn.qkv": (3072, 1024), "attn.proj": (1024, 1024), "mlp.fc1": (4096, 1024),
                                    "mlp.fc2": (1024, 4096)}.items():  # fmt: skip
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = (n_out, n_in), (n_out,)
        for name in ("norm1", "norm2"):
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = (1024,), (1024,)
    for i in range(12):
        b = f"blip.text_encoder.encoder.layer.{i}."
        for att, kv in (("attention", 768), ("crossattention", 1024)):
            for name, n_in in (("self.query", 768), ("self.key", kv), ("self.value", kv), ("output.dense", 768)):
                shapes[f"{b}{att}.{name}.weight"], shapes[f"{b}{att}.{name}.bias"] = (768, n_in), (768,)
            shapes[f"{b}{att}.output.LayerNorm.weight"] = shapes[f"{b}{att}.output.LayerNorm.bias"] = (768,)
        shapes[b + "intermediate.dense.weight"], shapes[b + "intermediate.dense.bias"] = (3072, 768), (3072,)
        shapes[b + "output.dense.weight"], shapes[b + "output.dense.bias"] = (768, 3072), (768,)
        shapes[b + "output.LayerNorm.weight"] = shapes[b + "output.LayerNorm.bias"] = (768,)
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]):
        shapes[f"mlp.layers.{i}.weight"], shapes[f"mlp.layers.{i}.bias"] = (n_out, n_in), (n_out,)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    conv = converter_module()
    args = conv.parse_args(["imagereward", "ImageReward.pt", "--output_dir", "y"])
    med = {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 30524}
    tensors, head, config, src, filled, summary = conv.convert_imagereward_state(state, "ImageReward.pt", args, med)
    conv.check_against(BlipForImageTextRetrieval, config, tensors, "imagereward")
    v, t = config.vision_config, config.text_config
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.image_size, v.layer_norm_eps) == (
        24,
        1024,
        16,
        224,
        1e-6,
    )
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.encoder_hidden_size, t.vocab_size) == (
        12,
        768,
        12,
        1024,
        30524,
    )
    assert sorted(head) == sorted(
        [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")] + ["mean", "std"]
    )
    assert len(src.taken) + len(src.ignored) == len(state) and filled == ["itm_head.weight", "itm_head.bias"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and what is missing, no traceback
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_checkpoints_are_one_line_naming_the_file_and_the_missing_key(
    imagereward_published, clip_tokenizer_dir, tmp_path
):
    conv = converter_module()

    def error(*argv):
        with pytest.raises(InputError) as e:
            conv.main(conv.parse_args([str(a) for a in argv]))
        assert "\n" not in str(e.value)
        return str(e.value)

    ir = imagereward_published["checkpoint"]
    # from the command line: exit 2, one line, no traceback
    proc = convert("hpsv2", ir, "--output_dir", tmp_path / "x", "--tokenizer", clip_tokenizer_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: hpsv2: '{ir}' is not an open_clip CLIP state dict (HPSv2's layout): no 'visual.conv1.weight' "
        "(its keys begin blip.visual_encoder.cls_token, blip.visual_encoder.pos_embed, "
        "blip.visual_encoder.patch_embed.proj.weight, ...)"
    ]
    assert not os.path.exists(tmp_path / "x")

    hps = RefOpenClip().state_dict()
    del hps["visual.ln_post.weight"]
    torch.save({"state_dict": hps}, tmp_path / "no_ln_post.pt")
    assert f"'{tmp_path / 'no_ln_post.pt'}' is not an open_clip CLIP state dict" in error(
        "hpsv2", tmp_path / "no_ln_post.pt", "--output_dir", tmp_path / "x", "--tokenizer", clip_tokenizer_dir
    )
    assert "no 'visual.ln_post.weight'" in error("hpsv2", tmp_path / "no_ln_post.pt", "--output_dir", tmp_path / "x")
    hps["visual.ln_post.weight"] = torch.ones(RefOpenClip.V_WIDTH)
    hps["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(RefOpenClip.V_WIDTH)  # layer scale: unknown
    torch.save(hps, tmp_path / "layer_scale.pt")
    assert "has 1 tensors this converter does not know, first 'visual.transformer.resblocks.0.ls_1.gamma'" in error(
        "hpsv2", tmp_path / "layer_scale.pt", "--output_dir", tmp_path / "x", "--tokenizer", clip_tokenizer_dir,
        "--vision_heads", 3, "--text_heads", 2,
    )  # fmt: skip
    assert "imagereward: '" + str(tmp_path / "layer_scale.pt") + "' is not ImageReward's checkpoint" in error(
        "imagereward", tmp_path / "layer_scale.pt", "--output_dir", tmp_path / "x"
    )
    assert "no 'blip.visual_encoder.patch_embed.proj.weight'" in error(
        "imagereward", tmp_path / "layer_scale.pt", "--output_dir", tmp_path / "x"
    )

    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    assert f"hpsv2: could not read '{tmp_path / 'text.pt'}' as a torch state dict" in error(
        "hpsv2", tmp_path / "text.pt", "--output_dir", tmp_path / "x"
    )
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    assert f"'{tmp_path / 'list.pt'}' is not a state dict (it holds a list)" in error(
        "imagereward", tmp_path / "list.pt", "--output_dir", tmp_path / "x"
    )
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")  # an object: refused
    assert f"hpsv2: could not read '{tmp_path / 'pickled.pt'}' as a torch state dict (UnpicklingError: " in error(
        "hpsv2", tmp_path / "pickled.pt", "--output_dir", tmp_path / "x"
    )
    torch.save({"step": 3, "state_dict": {"module.x": torch.ones(1)}}, tmp_path / "short.pt")  # unwrapped, unprefixed
    assert "no 'visual.conv1.weight' (its keys begin x, ...)" in error(
        "hpsv2", tmp_path / "short.pt", "--output_dir", "x"
    )
    assert f"hpsv2: no file '{tmp_path / 'none.pt'}'" in error("hpsv2", tmp_path / "none.pt", "--output_dir", "x")
    assert "--med_config: no file '/nonexistent/med.json'" in error(
        "imagereward", ir, "--output_dir", tmp_path / "x", "--med_config", "/nonexistent/med.json"
    )
    assert "heads do not divide the vision width 48" in error(
        "imagereward", ir, "--output_dir", tmp_path / "x", "--tokenizer", imagereward_published["tokenizer"],
        "--vision_heads", 5,
    )  # fmt: skip


def test_evaluate_points_a_published_checkpoint_to_the_converter(tmp_path):
    """A .pt given to --hpsv2 or --imagereward is one line with the exact command that converts it."""
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"")
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(InputError) as e:
        ClipScorer("hpsv2", str(tmp_path / "HPS_v2.1_compressed.pt"))
    assert str(e.value) == (
        f"--hpsv2: '{tmp_path}/HPS_v2.1_compressed.pt' is a checkpoint file, not a transformers CLIPModel folder: "
        f"convert it with `python scripts/convert_scorer_weights.py hpsv2 {tmp_path}/HPS_v2.1_compressed.pt "
        f"--output_dir {tmp_path}/HPS_v2.1_compressed` and pass --hpsv2 {tmp_path}/HPS_v2.1_compressed"
    )
    with pytest.raises(InputError, match=r"--imagereward: .*ImageReward.pt' is a checkpoint file, not a transformers "
                        r"BlipForImageTextRetrieval folder: convert it with `python scripts/convert_scorer_weights.py "
                        r"imagereward .*ImageReward.pt --output_dir .*/ImageReward`"):  # fmt: skip
        ImageRewardScorer(str(tmp_path / "ImageReward.pt"))


def test_every_flag_of_the_converter_is_in_the_flags_reference():
    conv = converter_module()
    with open(os.path.join(REPO, "docs", "flags.md")) as f:  # scripts/flags_reference.py --check keeps it current
        text = f.read()
    subparsers = next(a for a in conv.make_parser()._actions if a.dest == "scorer").choices
    flags = {a.option_strings[0] for p in subparsers.values() for a in p._actions if a.option_strings}
    assert "--quick_gelu" in flags and "--med_config" in flags
    assert not [f for f in flags - {"-h"} if f"`{f}`" not in text]
    for command in ("python scripts/convert_scorer_weights.py hpsv2 HPS_v2.1_compressed.pt --output_dir ",
                    "python scripts/convert_scorer_weights.py imagereward ImageReward.pt --output_dir "):  # fmt: skip
        assert command in text
