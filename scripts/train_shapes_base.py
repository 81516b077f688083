"""Trains a tiny Stable Diffusion (same architecture and folder layout; ``--architecture sdxl``: SDXL's;
``--architecture sd3``: SD3.5's) on the shapes world, on the CPU.

Two phases, both on images rendered from ``shapes.world.train_prompts()`` only (held-out prompts are never drawn):

1. an AutoencoderKL (32 x 32 x 3 <-> 16 x 16 x 4) for reconstruction plus a tiny KL; its
   ``scaling_factor`` is then set so that the scaled latents have unit standard deviation (for SD3 after its
   ``shift_factor`` has centred them, as SD3's VAE does);
2. the text encoder(s) and a UNet2DConditionModel, jointly, with the epsilon-prediction loss on cached latents
   and caption dropout to the null prompt (so that classifier-free guidance works), with an EMA of both; for SD3
   an MMDiT (SD3Transformer2DModel) with the rectified-flow loss instead (``train_transformer``);
3. optionally (``--encoder_cycle_steps``), the VAE encoder alone, so that it maps the model's decoded samples back
   to the latents they were decoded from (``tune_encoder_cycle``).

The tokenizer is a word-level CLIPTokenizer: BPE merges are generated so that every shapes-world word is one
token (SD3's T5 gets a word-level T5 tokenizer, ``t5_word_tokenizer``). The result is saved with the pipeline's
``save_pretrained`` (safetensors) and loads with the stock ``from_pretrained``. ``--save_every`` also writes
intermediate pipelines (EMA weights) to ``<output_dir>-ckpt/step-N`` so that a less trained one can be chosen.

    OMP_NUM_THREADS=1 python scripts/train_shapes_base.py --output_dir models/shapes-sd-tiny

(the committed bases' exact commands: ``models/*/BUILD.md``)
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shapes import scorer, world  # noqa: E402


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ------------------------------------------------------------------------------------------------- tokenizer


def _bpe(symbols, ranks):
    """CLIP's BPE on one word: repeatedly merge the adjacent pair with the lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == math.inf:
            break
        first, second = symbols[i], symbols[i + 1]
        out, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                out.append(first + second)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def shapes_vocabulary():
    """Every word of the shapes-world prompts."""
    words = set()
    for n in (1, 2):
        for p in world.all_prompts(n):
            words.update(str(p).split())
    return sorted(words)


def word_level_vocab(words):
    """(vocab, merges as (left, right) pairs) such that CLIP's BPE turns each word into one ``word</w>`` token.

    Merges are added greedily: run the BPE with the merges so far on each word, and while a word is still split,
    append the merge of its first two symbols. A merge appended at the end only fires when no earlier merge
    applies, so words that are already single tokens stay so.
    """
    vocab, merges, ranks = {}, [], {}

    def add(token):
        vocab.setdefault(token, len(vocab))

    for c in "abcdefghijklmnopqrstuvwxyz":
        add(c)
        add(c + "</w>")
    changed = True
    while changed:
        changed = False
        for w in words:
            syms = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
            if len(syms) > 1:
                pair = (syms[0], syms[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                add(pair[0] + pair[1])
                changed = True
    add(BOS)
    add(EOS)
    return vocab, merges


def word_tokenizer(max_length=16):
    from transformers import CLIPTokenizer

    vocab, merges = word_level_vocab(shapes_vocabulary())
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_word_tokenizer(max_length=16):
    """A T5TokenizerFast whose Unigram model holds one ``\u2581word`` piece per shapes-world word (SentencePiece's
    word-start mark, as T5's own vocabulary spells words), with T5's ``</s>`` appended; any other word is ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in shapes_vocabulary()]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


# ---------------------------------------------------------------------------------------------------- models


SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim of the SDXL variant (SDXL's own is 256)


def clip_config(tokenizer, args, projection: bool):
    """Every twin's CLIP text encoder: ``--text_dim`` wide, ``--text_layers`` deep, over the word-level vocabulary;
    with ``projection`` the pooled projection of CLIPTextModelWithProjection (SDXL's second encoder, SD3's two)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.text_dim,
        intermediate_size=2 * args.text_dim,
        num_attention_heads=4,
        num_hidden_layers=args.text_layers,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": args.text_dim} if projection else {}),
    )


def twin_vae(args):
    """Every twin's VAE: ``--vae_channels`` per level (each level halves the size), 4 latent channels, 32 px images."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=tuple(args.vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(args.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(args.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def build_models(tokenizer, args):
    """(text encoders, unet, vae, scheduler). SD: one CLIPTextModel. SDXL: a CLIPTextModel and a
    CLIPTextModelWithProjection whose penultimate hidden states go side by side into cross-attention, and the
    ``text_time`` added conditioning (6 time ids and the second encoder's pooled projection), as in SDXL."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = args.architecture == "sdxl"
    config = clip_config(tokenizer, args, projection=sdxl)
    text_encoders = [CLIPTextModel(config)] + ([CLIPTextModelWithProjection(config)] if sdxl else [])
    xl = {}
    if sdxl:
        xl = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + args.text_dim,
            "use_linear_projection": True,
        }
    blocks = tuple(args.unet_channels)
    latent_size = 32 // 2 ** (len(args.vae_channels) - 1)
    plain = 0 if args.full_res_attention else 1  # levels without attention, from the top
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=blocks,
        layers_per_block=args.unet_layers,
        # by default attention (self + cross) only below full latent resolution, as in SD's lowest level
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (len(blocks) - plain),
        up_block_types=("CrossAttnUpBlock2D",) * (len(blocks) - plain) + ("UpBlock2D",) * plain,
        cross_attention_dim=args.text_dim * len(text_encoders),
        attention_head_dim=4,
        norm_num_groups=8,
        **xl,
    )
    vae = twin_vae(args)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **(
            # "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al., 2024): the last level is
            # pure noise, as at sampling, so the layout cannot leak through x_T in training; needs v-prediction
            {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
            if args.zero_snr
            else {"prediction_type": "epsilon"}
        ),
    )
    return text_encoders, unet, vae, scheduler


