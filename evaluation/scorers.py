"""Image-text scorers for ``evaluate.py``: each is a callable ``(images, prompts) -> list of floats`` (higher is
better), built from weights at hand (a Hub id or a local path), safetensors only.

| name | model | score |
|---|---|---|
| ``pickscore`` | PickScore (Kirstain et al. 2023, arXiv 2305.01569): a CLIP fine-tuned on Pick-a-Pic | ``exp(logit_scale) * cos(image, text)`` |
| ``hpsv2`` | HPSv2 (Wu et al. 2023, arXiv 2306.09341): a CLIP ViT-H/14 fine-tuned on HPD v2, in transformers' CLIP layout (``python scripts/convert_scorer_weights.py hpsv2 HPS_v2.1_compressed.pt --output_dir HPS_v2.1_compressed``) | ``cos(image, text)`` |
| ``clip_score`` | any CLIP (Hessel et al. 2021, arXiv 2104.08718) | ``100 * max(cos(image, text), 0)`` |
| ``aesthetic`` | the LAION aesthetic predictor v2: a linear head on CLIP ViT-L/14's normalised image embedding | the head's output |
| ``imagereward`` | ImageReward (Xu et al. 2023, arXiv 2304.05977): BLIP's image-grounded text encoder, a linear head on its [CLS], normalised by the reward's mean and std (``python scripts/convert_scorer_weights.py imagereward ImageReward.pt --output_dir ImageReward``) | ``(head(cls) - mean) / std`` |
| ``shapes`` | the shapes world's pixel scorer (``shapes/scorer.py``) | the fraction of the prompt's atoms that hold |

Each score's range, ``SCORE_RANGES``, bounds the intervals of its means: HPSv2 (a cosine) is in [-1, 1], CLIP score
in [0, 100], the shapes score in [0, 1]; PickScore (a cosine times the checkpoint's own ``exp(logit_scale)``) and
the linear heads' outputs are left unbounded.

The linear heads (aesthetic, ImageReward) are ``layers.<i>.weight/bias`` of ``torch.nn.Linear`` layers applied in
order with no activation between them, as both projects define them (their ReLUs are commented out; dropout is off
at evaluation). A head file is safetensors, or a ``.pth`` state dict read with ``torch.load(weights_only=True)``.

HPSv2 and ImageReward are published in their own code's layouts (an open_clip state dict; ImageReward's BLIP and
MLP): ``scripts/convert_scorer_weights.py`` writes the folders read here, and ``--hpsv2``/``--imagereward`` given
the ``.pt`` itself answer with the command that converts it. ImageReward's prompt is its BERT tokenizer's ids as
they come, ``[CLS]`` first, padded to 35: its ``score()`` does not swap in ``[ENC]`` as BLIP's image-text matching
does, so neither does this scorer.
"""

import os
import re
import shlex
import sys
from typing import Callable, Dict, List, Sequence

import torch
from PIL import Image


IMAGEREWARD_HEAD = "imagereward_head.safetensors"  # layers.<i>.weight/bias, mean, std
IMAGEREWARD_MAX_LENGTH = 35  # ImageReward's prompt length
CONVERTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                         "convert_scorer_weights.py")  # fmt: skip
SCORE_RANGES = {"pickscore": None, "hpsv2": (-1.0, 1.0), "clip_score": (0.0, 100.0), "aesthetic": None,
                "imagereward": None, "shapes": (0.0, 1.0)}  # fmt: skip
PUBLISHED = {"hpsv2": "HPS_v2.1_compressed.pt (xswu/HPSv2)", "imagereward": "ImageReward.pt (THUDM/ImageReward)"}


class InputError(ValueError):
    """Bad input to an evaluation script (a model, scorer, adapter or file that is missing or cannot be read); the
    message is one line naming it."""


def first_line(error: Exception, limit: int = 200) -> str:
    """An exception's message cut to its first line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def run_cli(main, parse_args):
    """Runs a script's main; bad input ends in one line naming the problem (exit 2), not a traceback."""
    try:
        main(parse_args())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def conversion_command(kind: str, checkpoint: str):
    """The command that converts a published checkpoint into the folder ``--<kind>`` reads, and that folder (the
    checkpoint's path without its extension)."""
    output_dir = os.path.splitext(checkpoint)[0]
    script = os.path.relpath(CONVERTER)
    script = CONVERTER if script.startswith("..") else script
    command = " ".join(shlex.quote(a) for a in ("python", script, kind, checkpoint, "--output_dir", output_dir))
    return command, output_dir


def refuse_checkpoint_file(kind: str, path: str, layout: str):
    """``--hpsv2`` and ``--imagereward`` read a converted folder: a file (the published ``.pt``) is one line with the
    command that converts it."""
    if os.path.isfile(path):
        command, output_dir = conversion_command(kind, path)
        raise InputError(f"--{kind}: '{path}' is a checkpoint file, not a transformers {layout} folder: convert it "
                         f"with `{command}` and pass --{kind} {shlex.quote(output_dir)}")  # fmt: skip


def conversion_hint(kind: str) -> str:
    script = os.path.relpath(CONVERTER)
    return (f" (the published {PUBLISHED[kind]} must be converted first: python "
            f"{CONVERTER if script.startswith('..') else script} {kind} --help)")  # fmt: skip


