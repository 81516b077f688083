#!/usr/bin/env python
"""Converts a published step-aware preference model (SPO, arXiv 2406.04314) into a folder that scores on its own.

    python scripts/convert_step_aware_preference_model.py sd-v1-5_step-aware_preference_model.bin \\
        --clip yuvalkirstain/PickScore_v1 --output_dir spm-sd15

The checkpoints of the Hub repository SPO-Diffusion-Models/Step-Aware_Preference_Models
(``sd-v1-5_step-aware_preference_model.bin``, ``sdxl_step-aware_preference_model.bin``) are fp32 state dicts of the
official ``StepAwarePreferenceModel`` (keys ``model.`` + PickScore's CLIPModel names, the adaLN modulations and the
timestep embedder). The file is read with ``torch.load(weights_only=True)`` (tensors only, no code runs), every tensor
is mapped to exactly one of the model's and checked against the shape the CLIP config (``--clip``: PickScore_v1's, a
Hub id or a local folder) gives it; CLIP's two position-id buffers, which the files hold, are checked and dropped.
The output folder holds ``config.json``, ``model.safetensors`` and the tokenizer (``--tokenizer``, by default
``--clip``'s; the official code took it from laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the same BPE, which
``--tokenizer`` can name): ``StepAwarePreferenceModel.from_pretrained(output_dir)`` and the tokenizer from the same
folder score.
Nothing is downloaded but ``--clip``/``--tokenizer`` when they are Hub ids.
"""

# ruff: noqa: E402 (the repository root goes on sys.path before the import of the model code)

import argparse
import os
import re
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from train_spo import StepAwarePreferenceModel


PUBLISHED_PREFIX = "model."
# CLIP's position ids: persistent buffers in the transformers (4.27.3) the SPMs were trained with, non-persistent now
PUBLISHED_POSITION_IDS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.")
_CLIP_LAYER_PARAMS = [
    f"{module}.{kind}"
    for module in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj")
    for kind in ("weight", "bias")
] + [f"{m}.{kind}" for m in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2") for kind in ("weight", "bias")]


def published_keys(num_text_layers: int, num_vision_layers: int, position_ids: bool = True) -> list:
    """The official ``StepAwarePreferenceModel``'s state-dict keys (without the ``model.`` prefix), in this module's
    order; ``position_ids`` with CLIP's two position-id buffers (which the published files hold)."""
    keys = ["logit_scale", "text_model.embeddings.token_embedding.weight"]
    keys += ["text_model.embeddings.position_embedding.weight"]
    keys += [f"text_model.encoder.layers.{i}.{p}" for i in range(num_text_layers) for p in _CLIP_LAYER_PARAMS]
    keys += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    keys += ["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight"]
    keys += ["vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight"]
    keys += ["vision_model.pre_layrnorm.bias"]
    for i in range(num_vision_layers):
        keys += [f"vision_model.encoder.layers.{i}.{p}" for p in _CLIP_LAYER_PARAMS]
        keys += [f"vision_model.encoder.layers.{i}.adaLN_modulation.1.{kind}" for kind in ("weight", "bias")]
    keys += ["vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"]
    keys += ["vision_model.adaLN_modulation.1.weight", "vision_model.adaLN_modulation.1.bias"]
    keys += ["visual_projection.weight", "text_projection.weight"]
    keys += [f"t_embedder.mlp.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")]
    if position_ids:
        keys += list(PUBLISHED_POSITION_IDS)
    return keys


def published_to_module_key(key: str) -> str:
    """A published key without its ``model.`` prefix -> this module's key."""
    match = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.adaLN_modulation\.1\.(weight|bias)$", key)
    if match:
        return f"block_modulations.{match[1]}.{match[2]}"
    match = re.match(r"^vision_model\.adaLN_modulation\.1\.(weight|bias)$", key)
    if match:
        return f"pooled_modulation.{match[1]}"
    match = re.match(r"^t_embedder\.mlp\.([02])\.(weight|bias)$", key)
    if match:
        return f"time_embedder.{match[1]}.{match[2]}"
    return "clip." + key


def module_to_published_key(key: str) -> str:
    """This module's key -> the published key (with ``model.``): the inverse of ``published_to_module_key``."""
    match = re.match(r"^block_modulations\.(\d+)\.(weight|bias)$", key)
    if match:
        return f"model.vision_model.encoder.layers.{match[1]}.adaLN_modulation.1.{match[2]}"
    match = re.match(r"^pooled_modulation\.(weight|bias)$", key)
    if match:
        return f"model.vision_model.adaLN_modulation.1.{match[1]}"
    match = re.match(r"^time_embedder\.([02])\.(weight|bias)$", key)
    if match:
        return f"model.t_embedder.mlp.{match[1]}.{match[2]}"
    if key.startswith("clip."):
        return "model." + key[len("clip.") :]
    raise ValueError(f"no published key for '{key}'")