SD3_SHIFT = 3.0  # the flow-matching scheduler's shift of SD3 and SD3.5


def build_sd3_models(tokenizer, t5_tokenizer, args):
    """(text encoders, transformer, vae, scheduler) in SD3.5's wiring: two CLIPTextModelWithProjection (their
    penultimate states side by side, zero-padded to T5's width, then T5's states: the joint attention's caption
    tokens; their pooled projections side by side: ``pooled_projections``), a T5EncoderModel (T5 v1.1's gated GELU,
    as T5-XXL) twice a CLIP encoder's width, as T5-XXL's 4096 is at least CLIP-L's 768 + CLIP-G's 1280; an MMDiT
    with patch 2, RMS-normed queries and keys and the second, image-only attention in ``--dual_attention_layers``;
    the VAE of the other twins (its shift and scale are set after phase 1); the flow-matching Euler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = clip_config(tokenizer, args, projection=True)
    t5_dim = 2 * args.text_dim
    t5 = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=t5_dim,
        d_ff=2 * t5_dim,
        d_kv=t5_dim // 4,
        num_heads=4,
        num_layers=args.text_layers,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id,
    )
    text_encoders = [CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip), T5EncoderModel(t5)]
    latent_size = 32 // 2 ** (len(args.vae_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=args.transformer_layers,
        attention_head_dim=args.transformer_dim // args.transformer_heads,
        num_attention_heads=args.transformer_heads,
        joint_attention_dim=t5_dim,
        caption_projection_dim=args.transformer_dim,
        pooled_projection_dim=2 * args.text_dim,
        pos_embed_max_size=latent_size // 2,  # the patch grid: 32 px images only, as the other twins
        dual_attention_layers=tuple(args.dual_attention_layers),
        qk_norm="rms_norm",
    )
    vae = twin_vae(args)
    return text_encoders, transformer, vae, FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)


def sd3_caption_encoder(text_encoders, tokenizer, t5_tokenizer, transformer, max_length):
    """``encode(captions) -> (embeddings [B, 2 L, D], pooled [B, P])`` by ``StableDiffusion3Pipeline.encode_prompt``
    itself, so that training conditions exactly as sampling does (T5 gets ``max_length`` tokens, as the pipeline's
    ``max_sequence_length``); gradients reach encoders that are trained."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=None, vae=None,
        text_encoder=text_encoders[0], tokenizer=tokenizer,
        text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=text_encoders[2], tokenizer_3=t5_tokenizer,
    )  # fmt: skip

    def encode(captions):
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(captions), None, None, device=torch.device("cpu"), do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )  # fmt: skip
        return embeds, pooled

    return encode