def load_model(cls, name_or_path: str, what: str, hint: str = ""):
    """``cls.from_pretrained`` (safetensors only) with a one-line error naming the flag and the model (and ``hint``)."""
    kwargs = {"use_safetensors": True} if issubclass(cls, torch.nn.Module) else {}
    if not os.path.isdir(name_or_path) and (os.path.isabs(name_or_path) or name_or_path.startswith(".")):
        raise InputError(f"{what}: no folder '{name_or_path}'{hint}")
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except Exception as e:  # missing, offline, another architecture's weights: all one line naming the model
        where = "local folder" if os.path.isdir(name_or_path) else "Hub id (offline, or no such repository?)"
        raise InputError(f"{what}: could not load '{name_or_path}' as a {where}: {first_line(e)}{hint}") from None


def load_head(path: str, what: str, hint: str = "") -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise InputError(f"{what}: no file '{path}'{hint}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{what}: could not read '{path}' ({type(e).__name__}: {first_line(e)})") from None


class LinearHead(torch.nn.Module):
    """``layers.<i>`` Linear layers applied in order of i, no activation (LAION's and ImageReward's MLP)."""

    def __init__(self, state: Dict[str, torch.Tensor], prefix: str = ""):
        super().__init__()
        indices = sorted(
            {int(m.group(1)) for k in state for m in [re.match(rf"{re.escape(prefix)}layers\.(\d+)\.weight$", k)] if m}
        )
        if not indices:
            raise ValueError(f"no '{prefix}layers.<i>.weight' in the head's keys ({', '.join(list(state)[:4])}, ...)")
        self.layers = torch.nn.ModuleList()
        for i in indices:
            weight = state[f"{prefix}layers.{i}.weight"].float()
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": state[f"{prefix}layers.{i}.bias"].float()})
            self.layers.append(layer)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class ClipScorer:
    """PickScore, HPSv2 and CLIP score: one CLIP, three scales of the image-text cosine."""

    def __init__(self, kind: str, model: str, processor: str = None, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.kind, self.device = kind, device
        hint = ""
        if kind == "hpsv2":  # a converted folder: the published .pt is refused with the command that converts it
            refuse_checkpoint_file(kind, model, "CLIPModel")
            hint = conversion_hint(kind)
        self.model = load_model(CLIPModel, model, f"--{kind}", hint).to(device).eval()
        self.processor = load_model(CLIPProcessor, processor or model, f"--{kind} (processor)")

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> List[float]:
        inputs = self.processor(
            text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        out = self.model(**inputs)
        cos = (out.image_embeds * out.text_embeds).sum(-1)  # both unit vectors
        if self.kind == "pickscore":
            cos = self.model.logit_scale.exp() * cos
        elif self.kind == "clip_score":
            cos = 100 * cos.clamp(min=0)
        return cos.float().cpu().tolist()


class AestheticScorer:
    def __init__(self, clip: str, head: str, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.device = device
        self.model = load_model(CLIPModel, clip, "--aesthetic_clip").to(device).eval()
        self.processor = load_model(CLIPProcessor, clip, "--aesthetic_clip (processor)")
        try:
            self.head = LinearHead(load_head(head, "--aesthetic_head")).to(device).eval()
        except ValueError as e:
            raise InputError(f"--aesthetic_head '{head}': {e}") from None

    @torch.no_grad()
    def __call__(self, images, prompts) -> List[float]:
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values.to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return self.head(features).squeeze(-1).cpu().tolist()


class ImageRewardScorer:
    """ImageReward's computation on transformers' BLIP: a folder with a ``BlipForImageTextRetrieval``, its
    ``BlipProcessor`` and ``imagereward_head.safetensors``."""

    def __init__(self, folder: str, device="cpu"):
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.device = device
        refuse_checkpoint_file("imagereward", folder, "BlipForImageTextRetrieval")
        hint = conversion_hint("imagereward")
        self.model = load_model(BlipForImageTextRetrieval, folder, "--imagereward", hint).to(device).eval()
        self.processor = load_model(BlipProcessor, folder, "--imagereward (processor)", hint)
        state = load_head(os.path.join(folder, IMAGEREWARD_HEAD), "--imagereward", hint)
        try:
            self.head = LinearHead(state).to(device).eval()
            self.mean, self.std = float(state["mean"]), float(state["std"])
        except (ValueError, KeyError) as e:
            raise InputError(f"--imagereward '{folder}': {IMAGEREWARD_HEAD}: {e}") from None

    @torch.no_grad()
    def __call__(self, images, prompts) -> List[float]:
        inputs = self.processor(
            images=list(images),
            text=list(prompts),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=IMAGEREWARD_MAX_LENGTH,
        ).to(self.device)
        image_embeds = self.model.vision_model(pixel_values=inputs.pixel_values)[0]
        text = self.model.text_encoder(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
        )[0]
        reward = self.head(text[:, 0].float()).squeeze(-1)
        return ((reward - self.mean) / self.std).cpu().tolist()


def shapes_scorer(prompts: Sequence[str]) -> Callable:
    from shapes import scorer, world

    for i, prompt in enumerate(prompts):
        try:
            world.parse_prompt(prompt)
        except ValueError:
            raise InputError(f"--shapes_score: prompt {i + 1} '{prompt}' is not a shapes-world prompt") from None
    return lambda images, prompts: [scorer.score(im, p).score for im, p in zip(images, prompts)]
