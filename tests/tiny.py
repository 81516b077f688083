"""Tiny Stable Diffusion stand-ins built in code: the tests' models, and the cost benchmark's with ``--tiny``.

Real checkpoints cannot be downloaded here, so the same loading code (``from_pretrained`` on a folder) is
exercised on a randomly initialised model with the real architecture, saved like a real one.
"""

import io
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def char_tokenizer(max_length: int = 16):
    """A CLIP tokenizer with a character-level vocabulary, so that no vocabulary file has to be shipped."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_vae(sample_size: int, **extra):
    """A two-level AutoencoderKL: images twice the latents' size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
        **extra,
    )


def tiny_sd_pipeline(seed: int = 0, block_out_channels: Sequence[int] = (32, 64), sample_size: int = 8):
    """A ~1 M parameter StableDiffusionPipeline. Its VAE has two levels, so images are twice the latent size:
    32x32 images give 4x16x16 latents (the UNet is convolutional: ``sample_size`` is only the default)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    unet = UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = tiny_vae(sample_size)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(path: str, seed: int = 0, **kwargs) -> str:
    tiny_sd_pipeline(seed, **kwargs).save_pretrained(path, safe_serialization=True)
    return path


def _random_image(rng: np.random.Generator, size: int) -> Image.Image:
    # a coloured blob on white: cheap, varied, and compressible as JPEG
    canvas = np.full((size, size, 3), 255, np.uint8)
    color = rng.integers(0, 256, 3)
    x0, y0 = rng.integers(0, size // 2, 2)
    w, h = rng.integers(size // 4, size // 2, 2)
    canvas[y0 : y0 + h, x0 : x0 + w] = color
    return Image.fromarray(canvas)


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def tiny_pairs(num_rows: int = 8, size: int = 32, seed: int = 0, tie_every: int = 0) -> dict:
    """Rows in the Pick-a-Pic v2 schema (``jpg_0``, ``jpg_1`` as JPEG bytes, ``label_0``, ``caption``)."""
    rng = np.random.default_rng(seed)
    rows = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": []}
    for i in range(num_rows):
        rows["jpg_0"].append(jpeg_bytes(_random_image(rng, size)))
        rows["jpg_1"].append(jpeg_bytes(_random_image(rng, size)))
        tie = tie_every and i % tie_every == tie_every - 1
        rows["label_0"].append(0.5 if tie else float(i % 2))
        rows["caption"].append(f"a picture number {i}")
    return rows


def save_tiny_pairs(path: str, **kwargs) -> str:
    """Writes ``tiny_pairs`` as one parquet file, as Pick-a-Pic's shards are stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.table(tiny_pairs(**kwargs)), path)
    return path


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8):
    """A ~1 M parameter (UNet) StableDiffusionXLPipeline with SDXL's wiring: two text encoders (the second with a pooled
    projection), hidden states side by side as the cross-attention input (32 + 32 = 64), and the ``text_time``
    added conditioning, whose input is 6 time ids x ``addition_time_embed_dim`` 8 + the pooled projection 32 = 80.
    It ships an EulerDiscreteScheduler as SDXL does (with the DDIM keys of SDXL's config), and the VAE of the tiny SD
    with SDXL's scaling factor: images are twice the latent size."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = char_tokenizer(), char_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=32))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        norm_num_groups=8,
    )
    vae = tiny_vae(sample_size, scaling_factor=0.13025)
    ddim = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler = EulerDiscreteScheduler.from_config(ddim.config, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def save_tiny_sdxl(path: str, seed: int = 0, **kwargs) -> str:
    tiny_sdxl_pipeline(seed, **kwargs).save_pretrained(path, safe_serialization=True)
    return path


def t5_char_tokenizer(max_length: int = 32):
    """A T5 tokenizer (a Unigram model over printable characters), built in code as ``char_tokenizer`` is."""
    from tokenizers import Tokenizer, models
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(i), -1.0) for i in range(32, 127)]
    return T5TokenizerFast(
        tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=2)),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 8, t5: bool = True, dual_attention: bool = True, shift=3.0):
    """A ~100 k parameter (transformer) StableDiffusion3Pipeline with SD3's wiring: two CLIP encoders with
    projections (the pooled projection is their two 32-wide projections side by side, 64), a tiny T5 whose width (32)
    is the joint attention's, as T5-XXL's 4096 is SD3's (``t5=False`` leaves it out, as ``text_encoder_3=None``
    does; such a folder loads with ``text_encoder_3=None, tokenizer_3=None``), an MMDiT with SD3.5's second
    attention in its first block (``dual_attention``), a 4-channel VAE with a shift and a scale, and the
    flow-matching Euler scheduler (shift 3). Images are twice the latent size; the transformer's patch is 2, so
    latents must be even-sized."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = char_tokenizer(), char_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=32))
    tokenizer_3 = text_encoder_3 = None
    if t5:
        tokenizer_3 = t5_char_tokenizer()
        text_encoder_3 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_3), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        )  # fmt: skip
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
        dual_attention_layers=(0,) if dual_attention else (),
    )
    vae = tiny_vae(sample_size, scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def save_tiny_sd3(path: str, seed: int = 0, **kwargs) -> str:
    tiny_sd3_pipeline(seed, **kwargs).save_pretrained(path, safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reward-model stand-ins for evaluate.py: the real architectures (CLIP, BLIP) at toy sizes, saved like the real ones

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
               "image_size": 32, "patch_size": 8}  # fmt: skip


def save_tiny_clip(path: str, seed: int = 0) -> str:
    """A CLIPModel (32-wide, one layer per tower, 32 px images) with its CLIPProcessor, as PickScore, HPSv2, CLIP
    score and the aesthetic predictor's CLIP are stored."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    text = _text_config(tokenizer).to_dict()
    vision = CLIPVisionConfig(**TINY_VISION).to_dict()
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_linear_head(path: str, sizes: Sequence[int], seed: int = 0, **scalars) -> str:
    """Linear layers ``layers.<i>`` of the given sizes (indices as in LAION's predictor: 0, 2, 4, ...), plus scalar
    tensors (ImageReward's mean and std), as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {}
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = torch.nn.Linear(n_in, n_out)
        state[f"layers.{2 * k}.weight"], state[f"layers.{2 * k}.bias"] = layer.weight.detach(), layer.bias.detach()
    state.update({name: torch.tensor(float(value)) for name, value in scalars.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def save_tiny_imagereward(path: str, seed: int = 0, mean: float = 0.5, std: float = 2.0) -> str:
    """A BlipForImageTextRetrieval (32-wide, 32 px) with a BERT word-piece tokenizer of letters, its processor and
    an ``imagereward_head.safetensors`` (32 -> 8 -> 1, mean, std): ImageReward's layout in transformers' BLIP."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file)
    text = BlipTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
        max_position_embeddings=40, encoder_hidden_size=32, pad_token_id=0, bos_token_id=2, sep_token_id=3,
    )  # fmt: skip
    vision = BlipVisionConfig(**TINY_VISION)
    config = BlipConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16, image_text_hidden_size=16
    )
    BlipForImageTextRetrieval(config).save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    save_linear_head(os.path.join(path, "imagereward_head.safetensors"), [32, 8, 1], seed, mean=mean, std=std)
    return path


def save_tiny_step_aware_model(path: str, seed: int = 0) -> str:
    """A step-aware preference model (train_spo.StepAwarePreferenceModel: the tiny CLIP of ``save_tiny_clip`` with
    timestep conditioning, its time modules random so that the timestep matters) and its tokenizer, as the converter
    script writes one."""
    from transformers import CLIPConfig, CLIPVisionConfig

    from train_spo import StepAwarePreferenceModel

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    config = CLIPConfig(
        text_config=_text_config(tokenizer).to_dict(),
        vision_config=CLIPVisionConfig(**TINY_VISION).to_dict(),
        projection_dim=16,
    )
    model = StepAwarePreferenceModel(config)
    with torch.no_grad():
        for module in (model.time_embedder, model.block_modulations, model.pooled_modulation):
            for p in module.parameters():
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
