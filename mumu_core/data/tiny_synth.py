"""Tiny random models for the synthetic-data commands (``prompts``, ``synth``, ``score``).

Built from the same library classes as the real ones, saved with ``save_pretrained``, so loading them
runs the real code path; their outputs are random (use them to exercise code, never to judge data):

- ``build_tiny_pickscore``: a ``CLIPModel`` + ``CLIPProcessor`` folder (PickScore_v1 is a CLIP-H).
- ``build_tiny_instruct_llm``: a ``LlamaForCausalLM`` + byte-level tokenizer with a chat template.
- ``add_sdxl_text_encoders``: ``text_encoder/`` (``CLIPTextModel``), ``text_encoder_2/``
  (``CLIPTextModelWithProjection``), ``tokenizer/``, ``tokenizer_2/`` and ``model_index.json`` added to a
  diffusers SDXL folder (unet/, vae/, scheduler/), making it a complete ``StableDiffusionXLPipeline``
  folder whose text widths fit the UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode table: a vocab over it encodes any text, no unknown tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tiny_clip_tokenizer(max_length: int = 77):
    """A character-level ``CLIPTokenizer`` (no merges): 514 tokens, CLIP's special tokens last."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[c] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clip_text_config(tok, hidden: int, projection_dim: int | None = None, layers: int = 2) -> dict:
    cfg = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if projection_dim is not None:
        cfg["projection_dim"] = projection_dim
    return cfg


def build_tiny_pickscore(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random ``CLIPModel`` with its ``CLIPProcessor`` (logit scale 100, like PickScore_v1)."""
    import math

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=_clip_text_config(tok, 32, layers=1),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # PickScore_v1's learnt scale is at CLIP's cap
    model.save_pretrained(folder)
    ip = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


def tiny_chat_tokenizer():
    """A byte-level BPE tokenizer without merges plus ChatML-style special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_instruct_llm(folder: str | Path, seed: int = 0) -> Path:
    """Save a ~50k-parameter random ``LlamaForCausalLM`` and a tokenizer with a chat template."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_chat_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def add_sdxl_text_encoders(folder: str | Path, context_dim: int, pooled_dim: int, seed: int = 0) -> Path:
    """Add SDXL's two text encoders + tokenizers and ``model_index.json`` to a diffusers SDXL folder.

    SDXL concatenates the penultimate hidden states of both encoders (``context_dim`` = the UNet's
    ``cross_attention_dim``) and takes the second encoder's projected pooled output (``pooled_dim``).
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers SDXL folder (no unet/config.json)")
    tok = tiny_clip_tokenizer()
    w1 = context_dim // 2
    w2 = context_dim - w1
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(**_clip_text_config(tok, w1))).save_pretrained(folder / "text_encoder")
    enc2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**_clip_text_config(tok, w2, projection_dim=pooled_dim))
    )
    enc2.save_pretrained(folder / "text_encoder_2")
    tok.save_pretrained(folder / "tokenizer")
    tok.save_pretrained(folder / "tokenizer_2")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
