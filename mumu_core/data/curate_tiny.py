"""Tiny random models of the classes ``curate`` loads, for tests, benchmarks and dry runs.

- ``build_tiny_image_classifier``: a ``ViTForImageClassification`` + ``ViTImageProcessor`` with the
  given labels (the SFW and watermark filters load it through ``AutoModelForImageClassification``
  like Falconsai/nsfw_image_detection or a SigLIP watermark classifier).
- ``build_tiny_people_detector``: an ``RTDetrForObjectDetection`` with a ``person`` label and the
  RT-DETR image processor (loaded through ``AutoModelForObjectDetection`` like
  PekingU/rtdetr_r50vd_coco_o365).
- ``build_tiny_llava_next``: a ``LlavaNextForConditionalGeneration`` (CLIP vision tower + Llama) with a
  ``LlavaNextProcessor`` (word-level tokenizer, a chat template, the ``<image>`` token).

Outputs are random: they exercise the code path of the real weights, never judge images. The
classifiers' target label and the detector's classes start unlikely (a dry run at
default thresholds keeps images); tests pick thresholds from the scores they measure. The tiny
LLaVA's words are person nouns and its generation config suppresses special tokens, so its
captions are never empty and the bootstrap's person rule finds a person in them (what the
curate -> bootstrap -> stage-2 test needs).
"""

from __future__ import annotations

import json
from pathlib import Path

# Words of the tiny LLaVA's vocabulary: person nouns (the bootstrap's is_person rule) and a few others.
LLAVA_WORDS = "man woman girl boy person a photo of".split()
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_image_classifier(
    folder: str | Path, labels: tuple[str, ...] = ("normal", "nsfw"), seed: int = 0
) -> Path:
    """Save a ~20k-parameter random ViT image classifier with ``labels`` (id2label order)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(cfg)
    with torch.no_grad():  # the last label (the one filtered on) starts unlikely: a dry run keeps images
        model.classifier.bias.zero_()
        model.classifier.bias[-1] = -1.5
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_tiny_people_detector(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random RT-DETR detector whose labels are ``{0: "person", 1: "dog"}``."""
    import torch
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone = RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    cfg = RTDetrConfig(
        backbone_config=backbone,
        encoder_in_channels=[16, 16, 16],
        encoder_hidden_dim=16,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        hidden_expansion=0.5,
        d_model=16,
        decoder_in_channels=[16, 16, 16],
        decoder_ffn_dim=32,
        decoder_attention_heads=2,
        decoder_layers=1,
        decoder_n_points=2,
        num_queries=10,
        num_denoising=0,
        id2label={0: "person", 1: "dog"},
        label2id={"person": 0, "dog": 1},
        use_pretrained_backbone=False,
        initializer_range=0.2,  # the default 0.01 makes a 1-layer random decoder output ~0 everywhere
    )
    torch.manual_seed(seed)
    model = RTDetrForObjectDetection(cfg)
    with torch.no_grad():
        # Random class weights (initialised to 0 otherwise: every score would be the prior) around
        # sigmoid(-3) ~ 0.05, so at the default threshold a dry run finds few persons.
        head = model.model.decoder.class_embed[-1]
        head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
        head.bias.fill_(-3.0)
    model.save_pretrained(folder)
    RTDetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def _word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(LLAVA_SPECIALS + LLAVA_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_tiny_llava_next(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-NeXT (CLIP 28 px tower, 2-layer Llama) with its processor."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer()
    vision = CLIPVisionConfig(
        image_size=28,
        patch_size=14,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    pinpoints = [[28, 28], [28, 56], [56, 28]]
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg)
    special_ids = [tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS if t != "</s>"]
    # Never a special token, and never EOS first: the random model's captions are words, never empty.
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        suppress_tokens=special_ids,
        begin_suppress_tokens=[tok.eos_token_id],
    )
    model.save_pretrained(folder)
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=pinpoints,
    )
    LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    return folder


def build_tiny_curate_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """All curate models under ``root``: sfw/, watermark/, people/, llava/ (folder paths by role)."""
    root = Path(root)
    out = {
        "sfw": build_tiny_image_classifier(root / "sfw", ("normal", "nsfw"), seed),
        "watermark": build_tiny_image_classifier(root / "watermark", ("no_watermark", "watermark"), seed + 1),
        "people": build_tiny_people_detector(root / "people", seed + 2),
        "llava": build_tiny_llava_next(root / "llava", seed + 3),
    }
    (root / "curate_models.json").write_text(json.dumps({k: str(v) for k, v in out.items()}, indent=2))
    return out