def condition(text_encoders, ids, drop):
    """(encoder_hidden_states, added_cond_kwargs or None) for token ids [B, L]; rows where ``drop`` is set get the
    null condition: SD's is the empty prompt (``ids`` already hold it there), SDXL's is all zeros."""
    if len(text_encoders) == 1:
        return text_encoders[0](ids)[0], None
    outs = [te(ids, output_hidden_states=True) for te in text_encoders]
    keep = (~drop).float()
    hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1) * keep.view(-1, 1, 1)
    pooled = outs[1].text_embeds * keep.view(-1, 1)
    size = 32.0
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]).expand(len(ids), 6)
    return hidden, {"text_embeds": pooled, "time_ids": time_ids}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------------ data


def render_dataset(n, seed, single_fraction, relation_noise=0.0, object_dropout=0.0, color_swap=0.0):
    """``n`` renders of train prompts: (images [n, 3, 32, 32] in [-1, 1], captions). With ``relation_noise`` > 0,
    that share of the two-object captions names the opposite relation (web-like caption noise; the images are
    unchanged, and the renders are the same as without it). With ``object_dropout`` > 0, that share of the
    two-object scenes is drawn without one of its two objects (chosen at random) while the caption still names both,
    as alt-text names things an image does not show; the other object keeps its place, and every other render and
    caption is the same as without it. With ``color_swap`` > 0, that share of the two-object captions whose objects
    differ in colour gives each object the other's colour (attribute leakage; the images are unchanged)."""
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng([seed, 1])
    drop_rng = np.random.default_rng([seed, 2])
    swap_rng = np.random.default_rng([seed, 3])
    singles, pairs = world.train_prompts(1), world.train_prompts(2)
    images, captions = np.empty((n, 3, 32, 32), np.float32), []
    for i in range(n):
        pool = singles if rng.random() < single_fraction else pairs
        p = pool[rng.integers(len(pool))]
        assert not world.is_heldout(p)
        layout = world.sample_layout(p, rng)
        if object_dropout > 0 and p.relation is not None and drop_rng.random() < object_dropout:
            layout = [layout[int(drop_rng.integers(2))]]
        img = np.asarray(world.draw(layout), dtype=np.float32)
        images[i] = img.transpose(2, 0, 1) / 127.5 - 1.0
        if relation_noise > 0 and p.relation is not None and noise_rng.random() < relation_noise:
            p = world.Prompt(p.objects, world.OPPOSITE[p.relation])
        if color_swap > 0 and p.relation is not None and p.objects[0].color != p.objects[1].color:
            if swap_rng.random() < color_swap:
                a, b = p.objects
                swapped = (world.SceneObject(b.color, a.shape), world.SceneObject(a.color, b.shape))
                p = world.Prompt(swapped, p.relation)
        captions.append(str(p))
    return torch.from_numpy(images), captions


# ----------------------------------------------------------------------------------------------------- train


