"""Tiny random GroundingDINO, SAM and depth models for tests, benchmarks and the mini world.

They are built from the same transformers classes as the real models (``GroundingDinoForObjectDetection``
with a Swin backbone and a BERT text side; ``DepthAnythingForDepthEstimation`` with a DINOv2 backbone)
and saved with ``save_pretrained``, so loading them runs exactly the code path of the real weights.
Their outputs are random: use them to exercise code, never to judge detections.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    ", a an the and his her man woman dog cat red car head face person tree ball bench on with of girl boy "
    "sky blue big"
).split()


def bert_like_vocab(words: list[str] = WORDS) -> list[str]:
    """A small vocab with bert-base-uncased's ids for [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103, "." 1012 and "?" 1029.

    GroundingDINO hard-codes those ids (``SPECIAL_TOKENS``) to split the text into phrases for its
    text self-attention mask; matching them makes the tiny model take that code path like the real one.
    """
    vocab = [f"[unused{i}]" for i in range(1030)]
    for i, tok in {
        0: "[PAD]",
        100: "[UNK]",
        101: "[CLS]",
        102: "[SEP]",
        103: "[MASK]",
        1012: ".",
        1029: "?",
    }.items():
        vocab[i] = tok
    return vocab + [w for w in words if w not in vocab]


def build_tiny_grounding_dino(folder: str | Path, seed: int = 0) -> Path:
    """Save a ~200k-parameter random GroundingDINO + processor (BERT tokenizer from a small vocab file)."""
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    swin = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_indices=[2, 3, 4],
    )
    bert = BertConfig(
        vocab_size=len(bert_like_vocab()),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    cfg = GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        num_queries=30,
        encoder_layers=1,
        decoder_layers=2,  # 1 breaks the tied bbox_embed keys in transformers 5
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        d_model=32,  # GroupNorm(32, d_model) needs a multiple of 32
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    import torch

    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(cfg).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(bert_like_vocab()) + "\n")
    # transformers 5 takes the vocab file path as `vocab` (the old `vocab_file` kwarg is ignored).
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    # >= 96 px: the 4th feature level (stride 64) must be wider than 1x1 for its GroupNorm.
    ip = GroundingDinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


def build_tiny_depth(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Depth Anything model + DPT image processor (keep aspect, multiple of 14)."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone = Dinov2Config(
        image_size=28,
        patch_size=14,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 16],
        fusion_hidden_size=8,
        head_hidden_size=8,
        patch_size=14,
        reassemble_factors=[2, 1],
    )
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(cfg).save_pretrained(folder)
    # Same processor settings as Depth Anything (keep aspect, multiple of 14), at a tiny size.
    DPTImageProcessor(
        size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14
    ).save_pretrained(folder)
    return folder


def build_tiny_sam(folder: str | Path, seed: int = 0) -> Path:
    """Save a ~40k-parameter random SAM (``SamModel``, 64 px input) + ``SamProcessor`` (mumu_core.segment)."""
    import torch
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            mlp_dim=64,
            global_attn_indexes=[1],
            window_size=4,
            num_pos_feats=8,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
        ),
    )
    torch.manual_seed(seed)
    model = SamModel(cfg)
    # At random init the mask logits are noise around 0, so a small box is often empty in all three
    # candidates. A constant hypernetwork output turns each mask into the sum of the (mostly positive,
    # GELU'd) upscaled image features: masks cover most of a box, and still depend on the image.
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.zero_()
            mlp.proj_out.bias.fill_(1.0)
    model.save_pretrained(folder)
    ip = SamImageProcessor(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    SamProcessor(image_processor=ip).save_pretrained(folder)
    return folder
