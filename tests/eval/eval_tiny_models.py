"""Tiny randomly initialised metric models built from the same classes as the real ones.

Imported by the eval tests as a plain module (pytest puts this folder on sys.path; tests/ has no
packages)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

SCRFD_INPUT = 64  # the tests run the detector at 64 px instead of 640 to stay fast


def build_tiny_clip(folder) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)


def build_tiny_dino(folder) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    cfg = ViTConfig(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2)  # fmt: skip
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def build_tiny_grounding_dino(folder) -> None:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3"])  # fmt: skip
    bert = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    # decoder_layers=2: transformers' weight tying of the box heads assumes more than one decoder layer.
    cfg = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=32, encoder_layers=1,
                              decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                              decoder_attention_heads=2, num_queries=10, num_feature_levels=3, encoder_n_points=2,
                              decoder_n_points=2, max_text_len=32)  # fmt: skip
    torch.manual_seed(2)
    GroundingDinoForObjectDetection(cfg).eval().save_pretrained(folder)
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        ".",
        "man",
        "dog",
        "face",
        "cat",
        "stuffed",
        "animal",
    ]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    ip = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)


def build_tiny_arcface(path) -> None:
    """Random conv net with glintr100's signature: (N, 3, 112, 112) -> (N, 512)."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 13 * 13, 512),
    ).eval()  # fmt: skip
    _export(net, (torch.zeros(1, 3, 112, 112),), path, input_names=["input.1"], output_names=["embedding"],
            dynamic_axes={"input.1": {0: "n"}, "embedding": {0: "n"}})  # fmt: skip


def _export(net, args, path, **kw) -> None:
    # The TorchScript exporter needs only the onnx package; the default dynamo exporter would also
    # need onnxscript. Its deprecation warnings are noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, args, str(path), dynamo=False, **kw)


# Landmark offsets (stride units) from the anchor centre: eyes, nose, mouth corners.
SCRFD_KPS = [-0.3, -0.3, 0.3, -0.3, 0.0, 0.0, -0.25, 0.35, 0.25, 0.35]


class _BrightSquareScrfd(torch.nn.Module):
    """SCRFD's 9-output layout with known behaviour: at stride 16, an anchor fires where its 16x16
    cell is bright; boxes are the anchor centre +-1 stride; landmarks are fixed offsets. Strides 8
    and 32 never fire. Known answers for the decode without a trained detector."""

    def __init__(self, batched: bool) -> None:
        super().__init__()
        self.batched = batched
        self.register_buffer("kps", torch.tensor(SCRFD_KPS))

    def forward(self, x):
        bright = x.mean(1, keepdim=True)  # (1, 1, H, W), ~1 for white, ~-1 for black
        outs_s, outs_b, outs_k = [], [], []
        for stride in (8, 16, 32):
            pooled = torch.nn.functional.avg_pool2d(bright, stride)  # (1, 1, h, w)
            n = pooled.shape[2] * pooled.shape[3]
            flat = pooled.permute(0, 2, 3, 1).reshape(n, 1).repeat_interleave(2, 0)  # 2 anchors per cell
            score = torch.sigmoid(30 * (flat - 0.5)) * (1.0 if stride == 16 else 0.0)
            outs_s.append(score)
            outs_b.append(torch.ones(2 * n, 4) + 0 * flat)
            outs_k.append(self.kps.expand(2 * n, 10) + 0 * flat)
        outs = outs_s + outs_b + outs_k
        return tuple(o[None] for o in outs) if self.batched else tuple(outs)


def build_scrfd(path, batched: bool = False) -> None:
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    _export(_BrightSquareScrfd(batched).eval(), (torch.zeros(1, 3, SCRFD_INPUT, SCRFD_INPUT),), path,
            input_names=["input.1"], output_names=names)  # fmt: skip


def build_all(root):
    """Every metric model in the layout docs/EVAL.md describes; returns ``root``."""
    build_tiny_clip(root / "clip")
    build_tiny_dino(root / "dino")
    build_tiny_grounding_dino(root / "gdino")
    (root / "antelopev2").mkdir()
    build_tiny_arcface(root / "antelopev2" / "glintr100.onnx")
    build_scrfd(root / "antelopev2" / "scrfd_10g_bnkps.onnx")
    return root


def noise(seed: int, size=(64, 64), lo: int = 0, hi: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(lo, hi, (size[1], size[0], 3), dtype=np.uint8))


def face_image(seed: int, size: int = 64, cell: tuple[int, int] = (1, 1)) -> Image.Image:
    """Black image with one bright textured 16x16 'face' in the given stride-16 cell (col, row)."""
    im = Image.new("RGB", (size, size))
    scale = size / SCRFD_INPUT
    side = round(16 * scale)
    im.paste(noise(seed, (side, side), 200, 256), (round(cell[0] * 16 * scale), round(cell[1] * 16 * scale)))
    return im