def train_vae(vae, images, args, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    vae.train()
    t0 = time.time()
    for step in range(1, args.vae_steps + 1):
        idx = torch.randint(len(images), (args.vae_batch,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.vae_steps:
            log(
                f"vae step {step}/{args.vae_steps} rec {rec_loss.item():.5f} kl {kl.item():.3f} ({time.time() - t0:.0f} s)"
            )
    vae.eval()


@torch.no_grad()
def encode_all(vae, images, batch=256):
    means = [vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(means)


@torch.no_grad()
def vae_pass_rate(vae, scale, n, seed):
    """Pass rate of decode(encode(render)) against the rendered prompt: the ceiling the diffusion model can reach."""
    imgs, caps = render_dataset(n, seed, 0.2)
    z = vae.encode(imgs).latent_dist.mean
    rec = vae.decode(z).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return scorer.pass_rate(scorer.score_many(list(rec), caps))


def ema_update(ema, model, decay):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def optimizer_and_emas(model, text_encoders, args):
    """Phase 2's training state, the same for the UNet and the transformer: the trained parameters (the model's, and
    the text encoders' that require grad), AdamW with a linear ``--warmup``, and frozen EMA copies of the model and
    of every text encoder."""
    params = list(model.parameters()) + [p for te in text_encoders for p in te.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.warmup, 1)))
    ema_model, ema_text = copy.deepcopy(model).eval(), [copy.deepcopy(te).eval() for te in text_encoders]
    for m in [ema_model, *ema_text]:
        m.requires_grad_(False)
    return params, opt, sched, ema_model, ema_text


def stepper(name, model, ema_model, text_encoders, ema_text, params, opt, sched, args, log, save):
    """The end of a phase-2 step, the same for the UNet and the transformer: the clipped update, the EMAs (warming
    up as ``(1 + step) / (10 + step)``), the mean loss every ``--log_every`` steps and the EMA checkpoints."""
    t0 = time.time()

    def update(step, loss, running):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_model, model, decay)
        for ema, te in zip(ema_text, text_encoders):
            ema_update(ema, te, decay)
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            el = time.time() - t0
            log(
                f"{name} step {step}/{args.steps} loss {running / args.log_every:.4f} "
                f"({el:.0f} s, {el / step:.3f} s/step)"
            )
            running = 0.0
        if args.save_every and step % args.save_every == 0 and step != args.steps:
            save(os.path.join(args.output_dir.rstrip("/") + "-ckpt", f"step-{step}"), ema_text, ema_model)
        return running

    return update


def make_pipeline(vae, text_encoders, unet, tokenizer, scheduler, t5_tokenizer=None):
    """The pipeline of the architecture: SD (one text encoder), SDXL (two) or SD3 (three; ``unet`` is then the
    transformer)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if len(text_encoders) == 3:
        # both CLIP encoders share the word-level tokenizer; SD3's null prompt is the encoded empty prompt
        return StableDiffusion3Pipeline(
            transformer=unet,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizer,
            text_encoder_2=text_encoders[1],
            tokenizer_2=tokenizer,
            text_encoder_3=text_encoders[2],
            tokenizer_3=t5_tokenizer,
        )
    if len(text_encoders) == 1:
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # the same word-level tokenizer for both encoders; zeros as the null prompt, as SDXL does
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_pipeline(path, vae, text_encoders, unet, tokenizer, scheduler, t5_tokenizer=None):
    pipe = make_pipeline(vae, text_encoders, unet, tokenizer, scheduler, t5_tokenizer)
    pipe.save_pretrained(path, safe_serialization=True)


def tune_encoder_cycle(pipe, images, render_latents, args, log):
    """Phase 3: fine-tunes ``pipe.vae``'s encoder (and ``quant_conv``) so that encoding a decoded latent, as an image
    the pair generator writes (JPEG), returns that latent, for the model's own samples and for renders' latents,
    while renders keep the latents the UNet was trained on (``render_latents``, unscaled). The decoder is untouched,
    so sampling is unchanged.

    Why: the autoencoder is trained for reconstruction only, and its tiny encoder maps decoded images to latents
    about 10% away from the ones they were decoded from. Fine-tuning on images the model drew (every preference
    pair) then teaches the UNet those latents, whose decodings mix colours: SFT on decoded renders lowered held-out
    accuracy 53.1% -> 31.8%, 51.0% after this phase (docs/experiments/base-model.md)."""
    from PIL import Image

    import train_inversion_dpo as trainer
    from shapes import sampling
    from shapes.pairs import jpeg_bytes

    vae = pipe.vae
    g = torch.Generator().manual_seed(args.seed + 3)
    prompts = [str(p) for p in world.train_prompts()]
    picks = torch.randint(len(prompts), (args.encoder_cycle_samples,), generator=g).tolist()
    with torch.no_grad():
        sampled = [
            pipe(
                prompt=[prompts[i] for i in picks[k : k + 128]],
                num_inference_steps=sampling.DEFAULT_STEPS,
                guidance_scale=sampling.DEFAULT_GUIDANCE,
                generator=[torch.Generator().manual_seed(args.seed + k + j) for j in range(len(picks[k : k + 128]))],
                output_type="latent",
                **sampling.call_kwargs(pipe),
            ).images
            for k in range(0, len(picks), 128)
        ]
        sampled = torch.cat(sampled) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):  # SD3's latents are shifted, then scaled
            sampled = sampled + vae.config.shift_factor
        targets = torch.cat([sampled, render_latents[: len(picks)]])
        decoded = ((vae.decode(targets).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        # what the trainer will read: the JPEG the pair generator writes, decoded as the trainer decodes it
        inputs = torch.stack(
            [
                trainer.to_tensor(trainer.decode_image(jpeg_bytes(Image.fromarray(d.permute(1, 2, 0).numpy()))))
                for d in decoded
            ]
        )

    def log_errors():
        n = len(picks)
        with torch.no_grad():
            out, keep = encode_all(vae, inputs), encode_all(vae, images[:n])
        samples, renders = (
            ((out[a:b] - targets[a:b]).norm() / targets[a:b].norm()).item() for a, b in [(0, n), (n, None)]
        )
        moved = ((keep - render_latents[:n]).norm() / render_latents[:n].norm()).item()
        log(
            f"encoder cycle |E(D(z)) - z| / |z|: samples {samples:.3f}, renders {renders:.3f}; renders' latents moved {moved:.3f}"
        )

    log_errors()
    params = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=args.encoder_cycle_lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))  # a trained encoder: no jolt
    for step in range(1, args.encoder_cycle_steps + 1):
        i = torch.randint(len(targets), (args.vae_batch * 2,), generator=g)
        j = torch.randint(len(images), (args.vae_batch * 2,), generator=g)
        cycle = F.mse_loss(vae.encode(inputs[i]).latent_dist.mean, targets[i])
        keep = F.mse_loss(vae.encode(images[j]).latent_dist.mean, render_latents[j])
        opt.zero_grad(set_to_none=True)
        (cycle + keep).backward()
        opt.step()
        warmup.step()
        if step % args.log_every == 0 or step == args.encoder_cycle_steps:
            log(
                f"encoder cycle step {step}/{args.encoder_cycle_steps} cycle {cycle.item():.5f} keep {keep.item():.5f}"
            )
    vae.requires_grad_(False)
    log_errors()


def train_unet(unet, text_encoders, tokenizer, latents, captions, scheduler, args, log, save):
    """Phase 2 for SD and SDXL: epsilon (or, with ``--zero_snr``, v) prediction on the cached latents, with caption
    dropout to the null prompt; returns the EMA of the UNet and of the text encoders."""
    tok = tokenizer(captions, padding="max_length", max_length=args.max_length, truncation=True, return_tensors="pt")
    ids = tok.input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=args.max_length, return_tensors="pt").input_ids
    params, opt, sched, ema_unet, ema_text = optimizer_and_emas(unet, text_encoders, args)
    acp = scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(args.seed + 2)
    for m in [unet, *text_encoders]:
        m.train()
    update = stepper("unet", unet, ema_unet, text_encoders, ema_text, params, opt, sched, args, log, save)
    running = 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(latents), (args.batch,), generator=g)
        x0 = latents[idx]
        cond_ids = ids[idx].clone()
        drop = torch.rand(args.batch, generator=g) < args.caption_dropout
        cond_ids[drop] = empty_ids[0]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(args.timestep_range[0], args.timestep_range[1], (args.batch,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        enc, added = condition(text_encoders, cond_ids, drop)
        pred = unet(xt, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        if args.x0_weight_max > 1:
            weight = ((1 - a) / a).clamp(1.0, args.x0_weight_max).view(-1)
            loss = (F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)) * weight).mean() / weight.mean()
        else:  # the plain loss, computed as the committed base was (bit-identical reruns)
            loss = F.mse_loss(pred, target)
        running = update(step, loss, running)
    return ema_unet, ema_text


def train_transformer(transformer, text_encoders, encode, latents, captions, scheduler, args, log, save):
    """Phase 2 for SD3: the rectified-flow loss (Esser et al. 2024, "Scaling Rectified Flow Transformers for
    High-Resolution Image Synthesis", arXiv:2403.03206) on the cached latents. A level is drawn among the
    scheduler's 1000 training levels (``--weighting_scheme``, as diffusers' ``train_dreambooth_lora_sd3.py`` draws
    them), x_s = (1 - s) x0 + s n at its shifted sigma s, the transformer sees timestep 1000 s and predicts the
    velocity n - x0, every level weighted 1. Caption dropout replaces a caption by the empty prompt, SD3's null
    condition (the pipeline encodes "" for guidance, not zeros). With frozen text encoders every caption is encoded
    once. Returns the EMA of the transformer and of the text encoders."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    trained_text = any(p.requires_grad for te in text_encoders for p in te.parameters())
    params, opt, sched, ema_model, ema_text = optimizer_and_emas(transformer, text_encoders, args)
    table = None
    if not trained_text:
        distinct = sorted(set(captions) | {""})
        with torch.no_grad():
            embeds, pooled = zip(*(encode(distinct[i : i + 256]) for i in range(0, len(distinct), 256)))
        table = dict(zip(distinct, zip(torch.cat(embeds), torch.cat(pooled))))
        log(f"encoded the {len(distinct)} distinct captions once (frozen text encoders)")
    levels = len(scheduler.timesteps)  # a fresh scheduler holds its training levels, from pure noise down
    sigmas, timesteps = scheduler.sigmas[:levels], scheduler.timesteps
    g = torch.Generator().manual_seed(args.seed + 2)
    for m in [transformer, *text_encoders]:
        m.train()
    update = stepper(
        "transformer", transformer, ema_model, text_encoders, ema_text, params, opt, sched, args, log, save
    )
    running = 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(latents), (args.batch,), generator=g)
        x0 = latents[idx]
        drop = torch.rand(args.batch, generator=g) < args.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        if table is None:
            embeds, pooled = encode(batch_captions)
        else:
            embeds = torch.stack([table[c][0] for c in batch_captions])
            pooled = torch.stack([table[c][1] for c in batch_captions])
        noise = torch.randn(x0.shape, generator=g)
        u = compute_density_for_timestep_sampling(
            args.weighting_scheme, args.batch, args.logit_mean, args.logit_std, args.mode_scale, generator=g
        )
        level = (u * levels).long().clamp(0, levels - 1)
        s = sigmas[level].view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * noise
        pred = transformer(
            hidden_states=xs, timestep=timesteps[level], encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample
        loss = F.mse_loss(pred, noise - x0)
        running = update(step, loss, running)
    return ema_model, ema_text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="models/shapes-sd-tiny")
    ap.add_argument(
        "--architecture",
        choices=["sd", "sdxl", "sd3"],
        default="sd",
        help="sd: StableDiffusionPipeline; sdxl: StableDiffusionXLPipeline (two text encoders, pooled projection, "
        "time ids, zeros as the null prompt); sd3: StableDiffusion3Pipeline (two CLIP encoders and a T5, an MMDiT "
        "transformer, rectified flow, the encoded empty prompt as the null prompt)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_images", type=int, default=20000, help="rendered training images (train prompts only)")
    ap.add_argument("--single_fraction", type=float, default=0.2, help="share of single-object prompts")
    ap.add_argument("--vae_steps", type=int, default=1000)
    ap.add_argument("--vae_batch", type=int, default=16)
    ap.add_argument("--vae_lr", type=float, default=2e-3)
    ap.add_argument("--vae_kl", type=float, default=1e-4)
    ap.add_argument("--vae_channels", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--steps", type=int, default=3000, help="diffusion training steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption_dropout", type=float, default=0.1)
    ap.add_argument(
        "--relation_noise",
        type=float,
        default=0.0,
        help="share of two-object captions that name the opposite relation (the image is unchanged): web-like "
        "caption noise, which leaves the base drawing some scenes mirrored, a mistake alignment can find and fix",
    )
    ap.add_argument(
        "--object_dropout",
        type=float,
        default=0.0,
        help="share of two-object scenes drawn with one object left out while the caption names both: web-like "
        "caption noise meant to leave the base neglecting objects it can draw; after 2,000 steps at 0.4 or 0.6 the "
        "neglect hardly shows in samples at guidance 5 (docs/experiments/base-model.md)",
    )
    ap.add_argument(
        "--color_swap",
        type=float,
        default=0.0,
        help="share of two-object captions (objects of different colours) that give each object the other's colour "
        "(the image is unchanged): web-like caption noise, which leaves the base binding some colours to the wrong "
        "object",
    )
    ap.add_argument("--unet_channels", type=int, nargs="+", default=[32, 64, 64])
    ap.add_argument("--unet_layers", type=int, default=1)
    ap.add_argument("--full_res_attention", action="store_true", help="attention at the latent's full resolution too")
    ap.add_argument("--text_dim", type=int, default=64)
    ap.add_argument("--text_layers", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=16)
    ap.add_argument("--save_every", type=int, default=0, help="also save EMA pipelines every N steps")
    ap.add_argument("--log_every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--timestep_range",
        type=int,
        nargs=2,
        default=[0, 1000],
        metavar=("LO", "HI"),
        help="draw training timesteps from [LO, HI); a high range trains layout, which is decided at high noise",
    )
    ap.add_argument(
        "--x0_weight_max",
        type=float,
        default=1.0,
        help="weight each sample's epsilon loss by clamp(1/SNR(t), 1, this): the x0-space loss at high noise, where "
        "the layout (which object goes where) is decided and the plain epsilon loss hardly sees it; 1 = plain loss",
    )
    ap.add_argument(
        "--freeze_text_encoder",
        action="store_true",
        help="train the UNet only; jointly trained, the tiny text encoder collapses 'left of' and 'right of' onto "
        "nearly the same states (the UNet gave it no reason to keep them apart)",
    )
    ap.add_argument(
        "--zero_snr",
        action="store_true",
        help="zero terminal SNR (rescaled betas), v-prediction and trailing timesteps, all stock DDIMScheduler options",
    )
    ap.add_argument(
        "--encoder_cycle_steps",
        type=int,
        default=0,
        help="phase 3: steps fine-tuning the VAE encoder to map decoded samples back to their latents (0 = skip)",
    )
    ap.add_argument("--encoder_cycle_samples", type=int, default=1024, help="phase 3: model samples to cycle")
    ap.add_argument("--encoder_cycle_lr", type=float, default=1e-3)
    ap.add_argument(
        "--init_from",
        default=None,
        help="continue phase 2 from a saved pipeline folder (its tokenizer, VAE and scaling factor are kept)",
    )
    sd3 = ap.add_argument_group("sd3")
    sd3.add_argument("--transformer_dim", type=int, default=96, help="the MMDiT's width (heads x head dim)")
    sd3.add_argument("--transformer_heads", type=int, default=4)
    sd3.add_argument("--transformer_layers", type=int, default=6, help="joint transformer blocks")
    sd3.add_argument(
        "--dual_attention_layers",
        type=int,
        nargs="*",
        default=[0, 1, 2],
        help="blocks with SD3.5's second, image-only attention (SD3.5-medium: the first half)",
    )
    sd3.add_argument(
        "--weighting_scheme",
        choices=["none", "logit_normal", "mode"],
        default="none",
        help="how the training sigma is drawn among the scheduler's 1000 shifted levels (diffusers' "
        "compute_density_for_timestep_sampling, as train_dreambooth_lora_sd3.py): none = uniform over the levels, "
        "which the shift already tilts to high noise, where the layout is decided; logit_normal = SD3's",
    )
    sd3.add_argument("--logit_mean", type=float, default=0.0)
    sd3.add_argument("--logit_std", type=float, default=1.0)
    sd3.add_argument("--mode_scale", type=float, default=1.29)
    args = ap.parse_args(argv)
    if args.architecture == "sd3":
        for flag, value, default in [("zero_snr", args.zero_snr, False), ("x0_weight_max", args.x0_weight_max, 1.0),
                                     ("timestep_range", args.timestep_range, [0, 1000])]:  # fmt: skip
            if value != default:
                ap.error(f"--{flag} is for the DDPM UNet architectures (sd, sdxl), not sd3")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    is_sd3 = args.architecture == "sd3"
    t5_tokenizer = None  # SD3's third tokenizer
    if args.init_from:
        from diffusers import DiffusionPipeline

        init = DiffusionPipeline.from_pretrained(args.init_from, use_safetensors=True)
        if hasattr(init, "transformer") != is_sd3:
            ap.error(f"--init_from {args.init_from} is a {type(init).__name__}: --architecture must match it")
        if is_sd3:
            tokenizer, t5_tokenizer, unet, vae = init.tokenizer, init.tokenizer_3, init.transformer, init.vae
            text_encoders, scheduler = [init.text_encoder, init.text_encoder_2, init.text_encoder_3], init.scheduler
        else:
            tokenizer, unet, vae, scheduler = init.tokenizer, init.unet, init.vae, init.scheduler
            text_encoders = [init.text_encoder] + ([init.text_encoder_2] if hasattr(init, "text_encoder_2") else [])
    elif is_sd3:
        tokenizer, t5_tokenizer = word_tokenizer(args.max_length), t5_word_tokenizer(args.max_length)
        text_encoders, unet, vae, scheduler = build_sd3_models(tokenizer, t5_tokenizer, args)
    else:
        tokenizer = word_tokenizer(args.max_length)
        text_encoders, unet, vae, scheduler = build_models(tokenizer, args)
    for w in shapes_vocabulary():
        for tok in [tokenizer] + ([t5_tokenizer] if is_sd3 else []):
            ids = tok(w, add_special_tokens=False).input_ids
            assert len(ids) == 1, f"{w!r} is not one token: {ids}"
    model_name = "transformer" if is_sd3 else "unet"
    log(
        f"params: vae {n_params(vae):,} text encoders {sum(map(n_params, text_encoders)):,} "
        f"{model_name} {n_params(unet):,}; vocab {len(tokenizer)}"
    )

    images, captions = render_dataset(
        args.num_images, args.seed, args.single_fraction, args.relation_noise, args.object_dropout, args.color_swap
    )
    log(f"rendered {len(images)} images of train prompts")

    # phase 1: autoencoder
    shift = None  # SD3's VAE also centres its latents (its shift_factor)
    if args.init_from:
        vae.requires_grad_(False)
        scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)
        latents = encode_all(vae, images)
        latents = (latents - shift) * scale if shift is not None else latents * scale
    else:
        train_vae(vae, images, args, log)
        vae.requires_grad_(False)
        latents = encode_all(vae, images)
        if is_sd3:
            shift = latents.mean().item()
            latents = latents - shift
            vae.register_to_config(shift_factor=shift)
        scale = 1.0 / latents.std().item()
        vae.register_to_config(scaling_factor=scale)
        latents = latents * scale
    shift_text = f" shift_factor {shift:.4f}" if shift is not None else ""
    log(f"latents {tuple(latents.shape)} scaling_factor {scale:.4f}{shift_text}; cached")
    log(f"vae reconstruction pass rate {vae_pass_rate(vae, scale, 200, args.seed + 7):.3f}")

    # phase 2: text encoder(s) + the denoiser
    if args.freeze_text_encoder:  # as Stable Diffusion does: the text side stays at its (here random) init
        for te in text_encoders:
            te.requires_grad_(False)

    def save(path, ema_text, ema_model):
        save_pipeline(path, vae, ema_text, ema_model, tokenizer, scheduler, t5_tokenizer)
        log(f"saved {path}")

    if is_sd3:
        encode = sd3_caption_encoder(text_encoders, tokenizer, t5_tokenizer, unet, args.max_length)
        ema_unet, ema_text = train_transformer(
            unet, text_encoders, encode, latents, captions, scheduler, args, log, save
        )
    else:
        ema_unet, ema_text = train_unet(unet, text_encoders, tokenizer, latents, captions, scheduler, args, log, save)

    if args.encoder_cycle_steps:
        pipe = make_pipeline(vae, ema_text, ema_unet, tokenizer, scheduler, t5_tokenizer)
        render_latents = latents / scale  # the cached latents: not encoded again
        if shift is not None:
            render_latents = render_latents + shift
        tune_encoder_cycle(pipe, images, render_latents, args, log)
        log(f"vae reconstruction pass rate {vae_pass_rate(vae, scale, 200, args.seed + 7):.3f}")
    save_pipeline(args.output_dir, vae, ema_text, ema_unet, tokenizer, scheduler, t5_tokenizer)
    info = {
        "args": vars(args),
        "params": {
            "vae": n_params(vae),
            "text_encoders": sum(map(n_params, text_encoders)),
            model_name: n_params(unet),
        },
        "scaling_factor": scale,
        **({"shift_factor": shift} if shift is not None else {}),
        "wall_clock_s": round(time.time() - t_start, 1),
    }
    with open(os.path.join(args.output_dir, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    log(f"saved {args.output_dir} ({info['wall_clock_s']} s in all)")


if __name__ == "__main__":
    main()
