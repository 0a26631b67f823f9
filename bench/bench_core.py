"""Core cost benchmark: what MUMU's long multimodal contexts cost. Not a test.

1. Encoder wall time vs tokens per image (the tiny random Idefics2 on this CPU).
2. UNet per-step wall time with a 77 vs 1000 vs 3000 token context, as ratios in one run, on a
   mid-size random UNet: SDXL's block layout and 2048-d cross-attention with a quarter of SDXL's
   channels and fewer transformer layers, at a 32x32 latent (256 px), so it runs on a CPU.
3. FLOPs at real size, counted on the meta device (no weights, no memory):
   Idefics2-8b encoder at 324 and 1296 tokens per image (2 images + text), the 16-layer connector,
   and one SDXL UNet step (CFG batch 2, 1024 px) at 77 / 1000 / 3000 context tokens.

Run: ``python bench/bench_core.py [--quick]``. Writes bench/results/core.json and prints ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mumu_core.connector import MumuConnector  # noqa: E402
from mumu_core.presets import REAL, SDXL_UNET_CONFIG  # noqa: E402

# HuggingFaceM4/idefics2-8b's config.json (vision SigLIP-so400m, text Mistral-7B), written out so the
# count needs no download.
IDEFICS2_8B = {
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 980,
        "patch_size": 14,
    },
    "perceiver_config": {
        "hidden_size": 4096,
        "resampler_n_latents": 64,
        "resampler_depth": 3,
        "resampler_n_heads": 16,
        "resampler_head_dim": 96,
        "num_key_value_heads": 4,
    },
    "text_config": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32003,
        "max_position_embeddings": 32768,
    },
    "image_token_id": 32001,
}
TEXT_TOKENS = 24  # words around the images in a typical prompt


def interleaved_min(fns: dict, rounds: int) -> dict:
    """Seconds per call of each ``fns`` entry: the minimum over ``rounds`` rounds that run every entry
    in turn, after one warm-up round. Interleaving and the minimum keep ratios meaningful on a CPU shared
    with other jobs (load spikes hit all entries alike, and the minimum is the least disturbed run)."""
    times: dict = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -- 1. encoder wall time ----------------------------------------------------------------------------


# A mid-size Idefics2 (same classes as idefics2-8b): big enough that compute, not Python overhead,
# dominates on a CPU, small enough to build in seconds.
MID_VLM = {
    "vision_config": {
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "image_size": 504,
        "patch_size": 14,
    },
    "perceiver_config": {
        "hidden_size": 512,
        "resampler_n_latents": 4,
        "resampler_depth": 1,
        "resampler_n_heads": 2,
        "resampler_head_dim": 8,
        "num_key_value_heads": 1,
    },
    "text_config": {
        "model_type": "mistral",
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "pad_token_id": 0,
    },
}


@torch.no_grad()
def bench_encoder(tokens: list[int], repeat: int) -> dict:
    import dataclasses
    import tempfile

    from PIL import Image

    from mumu_core.encoder import MumuEncoder
    from mumu_core.presets import TINY, build_vlm_folder
    from mumu_core.prompt import InterleavedPrompt

    preset = dataclasses.replace(TINY, name="bench-mid", vlm=MID_VLM)
    with tempfile.TemporaryDirectory() as d:
        encoder = MumuEncoder.from_pretrained(build_vlm_folder(preset, Path(d) / "vlm"))
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (200, 300), (30, 30, 200))]
    text = "a <image> man and his <image> dog in a park"
    prompts = {t: InterleavedPrompt.parse(text, images, tokens_per_image=t) for t in tokens}
    seconds = interleaved_min({t: (lambda p=p: encoder.encode([p])) for t, p in prompts.items()}, repeat)
    rows = {
        t: {"sequence_tokens": encoder.encode([p]).hidden_states.shape[1], "seconds": seconds[t]}
        for t, p in prompts.items()
    }
    base = rows[tokens[0]]["seconds"]
    for r in rows.values():
        r["ratio"] = r["seconds"] / base
    return {
        "model": "random Idefics2 (vision 384x4 layers, LM 512x4 layers), perceiver removed, 2 images, CPU",
        "per_tokens_per_image": rows,
    }


# -- 2. UNet step wall time vs context length -------------------------------------------------------

MID_UNET = {
    **SDXL_UNET_CONFIG,
    "block_out_channels": [80, 160, 320],  # SDXL / 4
    "attention_head_dim": [5, 10, 20],  # SDXL's head counts (head width 16 instead of 64)
    "transformer_layers_per_block": [1, 1, 2],  # SDXL: [1, 2, 10]
    "norm_num_groups": 16,
}


@torch.no_grad()
def bench_unet_context(contexts: list[int], repeat: int, latent: int = 32) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MID_UNET).eval()
    x = torch.randn(2, 4, latent, latent)  # CFG batch
    added = {
        "text_embeds": torch.randn(2, 1280),
        "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2),
    }
    ctxs = {n: torch.randn(2, n, 2048) for n in contexts}
    seconds = interleaved_min(
        {n: (lambda c=c: unet(x, 500, c, added_cond_kwargs=added)) for n, c in ctxs.items()}, repeat
    )
    rows = {n: {"seconds": seconds[n]} for n in contexts}
    base = rows[contexts[0]]["seconds"]
    for r in rows.values():
        r["ratio"] = r["seconds"] / base
    return {
        "model": f"random UNet2DConditionModel, SDXL layout at 1/4 channels, transformer layers "
        f"{MID_UNET['transformer_layers_per_block']}, cross-attention 2048, latent {latent}x{latent}, batch 2, CPU",
        "per_context_tokens": rows,
    }


# -- 3. FLOPs at real size (meta device) -------------------------------------------------------------


def connector_flops(connector: MumuConnector, n: int) -> int:
    """The connector's forward checks its mask's values (meta tensors have none), so count its parts:
    input projection, the identical blocks (one counted), output projection and the pooling query."""
    cfg = connector.config
    h = torch.zeros(1, n, cfg.in_dim, device="meta")
    x = torch.zeros(1, n, cfg.width, device="meta")
    bias = torch.zeros(1, 1, 1, n, device="meta")
    q = torch.zeros(1, 1, cfg.width, device="meta")
    total = flops(lambda: connector.proj_in(h))
    total += cfg.layers * flops(lambda: connector.blocks[0](x, bias))
    total += flops(lambda: connector.proj_context(connector.norm_out(x)))
    total += flops(lambda: connector.proj_pooled(connector.pool_attn(q, x, x, need_weights=False)[0]))
    return total


def real_flops(tokens_per_image: list[int], contexts: list[int]) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import Idefics2Config, Idefics2Model

    with torch.device("meta"):
        vlm = Idefics2Model(Idefics2Config(**IDEFICS2_8B))
        connector = MumuConnector(REAL.connector)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    vcfg = IDEFICS2_8B["vision_config"]
    enc = {}
    for t in tokens_per_image:
        side = int(t**0.5) * vcfg["patch_size"]
        n_images = 2
        px = torch.zeros(n_images, 3, side, side, device="meta")
        h = torch.zeros(n_images, t, vcfg["hidden_size"], device="meta")
        # The vision embeddings compute position buckets from concrete mask values, which the meta device
        # cannot; their cost is the patch convolution. The 27 encoder layers are identical: count one.
        patch = flops(lambda px=px: vlm.vision_model.embeddings.patch_embedding(px))
        layer = flops(lambda h=h: vlm.vision_model.encoder.layers[0](h, attention_mask=None))
        proj = flops(lambda h=h: vlm.connector.modality_projection(h))
        n = n_images * (t + 2) + TEXT_TOKENS  # image tokens, <fake_token_around_image> pairs, text
        embeds = torch.zeros(1, n, 4096, device="meta")
        # A prepared 4-D mask skips transformers' data-dependent mask checks (they call .item()).
        mask = torch.ones(1, 1, n, n, dtype=torch.bool, device="meta").tril()
        llm = flops(
            lambda e=embeds, m=mask: vlm.text_model(inputs_embeds=e, attention_mask=m, use_cache=False)
        )
        conn = connector_flops(connector, n)
        enc[t] = {
            "sequence_tokens": n,
            "vision_tflops": (patch + vcfg["num_hidden_layers"] * layer) / 1e12,
            "modality_projection_tflops": proj / 1e12,
            "language_model_tflops": llm / 1e12,
            "connector_tflops": conn / 1e12,
        }
        enc[t]["encoder_total_tflops"] = sum(v for k, v in enc[t].items() if k.endswith("tflops"))
    unet_rows = {}
    x = torch.zeros(2, 4, 128, 128, device="meta")
    added = {"text_embeds": torch.zeros(2, 1280, device="meta"), "time_ids": torch.zeros(2, 6, device="meta")}
    t = torch.tensor([500, 500], device="meta")
    for n in contexts:
        ctx = torch.zeros(2, n, 2048, device="meta")
        unet_rows[n] = {"step_tflops": flops(lambda c=ctx: unet(x, t, c, added_cond_kwargs=added)) / 1e12}
    base = unet_rows[contexts[0]]["step_tflops"]
    for r in unet_rows.values():
        r["ratio"] = r["step_tflops"] / base
    return {
        "encoder": {
            "model": "Idefics2-8b without perceiver (2 images + text) + MUMU connector (16 layers, width 1024)",
            "per_tokens_per_image": enc,
        },
        "unet_step": {
            "model": "SDXL base UNet, 1024 px (128x128 latent), CFG batch 2",
            "per_context_tokens": unet_rows,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "core.json")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3  # timed rounds (after one warm-up round)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    contexts = [77, 1000, 3000]

    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
            # Wall times on a shared CPU are only as good as the load allowed; FLOPs are exact.
            "load_average_at_start": os.getloadavg(),
        },
        "flops_real_size": real_flops([324, 1296], contexts),
    }
    fr = results["flops_real_size"]
    print("== FLOPs at real size (meta device) ==")
    for t, r in fr["encoder"]["per_tokens_per_image"].items():
        print(
            f"  encoder, {t:>4} tokens/image ({r['sequence_tokens']} tokens): {r['encoder_total_tflops']:.2f} TFLOP "
            f"(vision {r['vision_tflops']:.2f}, LLM {r['language_model_tflops']:.2f}, connector {r['connector_tflops']:.3f})"
        )
    e = fr["encoder"]["per_tokens_per_image"]
    print(
        f"  encoder ratio 1296 vs 324 tokens/image: {e[1296]['encoder_total_tflops'] / e[324]['encoder_total_tflops']:.2f}x"
    )
    for n, r in fr["unet_step"]["per_context_tokens"].items():
        print(
            f"  SDXL UNet step, {n:>4} context tokens: {r['step_tflops']:.2f} TFLOP  ratio vs 77: {r['ratio']:.3f}x"
        )

    results["unet_step_wall"] = bench_unet_context(contexts, repeat)
    print("== UNet step wall time vs context (mid-size random UNet, CPU) ==")
    for n, r in results["unet_step_wall"]["per_context_tokens"].items():
        print(f"  {n:>4} context tokens: {r['seconds'] * 1000:8.1f} ms/step  ratio vs 77: {r['ratio']:.2f}x")

    results["encoder_wall"] = bench_encoder([64, 324, 1296], repeat)
    print("== encoder wall time vs tokens per image (mid-size random Idefics2, CPU) ==")
    for t, r in results["encoder_wall"]["per_tokens_per_image"].items():
        print(
            f"  {t:>4} tokens/image ({r['sequence_tokens']:>4} tokens): {r['seconds'] * 1000:8.1f} ms  ratio: {r['ratio']:.2f}x"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
