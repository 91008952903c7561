"""Tiny random-weight copies of real diffusers pipelines, built offline in seconds.

``build_tiny_sd3(out_dir)`` writes a ``StableDiffusion3Pipeline`` folder and ``build_tiny_flux(out_dir)``
a ``FluxPipeline`` folder, laid out exactly as a Hub download (``model_index.json``, one subfolder per
component, safetensors weights, real tokenizer files), so the code that loads SD3.5 or FLUX.1 from the
Hub is the code the tests run. The architectures are the real ones at toy widths:

- SD3 (SD3.5-Medium style: RMS q/k norm, one dual-attention layer): ``SD3Transformer2DModel``, a 16-channel
  ``AutoencoderKL`` with SD3's scaling/shift factors, two ``CLIPTextModelWithProjection`` of different
  widths, a ``T5EncoderModel`` and a ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.0.
- FLUX.1-dev: ``FluxTransformer2DModel`` with a guidance embedding, packed 2×2 latents (64 input channels),
  ``CLIPTextModel`` + ``T5EncoderModel``, FLUX's VAE factors and its dynamic-shift scheduler.

Tokenizers are real: CLIP's byte-level BPE vocabulary ships inside open_clip (``bpe_simple_vocab_16e6
.txt.gz``) and is written as a transformers ``CLIPTokenizer`` (vocab.json + merges.txt, 49,408 tokens);
T5's is a small SentencePiece-style Unigram model trained with ``tokenizers`` on sentences made from
CLIP's word list, saved as a ``T5TokenizerFast``. Everything is deterministic given ``seed``.

Command line: ``python scripts/make_tiny_pipelines.py OUT_DIR`` writes ``OUT_DIR/sd3`` and ``OUT_DIR/flux``.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import rlgen  # noqa: F401  (torchvision shim: must precede transformers' CLIP and diffusers pipelines)
import torch

IMAGE_SIZE = 64          # pixels; the latent is 8×8 (VAE factor 8)
T5_VOCAB = 600           # Unigram pieces (specials included)
CLIP_CONTEXT = 77


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------
def _open_clip_bpe() -> list[str]:
    """The merge lines of CLIP's BPE (open_clip's copy of OpenAI's file), header dropped."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # locate the file without importing open_clip
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return lines[1:49152 - 256 - 2 + 1]  # the 48,894 merges OpenAI's tokenizer uses


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """A transformers ``CLIPTokenizer`` folder with OpenAI CLIP's real 49,408-token vocabulary (tokenizer.json)."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _open_clip_bpe()
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                        model_max_length=CLIP_CONTEXT, pad_token="<|endoftext|>")
    tok.save_pretrained(str(out))
    return out


def _corpus(n_sentences: int = 3000, seed: int = 0) -> list[str]:
    """English-like sentences from the most frequent whole words of CLIP's BPE vocabulary."""
    words = [m.split()[1][:-4] for m in _open_clip_bpe()[:20000] if m.split()[1].endswith("</w>")]
    words = [w for w in dict.fromkeys(words) if w.isascii() and w.isalpha() and len(w) > 1][:2000]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n_sentences)]


def write_t5_tokenizer(out_dir: str | Path, vocab_size: int = T5_VOCAB, seed: int = 0) -> Path:
    """A ``T5TokenizerFast`` folder: a Unigram model trained offline, T5's specials and ``</s>`` suffix."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_corpus(seed=seed), trainer=trainer)
    # The trainer's scores differ slightly from run to run (float sums, hash order of rare characters):
    # round them to 0.01 and fix the order (specials, then score, then piece) so a seed gives one file.
    pieces = json.loads(tok.to_str())["model"]["vocab"]
    specials, rest = pieces[:3], sorted(((p, round(s, 2)) for p, s in pieces[3:]), key=lambda ps: (-ps[1], ps[0]))
    tok.model = models.Unigram([(p, s) for p, s in specials] + rest, unk_id=2)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------
def _clip_config(hidden: int, projection: int, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=CLIP_CONTEXT,
                          projection_dim=projection, hidden_act="quick_gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _t5_encoder(d_model: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                   is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg)


def _vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=IMAGE_SIZE,
                         scaling_factor=scaling, shift_factor=shift, use_quant_conv=False,
                         use_post_quant_conv=False)


def _save(pipe, out_dir: str | Path) -> Path:
    from rlgen.models import quiet_hf_progress

    out = Path(out_dir)
    with quiet_hf_progress():
        pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``StableDiffusion3Pipeline`` (SD3.5-Medium layout) to ``out_dir``; returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    out = Path(out_dir)
    tok_dir = write_clip_tokenizer(out / "_tok_clip")
    t5_dir = write_t5_tokenizer(out / "_tok_t5", seed=seed)
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_tok, t5_tok = CLIPTokenizer.from_pretrained(str(tok_dir)), T5TokenizerFast.from_pretrained(str(t5_dir))
    torch.manual_seed(seed)
    # Two CLIPs of different widths (real SD3: 768 and 1280) so a swapped encoder cannot go unnoticed.
    te1 = CLIPTextModelWithProjection(_clip_config(32, 32))
    te2 = CLIPTextModelWithProjection(_clip_config(48, 48))
    te3 = _t5_encoder(96, len(t5_tok))  # T5 width ≥ the CLIP concat (80): the pipeline pads CLIP to it
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=32,
        pooled_projection_dim=80, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
    vae = _vae(scaling=1.5305, shift=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
                                    text_encoder_3=te3, tokenizer_3=t5_tok)
    _save(pipe, out)
    _rmtree(tok_dir), _rmtree(t5_dir)
    return out


def build_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``FluxPipeline`` (FLUX.1-dev layout: guidance embedding) to ``out_dir``; returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast

    out = Path(out_dir)
    tok_dir = write_clip_tokenizer(out / "_tok_clip")
    t5_dir = write_t5_tokenizer(out / "_tok_t5", seed=seed)
    clip_tok, t5_tok = CLIPTokenizer.from_pretrained(str(tok_dir)), T5TokenizerFast.from_pretrained(str(t5_dir))
    torch.manual_seed(seed + 1)
    te1 = CLIPTextModel(_clip_config(32, 32))
    te2 = _t5_encoder(64, len(t5_tok))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    vae = _vae(scaling=0.3611, shift=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te1,
                        tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=t5_tok)
    _save(pipe, out)
    _rmtree(tok_dir), _rmtree(t5_dir)
    return out


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def build_all(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    return {"sd3": build_tiny_sd3(out / "sd3", seed), "flux": build_tiny_flux(out / "flux", seed)}
