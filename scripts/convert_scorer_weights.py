#!/usr/bin/env python
"""Converts the published HPSv2 and ImageReward checkpoints into the folders ``evaluate.py`` reads.

    python scripts/convert_scorer_weights.py hpsv2 HPS_v2.1_compressed.pt --output_dir HPS_v2.1_compressed
    python scripts/convert_scorer_weights.py imagereward ImageReward.pt --output_dir ImageReward

then ``evaluate.py --hpsv2 HPS_v2.1_compressed --imagereward ImageReward``.

``hpsv2``: ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` (Hub repository xswu/HPSv2), an open_clip ViT-H/14
state dict (bare, or under ``"state_dict"``, keys with or without ``module.``), becomes a transformers ``CLIPModel``
with a ``CLIPProcessor``: the tokenizer given by ``--tokenizer`` and open_clip's preprocessing (shortest side resized
to the image size, bicubic, centre crop, OpenAI's mean and std).

``imagereward``: ``ImageReward.pt`` (Hub repository THUDM/ImageReward; ``med_config.json`` from the same repository is
read when it lies next to it or is given by ``--med_config``), ImageReward's BLIP (a timm-style ViT and a BERT with
cross-attention in every layer) plus its MLP, becomes a transformers ``BlipForImageTextRetrieval`` with a
``BlipProcessor`` (bert-base-uncased with BLIP's ``[DEC]`` and ``[ENC]`` added, so that the ids are ImageReward's;
ImageReward's preprocessing: resize, centre crop, OpenAI's mean and std) and ``imagereward_head.safetensors`` (the MLP's
``layers.<i>``, applied in order, and ImageReward's ``mean`` and ``std``).

Every size is read from the tensors' shapes; the attention heads cannot be, so they are the known ones for open_clip's
towers (ViT-H/14's vision tower has 16 heads of 80, every other tower heads of 64) or med_config.json's, unless
``--vision_heads``/``--text_heads`` say otherwise. The checkpoint is read with ``torch.load(weights_only=True)``
(tensors only, no code runs). Every tensor of it is used exactly once or named as ignored: ``conversion.json`` in the
output folder lists both. Nothing is downloaded but ``--tokenizer`` when it is a Hub id.
"""

import argparse
import json
import math
import os
import re
import sys
from collections import Counter


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from evaluation.scorers import IMAGEREWARD_HEAD, InputError, first_line, run_cli  # noqa: E402


OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]  # open_clip's and ImageReward's normalisation
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGEREWARD_MEAN = 0.16717362830052426  # constants of ImageReward (its reward's mean and std on its data)
IMAGEREWARD_STD = 1.0333394966054072
# open_clip's vision towers whose heads are not 64 wide: ViT-H/14 (head width 80), ViT-g/14 (88), ViT-bigG/14 (104)
OPEN_CLIP_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint: tensors only, every one accounted for
# ---------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str, what: str) -> dict:
    """The checkpoint's tensors by name: unwrapped from ``{"state_dict": ...}`` (or ``{"model": ...}``), without a
    ``module.`` prefix (DataParallel's). One-line errors naming the file."""
    if not os.path.isfile(path):
        raise InputError(f"{what}: no file '{path}'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or it holds objects that are not tensors
        raise InputError(f"{what}: could not read '{path}' as a torch state dict ({type(e).__name__}: "
                         f"{first_line(e)})") from None  # fmt: skip
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{what}: '{path}' is not a state dict (it holds a {type(obj).__name__})")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"{what}: '{path}' is not a state dict (its entry '{key}' is a {type(value).__name__})")
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state


class Source:
    """A checkpoint's tensors, handed out once each: what was taken, ignored or left over is known at the end."""

    def __init__(self, state: dict, path: str, what: str, layout: str):
        self.state, self.path, self.what, self.layout = state, path, what, layout
        self.taken = Counter()
        self.ignored = []

    def require(self, keys):
        """The first of ``keys`` (in order) the checkpoint lacks is the error: a file of another layout."""
        for key in keys:
            if key not in self.state:
                first = ", ".join(list(self.state)[:3])
                raise InputError(f"{self.what}: '{self.path}' is not {self.layout}: no '{key}' (its keys begin "
                                 f"{first}, ...)")  # fmt: skip

    def has(self, key: str) -> bool:
        return key in self.state

    def shape(self, key: str):
        self.require([key])
        return tuple(self.state[key].shape)

    def take(self, key: str) -> torch.Tensor:
        self.require([key])
        self.taken[key] += 1
        return self.state[key]

    def ignore(self, key: str):
        self.ignored.append(key)

    def count(self, pattern: str) -> int:
        """Number of layers: the indices i of keys matching ``pattern`` (a regex with one group), checked to be
        0..n-1."""
        indices = sorted({int(m.group(1)) for k in self.state for m in [re.fullmatch(pattern, k)] if m})
        if indices != list(range(len(indices))) or not indices:
            raise InputError(f"{self.what}: '{self.path}': layers {indices[:8]} of '{pattern}' are not 0..n-1")
        return len(indices)

    def check_all_used(self, known_prefixes=("",)):
        """Every tensor taken exactly once or ignored; a tensor under ``known_prefixes`` that was neither is a part
        this converter does not know (it would change the computation), so it is an error."""
        twice = [k for k, n in self.taken.items() if n > 1]
        assert not twice, f"converter bug: {twice[:3]} used twice"
        left = [k for k in self.state if k not in self.taken and k not in self.ignored]
        unknown = [k for k in left if k.startswith(known_prefixes)]
        if unknown:
            raise InputError(f"{self.what}: '{self.path}' has {len(unknown)} tensors this converter does not know, "
                             f"first '{unknown[0]}': not {self.layout} as published")  # fmt: skip
        for key in left:  # outside the parts the score uses
            self.ignore(key)


def heads_for(width: int, flag, default: int, what: str, tower: str) -> int:
    heads = flag or default
    if heads < 1 or width % heads:
        raise InputError(f"{what}: {heads} heads do not divide the {tower} width {width}: give --{tower}_heads")
    return heads


def check_against(model_cls, config, tensors: dict, what: str):
    """The tensors are exactly the model's state dict, name and shape (the model built on the meta device: no
    memory, no initialisation)."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:  # a converter bug or a layout variant it does not know
        raise InputError(f"{what}: the converted tensors do not fit {model_cls.__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {[(k, tuple(tensors[k].shape), expected[k]) for k in wrong[:3]]}")  # fmt: skip


def save_folder(output_dir: str, config, tensors: dict, dtype, processor, report: dict):
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(output_dir)
    tensors = {k: v.to(dtype).contiguous().clone() for k, v in tensors.items()}  # no shared storage
    save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "conversion.json"), "w") as f:
        json.dump(report, f, indent=1)


def load_tokenizer(name: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        where = "local folder" if os.path.isdir(name) else "Hub id (offline, or no such repository?)"
        raise InputError(f"{what} --tokenizer: could not load '{name}' as a {where}: {first_line(e)}") from None


def image_processor(image_size: int):
    """open_clip's (and ImageReward's) evaluation transform: shortest side to the image size (bicubic), centre crop,
    OpenAI's mean and std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=OPENAI_MEAN, image_std=OPENAI_STD, do_convert_rgb=True,
    )  # fmt: skip


def grid_of(num_positions: int, what: str) -> int:
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1:
        raise InputError(f"{what}: {num_positions} vision positions are not a class token plus a square grid")
    return grid


# ---------------------------------------------------------------------------------------------------------------
# HPSv2: open_clip's CLIP (OpenAI's layout) -> transformers' CLIPModel
# ---------------------------------------------------------------------------------------------------------------