def convert_published_state_dict(state: dict, config=None) -> dict:
    """The published SPM state dict (``model.`` + the official names, fp32) -> this module's ``state_dict()`` keys.

    Every published key must be one of the official model's (the layer counts are ``config``'s, else read from the
    keys); CLIP's two ``position_ids`` buffers may be there (the published files, saved with transformers 4.27, hold
    them, as fp32) and are dropped after checking they are ``0, 1, 2, ...``. ``ValueError`` naming the first
    unexpected or missing key."""
    stripped = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith(PUBLISHED_PREFIX):
            raise ValueError(f"published SPM state dict: unexpected key '{key}' (every key starts with 'model.')")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"published SPM state dict: '{key}' is a {type(value).__name__}, not a tensor")
        stripped[key[len(PUBLISHED_PREFIX) :]] = value
    if config is not None:
        layers = {
            "text_model": config.text_config.num_hidden_layers,
            "vision_model": config.vision_config.num_hidden_layers,
        }
    else:
        layers = {"text_model": 0, "vision_model": 0}
        for key in stripped:
            match = _LAYER.match(key)
            if match:
                layers[match[1]] = max(layers[match[1]], int(match[2]) + 1)
    expected = published_keys(layers["text_model"], layers["vision_model"], position_ids=False)
    expected_set = set(expected)
    for key, value in stripped.items():
        if key in PUBLISHED_POSITION_IDS:
            if (
                value.dim() != 2
                or value.shape[0] != 1
                or not (
                    value.is_meta
                    or torch.equal(value.to(torch.float64), torch.arange(value.shape[1], dtype=torch.float64)[None])
                )
            ):
                raise ValueError(f"published SPM state dict: 'model.{key}' is not 0, 1, 2, ...")
        elif key not in expected_set:
            raise ValueError(f"published SPM state dict: unexpected key 'model.{key}'")
    missing = [k for k in expected if k not in stripped]
    if missing:
        raise ValueError(f"published SPM state dict: missing key 'model.{missing[0]}' ({len(missing)} missing)")
    return {published_to_module_key(k): stripped[k] for k in expected}


def first_line(error: Exception, limit: int = 300) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def make_parser():
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("checkpoint", help="the published .bin (a torch state dict with 'model.' keys)")
    p.add_argument(
        "--clip",
        default="yuvalkirstain/PickScore_v1",
        help="Hub id or local folder whose config.json is the SPM's CLIPConfig (PickScore v1's)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="Hub id or local folder of the tokenizer; --clip's when not given"
    )
    p.add_argument("--output_dir", required=True, help="folder to write config.json, model.safetensors, tokenizer")
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def read_published(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"no file '{path}'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or objects that are not tensors
        raise ValueError(f"could not read '{path}' as a torch state dict ({type(e).__name__}: {first_line(e)})")
    if not isinstance(state, dict) or not state:
        raise ValueError(f"'{path}' is not a state dict (it holds a {type(state).__name__})")
    return state


def load_clip_parts(name: str, tokenizer_name: str):
    from transformers import AutoTokenizer, CLIPConfig

    where = "local folder" if os.path.isdir(name) else "Hub id (offline, or no such repository?)"
    try:
        config = CLIPConfig.from_pretrained(name)
    except Exception as e:
        raise ValueError(f"--clip: could not load a CLIPConfig from '{name}' as a {where}: {first_line(e)}") from None
    where = "local folder" if os.path.isdir(tokenizer_name) else "Hub id (offline, or no such repository?)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    except Exception as e:
        raise ValueError(f"--tokenizer: could not load '{tokenizer_name}' as a {where}: {first_line(e)}") from None
    return config, tokenizer


def main(args):
    published = read_published(args.checkpoint)
    config, tokenizer = load_clip_parts(args.clip, args.tokenizer or args.clip)
    with torch.device("meta"):
        model = StepAwarePreferenceModel(config)
    try:
        state = convert_published_state_dict(published, config=config)
    except ValueError as e:
        raise ValueError(f"'{args.checkpoint}': {first_line(e)}") from None
    # every tensor's shape against the model the CLIP config builds (named as in the published file)
    model.check_state_dict(
        state, f"'{args.checkpoint}' with the CLIP config of '{args.clip}'", module_to_published_key
    )
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model._materialize_non_persistent_buffers()
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    dropped = len(published) - len(state)
    print(
        f"wrote {args.output_dir}: {len(state)} tensors ({sum(v.numel() for v in state.values()):,} values) from "
        f"{len(published)} in '{args.checkpoint}' ({dropped} position-id buffers dropped)"
    )


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