OPEN_CLIP_KEYS = [
    "visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
    "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.ln_post.weight", "visual.proj",
    "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.attn.in_proj_weight",
    "ln_final.weight", "text_projection", "logit_scale",
]  # fmt: skip
# (open_clip residual block, transformers CLIPEncoderLayer), parameters that only change name
RESBLOCK_RENAMES = [
    ("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
]  # fmt: skip


def map_resblocks(src: Source, src_prefix: str, dst_prefix: str, layers: int, width: int, out: dict):
    for i in range(layers):
        s, d = f"{src_prefix}.resblocks.{i}.", f"{dst_prefix}.layers.{i}."
        for old, new in RESBLOCK_RENAMES:
            for p in ("weight", "bias"):
                out[f"{d}{new}.{p}"] = src.take(f"{s}{old}.{p}")
        # nn.MultiheadAttention's packed projection: rows [q; k; v], each width rows
        weight, bias = src.take(f"{s}attn.in_proj_weight"), src.take(f"{s}attn.in_proj_bias")
        if weight.shape != (3 * width, width):
            raise InputError(
                f"{src.what}: '{s}attn.in_proj_weight' is {tuple(weight.shape)}, not (3 x {width}, {width})"
            )
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{d}self_attn.{name}.weight"] = weight[j * width : (j + 1) * width]
            out[f"{d}self_attn.{name}.bias"] = bias[j * width : (j + 1) * width]


def convert_hpsv2_state(state: dict, path: str, args, tokenizer=None):
    """(tensors in CLIPModel's names, CLIPConfig, summary) from an open_clip CLIP state dict."""
    from transformers import CLIPConfig

    what = "hpsv2"
    src = Source(state, path, what, "an open_clip CLIP state dict (HPSv2's layout)")
    src.require(OPEN_CLIP_KEYS)
    width, channels, patch, _ = src.shape("visual.conv1.weight")
    grid = grid_of(src.shape("visual.positional_embedding")[0], what)
    v_layers = src.count(r"visual\.transformer\.resblocks\.(\d+)\.ln_1\.weight")
    v_mlp = src.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
    embed = src.shape("visual.proj")[1]
    vocab, t_width = src.shape("token_embedding.weight")
    context = src.shape("positional_embedding")[0]
    t_layers = src.count(r"transformer\.resblocks\.(\d+)\.ln_1\.weight")
    t_mlp = src.shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
    if src.shape("text_projection") != (t_width, embed):
        raise InputError(f"{what}: 'text_projection' is {src.shape('text_projection')}, not ({t_width}, {embed})")
    v_heads = heads_for(width, args.vision_heads, OPEN_CLIP_VISION_HEADS.get(width, width // 64), what, "vision")
    t_heads = heads_for(t_width, args.text_heads, t_width // 64, what, "text")
    act = "quick_gelu" if args.quick_gelu else "gelu"
    if "attn_mask" in state:  # the text tower's causal mask, a buffer in older open_clip: rebuilt by transformers
        src.ignore("attn_mask")

    out = {}
    v, t = "vision_model", "text_model"
    out[f"{v}.embeddings.patch_embedding.weight"] = src.take("visual.conv1.weight")
    out[f"{v}.embeddings.class_embedding"] = src.take("visual.class_embedding").reshape(width)
    out[f"{v}.embeddings.position_embedding.weight"] = src.take("visual.positional_embedding")
    for p in ("weight", "bias"):
        out[f"{v}.pre_layrnorm.{p}"] = src.take(f"visual.ln_pre.{p}")  # sic: transformers' name
        out[f"{v}.post_layernorm.{p}"] = src.take(f"visual.ln_post.{p}")
        out[f"{t}.final_layer_norm.{p}"] = src.take(f"ln_final.{p}")
    map_resblocks(src, "visual.transformer", f"{v}.encoder", v_layers, width, out)
    out["visual_projection.weight"] = src.take("visual.proj").t()  # open_clip: x @ proj; Linear: x @ W.T
    out[f"{t}.embeddings.token_embedding.weight"] = src.take("token_embedding.weight")
    out[f"{t}.embeddings.position_embedding.weight"] = src.take("positional_embedding")
    map_resblocks(src, "transformer", f"{t}.encoder", t_layers, t_width, out)
    out["text_projection.weight"] = src.take("text_projection").t()
    out["logit_scale"] = src.take("logit_scale").reshape(())
    src.check_all_used()

    scale = float(out["logit_scale"]) if out["logit_scale"].device.type != "meta" else 2.6592  # (meta: the tests)
    # open_clip pools the text at the end-of-text token (the largest id); transformers at the first eos_token_id
    ids = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}  # CLIP's BPE vocabulary
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    common = {"hidden_act": act, "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "projection_dim": embed}
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=t_width, intermediate_size=t_mlp, num_hidden_layers=t_layers,
                         num_attention_heads=t_heads, max_position_embeddings=context, **ids, **common),
        vision_config=dict(hidden_size=width, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                           num_attention_heads=v_heads, image_size=grid * patch, patch_size=patch,
                           num_channels=channels, **common),
        projection_dim=embed, logit_scale_init_value=scale,
    )  # fmt: skip
    summary = (f"vision: {v_layers} layers, width {width}, {v_heads} heads, patch {patch}, {grid * patch} px; "
               f"text: {t_layers} layers, width {t_width}, {t_heads} heads, {context} tokens, vocabulary {vocab}; "
               f"embedding {embed}; {act}")  # fmt: skip
    return out, config, src, summary


def convert_hpsv2(args):
    from transformers import CLIPModel, CLIPProcessor

    state = read_state_dict(args.checkpoint, "hpsv2")
    Source(state, args.checkpoint, "hpsv2", "an open_clip CLIP state dict (HPSv2's layout)").require(OPEN_CLIP_KEYS)
    tokenizer = load_tokenizer(args.tokenizer, "hpsv2")
    tensors, config, src, summary = convert_hpsv2_state(state, args.checkpoint, args, tokenizer)
    vocab, context = config.text_config.vocab_size, config.text_config.max_position_embeddings
    if len(tokenizer) > vocab or tokenizer.eos_token_id is None:
        raise InputError(f"hpsv2 --tokenizer: '{args.tokenizer}' has {len(tokenizer)} tokens (eos "
                         f"{tokenizer.eos_token_id}); the checkpoint's vocabulary is {vocab}: not CLIP's tokenizer?")  # fmt: skip
    tokenizer.model_max_length = context  # open_clip's context length: longer prompts are cut, eos kept last
    check_against(CLIPModel, config, tensors, "hpsv2")
    processor = CLIPProcessor(image_processor=image_processor(config.vision_config.image_size), tokenizer=tokenizer)
    report = {"source": os.path.abspath(args.checkpoint), "layout": "open_clip CLIP -> transformers CLIPModel",
              "summary": summary, "tokenizer": args.tokenizer, "used": sorted(src.taken), "ignored": src.ignored}  # fmt: skip
    save_folder(args.output_dir, config, tensors, DTYPES[args.dtype], processor, report)
    print(f"hpsv2: {summary}")
    print(
        f"hpsv2: {len(src.taken)} tensors used once each, {len(src.ignored)} ignored ({', '.join(src.ignored) or '-'})"
    )
    print(f"wrote {args.output_dir}: evaluate.py --hpsv2 {args.output_dir}")


# ---------------------------------------------------------------------------------------------------------------
# ImageReward: BLIP's ViT and BERT (ImageReward's BLIP_Pretrain) + MLP -> BlipForImageTextRetrieval + head
# ---------------------------------------------------------------------------------------------------------------

VIT, BERT = "blip.visual_encoder", "blip.text_encoder"
IMAGEREWARD_KEYS = [
    f"{VIT}.patch_embed.proj.weight", f"{VIT}.cls_token", f"{VIT}.pos_embed", f"{VIT}.blocks.0.attn.qkv.weight",
    f"{VIT}.norm.weight", f"{BERT}.embeddings.word_embeddings.weight", f"{BERT}.embeddings.position_embeddings.weight",
    f"{BERT}.encoder.layer.0.attention.self.query.weight", f"{BERT}.encoder.layer.0.crossattention.self.key.weight",
    "mlp.layers.0.weight",
]  # fmt: skip
# (timm/BLIP ViT block, transformers BlipEncoderLayer)
VIT_BLOCK_RENAMES = [
    ("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
    ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
]  # fmt: skip
# BLIP's BERT layer (med.py) and transformers' BlipTextLayer use the same names
BERT_LAYER_PARTS = [
    f"{a}.{b}" for a in ("attention", "crossattention")
    for b in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
] + ["intermediate.dense", "output.dense", "output.LayerNorm"]  # fmt: skip


def read_med_config(args, what: str) -> dict:
    path = args.med_config or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "med_config.json")
    if not os.path.isfile(path):
        if args.med_config:
            raise InputError(f"{what} --med_config: no file '{path}'")
        return {}
    try:
        with open(path) as f:
            med = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{what} --med_config: could not read '{path}' as JSON: {first_line(e)}") from None
    return med if isinstance(med, dict) else {}


def convert_imagereward_state(state: dict, path: str, args, med: dict, tokenizer=None):
    """(tensors in BlipForImageTextRetrieval's names, the head's tensors, BlipConfig, source, summary)."""
    from transformers import BlipConfig

    what = "imagereward"
    src = Source(state, path, what, "ImageReward's checkpoint (BLIP ViT + BERT + mlp)")
    src.require(IMAGEREWARD_KEYS)
    width, _, patch, _ = src.shape(f"{VIT}.patch_embed.proj.weight")
    grid = grid_of(src.shape(f"{VIT}.pos_embed")[1], what)
    v_layers = src.count(rf"{re.escape(VIT)}\.blocks\.(\d+)\.norm1\.weight")
    v_mlp = src.shape(f"{VIT}.blocks.0.mlp.fc1.weight")[0]
    vocab, hidden = src.shape(f"{BERT}.embeddings.word_embeddings.weight")
    positions = src.shape(f"{BERT}.embeddings.position_embeddings.weight")[0]
    t_layers = src.count(rf"{re.escape(BERT)}\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight")
    t_mlp = src.shape(f"{BERT}.encoder.layer.0.intermediate.dense.weight")[0]
    encoder_width = src.shape(f"{BERT}.encoder.layer.0.crossattention.self.key.weight")[1]
    if encoder_width != width:
        raise InputError(f"{what}: the text encoder attends to width {encoder_width}, the ViT's is {width}")
    for field, value in (("hidden_size", hidden), ("num_hidden_layers", t_layers), ("vocab_size", vocab)):
        if field in med and med[field] != value:
            raise InputError(f"{what}: med_config.json says {field} {med[field]}, the checkpoint's is {value}")
    v_heads = heads_for(width, args.vision_heads, width // 64, what, "vision")
    t_heads = heads_for(hidden, args.text_heads, med.get("num_attention_heads", hidden // 64), what, "text")
    t_eps, t_act = float(med.get("layer_norm_eps", 1e-12)), med.get("hidden_act", "gelu")

    out, head = {}, {}
    e = "vision_model.embeddings"
    out[f"{e}.patch_embedding.weight"] = src.take(f"{VIT}.patch_embed.proj.weight")
    out[f"{e}.patch_embedding.bias"] = src.take(f"{VIT}.patch_embed.proj.bias")
    out[f"{e}.class_embedding"] = src.take(f"{VIT}.cls_token").reshape(1, 1, width)
    out[f"{e}.position_embedding"] = src.take(f"{VIT}.pos_embed")
    for i in range(v_layers):
        for old, new in VIT_BLOCK_RENAMES:  # qkv stays packed: both split it as [q; k; v], heads inside each
            for p in ("weight", "bias"):
                out[f"vision_model.encoder.layers.{i}.{new}.{p}"] = src.take(f"{VIT}.blocks.{i}.{old}.{p}")
    for p in ("weight", "bias"):
        out[f"vision_model.post_layernorm.{p}"] = src.take(f"{VIT}.norm.{p}")  # BLIP's final norm
        out[f"text_encoder.embeddings.LayerNorm.{p}"] = src.take(f"{BERT}.embeddings.LayerNorm.{p}")
    out["text_encoder.embeddings.word_embeddings.weight"] = src.take(f"{BERT}.embeddings.word_embeddings.weight")
    out["text_encoder.embeddings.position_embeddings.weight"] = src.take(
        f"{BERT}.embeddings.position_embeddings.weight"
    )
    if src.has(f"{BERT}.embeddings.position_ids"):  # a buffer (0, 1, 2, ...): transformers builds its own
        src.ignore(f"{BERT}.embeddings.position_ids")
    for i in range(t_layers):
        for part in BERT_LAYER_PARTS:
            for p in ("weight", "bias"):
                out[f"text_encoder.encoder.layer.{i}.{part}.{p}"] = src.take(f"{BERT}.encoder.layer.{i}.{part}.{p}")
    # the projections and the matching head are not used by ImageReward's score; BlipForImageTextRetrieval has
    # them: taken when the checkpoint has them (ImageReward's has vision_proj and text_proj), else zeros
    filled = []
    proj = src.shape("blip.vision_proj.weight")[0] if src.has("blip.vision_proj.weight") else 256
    for name, shape in (("vision_proj", (proj, width)), ("text_proj", (proj, hidden)), ("itm_head", (2, hidden))):
        for p, s in (("weight", shape), ("bias", shape[:1])):
            if src.has(f"blip.{name}.{p}"):
                out[f"{name}.{p}"] = src.take(f"blip.{name}.{p}")
            else:
                out[f"{name}.{p}"] = torch.zeros(s)
                filled.append(f"{name}.{p}")
    layers = sorted(int(m.group(1)) for k in state for m in [re.fullmatch(r"mlp\.layers\.(\d+)\.weight", k)] if m)
    for i in layers:  # kept as numbered: scorers.LinearHead applies them in order of i (0, 2, 4, 6, 7)
        for p in ("weight", "bias"):
            head[f"layers.{i}.{p}"] = src.take(f"mlp.layers.{i}.{p}")
    for a, b in zip(layers, layers[1:]):
        if head[f"layers.{b}.weight"].shape[1] != head[f"layers.{a}.weight"].shape[0]:
            raise InputError(f"{what}: mlp.layers.{a} and mlp.layers.{b} do not chain")
    if head[f"layers.{layers[0]}.weight"].shape[1] != hidden or head[f"layers.{layers[-1]}.weight"].shape[0] != 1:
        raise InputError(f"{what}: the mlp does not map the text width {hidden} to one number")
    head["mean"] = torch.tensor(args.mean, dtype=torch.float64)
    head["std"] = torch.tensor(args.std, dtype=torch.float64)
    # the score uses the ViT, the BERT and the mlp: what else the file holds (momentum encoders, a decoder) is
    # ignored; an unknown tensor inside those three is an error
    src.check_all_used(known_prefixes=(VIT + ".", BERT + ".", "mlp."))

    ids = {"pad_token_id": 0, "bos_token_id": 30522, "sep_token_id": 102, "eos_token_id": 102}  # BLIP's BERT
    if tokenizer is not None:
        sep = tokenizer.sep_token_id
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
               "sep_token_id": sep, "eos_token_id": sep}  # fmt: skip
    # BLIP's ViT: LayerNorm eps 1e-6, exact GELU; is_decoder=True: transformers' BLIP text layers then have the
    # cross-attention (encoding stays bidirectional: BlipTextModel's is_decoder argument defaults to False)
    config = BlipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=t_mlp, num_hidden_layers=t_layers,
                         num_attention_heads=t_heads, max_position_embeddings=positions, encoder_hidden_size=width,
                         layer_norm_eps=t_eps, hidden_act=t_act, is_decoder=True, attention_probs_dropout_prob=0.0,
                         hidden_dropout_prob=0.0, **ids),
        vision_config={"hidden_size": width, "intermediate_size": v_mlp, "num_hidden_layers": v_layers,
                       "num_attention_heads": v_heads, "image_size": grid * patch, "patch_size": patch,
                       "layer_norm_eps": 1e-6, "hidden_act": "gelu", "attention_dropout": 0.0},
        projection_dim=proj, image_text_hidden_size=proj,
    )  # fmt: skip
    summary = (f"vision: {v_layers} layers, width {width}, {v_heads} heads, patch {patch}, {grid * patch} px; "
               f"text: {t_layers} layers, width {hidden}, {t_heads} heads, vocabulary {vocab}; "
               f"head: layers {layers}")  # fmt: skip
    return out, head, config, src, filled, summary


def blip_tokenizer(name: str, vocab: int):
    """bert-base-uncased as BLIP's init_tokenizer makes it: ``[DEC]`` as bos and ``[ENC]`` added (ids 30522 and
    30523), so that len(tokenizer) is the text encoder's vocabulary."""
    tokenizer = load_tokenizer(name, "imagereward")
    if "[CLS]" not in tokenizer.get_vocab():
        raise InputError(f"imagereward --tokenizer: '{name}' is not a BERT word-piece tokenizer (no [CLS])")
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab:
        raise InputError(f"imagereward --tokenizer: '{name}' with [DEC] and [ENC] has {len(tokenizer)} tokens, the "
                         f"checkpoint's text encoder {vocab}: not bert-base-uncased?")  # fmt: skip
    return tokenizer


def convert_imagereward(args):
    from safetensors.torch import save_file
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    state = read_state_dict(args.checkpoint, "imagereward")
    Source(state, args.checkpoint, "imagereward", "ImageReward's checkpoint (BLIP ViT + BERT + mlp)").require(
        IMAGEREWARD_KEYS
    )
    med = read_med_config(args, "imagereward")
    tokenizer = blip_tokenizer(args.tokenizer, state[f"{BERT}.embeddings.word_embeddings.weight"].shape[0])
    tensors, head, config, src, filled, summary = convert_imagereward_state(
        state, args.checkpoint, args, med, tokenizer
    )
    check_against(BlipForImageTextRetrieval, config, tensors, "imagereward")
    processor = BlipProcessor(image_processor=image_processor(config.vision_config.image_size), tokenizer=tokenizer)
    report = {"source": os.path.abspath(args.checkpoint), "summary": summary, "tokenizer": args.tokenizer,
              "layout": "ImageReward (BLIP_Pretrain + MLP) -> transformers BlipForImageTextRetrieval + head",
              "med_config": med, "used": sorted(src.taken), "ignored": src.ignored, "zero_filled": filled}  # fmt: skip
    save_folder(args.output_dir, config, tensors, DTYPES[args.dtype], processor, report)
    save_file({k: v.contiguous() for k, v in head.items()}, os.path.join(args.output_dir, IMAGEREWARD_HEAD))
    print(f"imagereward: {summary}")
    ignored = ", ".join(src.ignored[:4]) + (", ..." if len(src.ignored) > 4 else "") or "-"
    print(f"imagereward: {len(src.taken)} tensors used once each, {len(src.ignored)} ignored ({ignored}); "
          f"zero-filled (unused by the score): {', '.join(filled) or '-'}")  # fmt: skip
    print(f"wrote {args.output_dir}: evaluate.py --imagereward {args.output_dir}")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def make_parser():
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = p.add_subparsers(dest="scorer", required=True)
    hps = sub.add_parser("hpsv2", help="HPS_v2(.1)_compressed.pt -> a CLIPModel folder",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ir = sub.add_parser("imagereward", help="ImageReward.pt -> a BlipForImageTextRetrieval folder + head",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    for s, name, tokenizer in (
        (hps, "hpsv2", "openai/clip-vit-large-patch14"),
        (ir, "imagereward", "bert-base-uncased"),
    ):
        s.add_argument("checkpoint", help="The published checkpoint (.pt), read with torch.load(weights_only=True).")
        s.add_argument("--output_dir", required=True, help=f"The folder to write (evaluate.py's --{name}).")
        s.add_argument("--tokenizer", default=tokenizer, help="Its tokenizer: a local folder or a Hub id.")
        s.add_argument("--vision_heads", type=int, default=None, help="Attention heads of the vision tower; unset: "
                       + ("16 for widths 1280/1408/1664 (ViT-H/g/bigG), else width / 64." if s is hps else "width / 64."))  # fmt: skip
        s.add_argument("--text_heads", type=int, default=None, help="Attention heads of the text tower; unset: "
                       + ("width / 64." if s is hps else "med_config.json's, else width / 64."))  # fmt: skip
        s.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="Of the written weights.")
    hps.add_argument("--quick_gelu", action="store_true", help="QuickGELU (OpenAI's CLIPs); ViT-H/14 uses GELU.")
    ir.add_argument(
        "--med_config",
        default=None,
        help="ImageReward's med_config.json; unset: the one next to the checkpoint, if there.",
    )
    ir.add_argument("--mean", type=float, default=IMAGEREWARD_MEAN, help="ImageReward's reward mean.")
    ir.add_argument("--std", type=float, default=IMAGEREWARD_STD, help="ImageReward's reward std.")
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def main(args):
    with torch.no_grad():
        (convert_hpsv2 if args.scorer == "hpsv2" else convert_imagereward)(args)


if __name__ == "__main__":
    run_cli(main, parse_args)
