"""One-command GPU check at real size with random weights (no downloads): run by ``bash bench/gpu_check.sh``.

1. Encoder: Idefics2-8b-shaped VLM (perceiver removed) + the 16-layer connector, bf16, 2 images + text at
   324 and 1296 tokens per image: time and peak memory.
2. SDXL base UNet step at 1024 px, CFG batch 2 (zero negative + positive), 77 / 1000 / 3000 context tokens,
   with and without the cross-attention K/V cache (``mumu_core.kv_cache``): time per step.
3. Encode -> release -> sample: peak memory of each phase (the VLM leaves the GPU before the UNet samples).
4. One training step of the paper's Table 1 recipe on one GPU: VLM LoRA 8 + connector full + UNet LoRA 8,
   ViT frozen, bf16 weights with fp32 trainable masters, activation checkpointing, AdamW; time, peak memory
   and MFU (model FLOPs counted with FlopCounterMode on the meta device / step time / the GPU's peak).

``--tiny`` runs the same code at the tiny preset's sizes (CPU, seconds; tests/bench/test_gpu_check.py), so
the script cannot rot without a GPU. Writes bench/results/gpu.json (or --out) with the device name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_core import IDEFICS2_8B  # noqa: E402
from mumu_core.connector import MumuConnector  # noqa: E402
from mumu_core.kv_cache import KVCache, install_kv_cache, uninstall_kv_cache  # noqa: E402
from mumu_core.presets import REAL, TINY  # noqa: E402

# Dense bf16 tensor-core peaks (vendor data sheets), for MFU. Unknown devices get no MFU, never a guess.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    name: str
    vlm: dict
    connector: object
    unet: dict
    tokens_per_image: tuple[int, ...]
    contexts: tuple[int, ...]
    resolution: int
    text_tokens: int
    train_images: int
    train_batch: int
    steps_timed: int


REAL_SIZES = Sizes(
    "real", IDEFICS2_8B, REAL.connector, REAL.unet, (324, 1296), (77, 1000, 3000), 1024, 24, 3, 1, 5
)
TINY_SIZES = Sizes("tiny", TINY.vlm, TINY.connector, TINY.unet, (4, 16), (8, 32, 96), 64, 6, 2, 1, 2)


class Timer:
    """Wall time of a block on the device (CUDA events when on a GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_vlm(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    from transformers import Idefics2Config, Idefics2Model

    from mumu_core.encoder import remove_perceiver

    with default_dtype(dtype), torch.device(device):
        vlm = Idefics2Model(Idefics2Config(**sizes.vlm))
    remove_perceiver(vlm)
    return vlm.eval()


def build_connector(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> MumuConnector:
    with torch.device(device):
        return MumuConnector(sizes.connector).to(dtype).eval()


def build_unet(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with default_dtype(dtype), torch.device(device):
        return UNet2DConditionModel(**sizes.unet).eval()


def encoder_inputs(sizes: Sizes, tokens: int, images: int, device: torch.device, dtype: torch.dtype):
    patch = sizes.vlm["vision_config"]["patch_size"]
    side = int(round(tokens**0.5)) * patch
    px = torch.randn(images, 3, side, side, device=device, dtype=dtype)
    text = torch.randn(
        1, sizes.text_tokens, sizes.vlm["text_config"]["hidden_size"], device=device, dtype=dtype
    )
    return px, text


def encode(vlm, connector, px: torch.Tensor, text: torch.Tensor):
    """The encoder's compute path: ViT -> modality projection -> LLM over image + text tokens -> connector.

    Random text embeddings stand in for the tokenizer's (same shapes and cost; no tokenizer files)."""
    feats = vlm.vision_model(pixel_values=px).last_hidden_state
    img = vlm.connector.modality_projection(feats).reshape(1, -1, text.shape[-1])
    embeds = torch.cat([img, text], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    hidden = vlm.text_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    context, pooled = connector(hidden.to(next(connector.parameters()).dtype), mask.bool())
    return context, pooled


@torch.no_grad()
def bench_encoder(sizes: Sizes, device: torch.device, dtype: torch.dtype, vlm, connector) -> dict:
    rows = {}
    for t in sizes.tokens_per_image:
        px, text = encoder_inputs(sizes, t, 2, device, dtype)
        encode(vlm, connector, px, text)  # warm-up
        reset_peak(device)
        times = []
        for _ in range(max(1, sizes.steps_timed - 2)):
            with Timer(device) as tm:
                context, _ = encode(vlm, connector, px, text)
            times.append(tm.seconds)
        rows[t] = {
            "sequence_tokens": context.shape[1],
            "seconds": statistics.median(times),
            "peak_gib": peak_gib(device),
        }
    return {
        "model": f"Idefics2 ({sizes.name}) without perceiver + connector, 2 images + {sizes.text_tokens} text tokens",
        "per_tokens_per_image": rows,
    }


def unet_inputs(sizes: Sizes, n: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lat = sizes.resolution // 8
    ctx_dim = sizes.unet["cross_attention_dim"]
    pooled_dim = (
        sizes.unet["projection_class_embeddings_input_dim"] - 6 * sizes.unet["addition_time_embed_dim"]
    )
    x = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    pos = torch.randn(1, n, ctx_dim, generator=g).to(device, dtype)
    context = torch.cat([torch.zeros_like(pos), pos])  # zero negative, positive (diffusers' CFG order)
    r = float(sizes.resolution)
    added = {
        "text_embeds": torch.cat([torch.zeros(1, pooled_dim), torch.randn(1, pooled_dim, generator=g)]).to(
            device, dtype
        ),
        "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * 2).to(device, dtype),
    }
    return x, torch.tensor([500, 500], device=device), context, added


@torch.no_grad()
def bench_unet(sizes: Sizes, device: torch.device, dtype: torch.dtype, unet) -> dict:
    rows = {}
    cache = KVCache()
    for n in sizes.contexts:
        x, t, ctx, added = unet_inputs(sizes, n, device, dtype)
        row = {}
        for mode in ("uncached", "cached"):
            if mode == "cached":
                install_kv_cache(unet, cache)
            ref = unet(x, t, ctx, added_cond_kwargs=added).sample  # warm-up (fills the cache when cached)
            times = []
            for _ in range(sizes.steps_timed):
                with Timer(device) as tm:
                    out = unet(x, t, ctx, added_cond_kwargs=added).sample
                times.append(tm.seconds)
            row[f"{mode}_seconds"] = statistics.median(times)
            if mode == "cached":
                row["cache_gib"] = cache.nbytes / 2**30
                row["max_abs_diff_vs_uncached"] = float((out.float() - row.pop("_ref")).abs().max())
                uninstall_kv_cache(unet)
                cache.clear()
            else:
                row["_ref"] = ref.float()
        rows[n] = row
    base = rows[sizes.contexts[0]]["uncached_seconds"]
    for r in rows.values():
        r["uncached_ratio"] = r["uncached_seconds"] / base
        r["cached_ratio"] = r["cached_seconds"] / base
    return {
        "model": f"SDXL UNet ({sizes.name}), {sizes.resolution} px, CFG batch 2",
        "per_context_tokens": rows,
    }


@torch.no_grad()
def encode_release_sample(
    sizes: Sizes, device: torch.device, dtype: torch.dtype, vlm, connector, unet, steps: int
) -> dict:
    """The standalone pipeline's memory pattern: the VLM on the device only while it encodes."""
    out: dict = {}
    unet.to("cpu")
    release(device)
    vlm.to(device)
    connector.to(device)
    reset_peak(device)
    px, text = encoder_inputs(sizes, sizes.tokens_per_image[0], 2, device, dtype)
    with Timer(device) as tm:
        context, pooled = encode(vlm, connector, px, text)
    out["encode"] = {"seconds": tm.seconds, "peak_gib": peak_gib(device)}
    context, pooled = context.to(dtype), pooled.to(dtype)
    vlm.to("cpu")
    connector.to("cpu")
    release(device)
    out["after_release_allocated_gib"] = allocated_gib(device)
    unet.to(device)
    reset_peak(device)
    x, t, _, added = unet_inputs(sizes, context.shape[1], device, dtype)
    ctx = torch.cat([torch.zeros_like(context), context])
    cache = KVCache()
    install_kv_cache(unet, cache)
    with Timer(device) as tm:
        for _ in range(steps):
            x = unet(x, t, ctx, added_cond_kwargs=added).sample
    uninstall_kv_cache(unet)
    out["sample"] = {
        "steps": steps,
        "context_tokens": ctx.shape[1],
        "seconds": tm.seconds,
        "peak_gib": peak_gib(device),
        "kv_cache_gib": cache.nbytes / 2**30,
    }
    cache.clear()
    return out


def train_step(
    sizes: Sizes, device: torch.device, dtype: torch.dtype, vlm, connector, unet, steps: int
) -> dict:
    """Table 1 on one GPU: the trainable parts, bf16 frozen weights, fp32 masters, checkpointing, AdamW."""
    from peft import LoraConfig, inject_adapter_in_model

    from mumu_core.bundle import UNET_LORA_TARGETS
    from mumu_core.encoder import VLM_LORA_TARGETS

    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=VLM_LORA_TARGETS), vlm)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=UNET_LORA_TARGETS), unet)
    for m in (vlm, unet):
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
    connector.requires_grad_(True)
    trainable = [p for m in (vlm, connector, unet) for p in m.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # fp32 masters (train/model.py does the same)
    kwargs = {"use_reentrant": False}
    if hasattr(vlm, "activation_checkpointing_enable"):
        vlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    unet.enable_gradient_checkpointing()
    connector.gradient_checkpointing = True
    for m in (vlm, connector, unet):
        m.to(device).train()
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    b, images = sizes.train_batch, sizes.train_images
    lat = sizes.resolution // 8
    pooled_dim = (
        sizes.unet["projection_class_embeddings_input_dim"] - 6 * sizes.unet["addition_time_embed_dim"]
    )
    r = float(sizes.resolution)

    def one_step() -> float:
        px, text = encoder_inputs(sizes, sizes.tokens_per_image[0], images * b, device, dtype)
        text = text.expand(b, -1, -1)
        with torch.no_grad():  # the ViT is frozen
            feats = vlm.vision_model(pixel_values=px).last_hidden_state
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            img = vlm.connector.modality_projection(feats).reshape(b, -1, text.shape[-1])
            embeds = torch.cat([img, text], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
            hidden = vlm.text_model(
                inputs_embeds=embeds, attention_mask=mask, use_cache=False
            ).last_hidden_state
            context, _pooled = connector(hidden.float(), mask.bool())
            noisy = torch.randn(b, 4, lat, lat, device=device, dtype=dtype)
            added = {
                "text_embeds": torch.zeros(b, pooled_dim, device=device, dtype=dtype),
                "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * b, device=device, dtype=dtype),
            }
            added["text_embeds"] = added["text_embeds"] + _pooled.to(dtype)
            pred = unet(
                noisy, torch.randint(0, 1000, (b,), device=device), context.to(dtype), added_cond_kwargs=added
            ).sample
        loss = F.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    one_step()  # warm-up: allocator, AdamW state
    reset_peak(device)
    times, losses = [], []
    for _ in range(steps):
        with Timer(device) as tm:
            losses.append(one_step())
        times.append(tm.seconds)
    step_s = statistics.median(times)
    return {
        "recipe": "paper Table 1 (stage 1): ViT frozen, VLM LoRA r8, connector full, UNet LoRA r8; bf16 + fp32 "
        "masters, activation checkpointing, AdamW, grad clip 1.0; VAE encode not included (random latents)",
        "batch": b,
        "images_per_prompt": images,
        "tokens_per_image": sizes.tokens_per_image[0],
        "resolution": sizes.resolution,
        "trainable_params": sum(p.numel() for p in trainable),
        "step_seconds": step_s,
        "peak_gib": peak_gib(device),
        "losses_finite": all(math.isfinite(x) for x in losses),
    }


def model_flops_per_train_step(sizes: Sizes) -> float | None:
    if sizes.name != "real":
        return None
    sys.path.insert(0, str(ROOT / "tests" / "train"))
    from bench.bench_train import real_flops

    return float(
        real_flops(batch=sizes.train_batch, images=sizes.train_images, text_tokens=sizes.text_tokens)[
            "flops_per_step"
        ]
    )


def device_peak_flops(name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke run; the test runs this)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    ap.add_argument("--skip-train", action="store_true", help="leave out the training step")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print(
            "error: no CUDA GPU here: bench/gpu_check.sh measures at real size on a GPU "
            "(python bench/gpu_check.py --tiny is the CPU smoke run)",
            file=sys.stderr,
        )
        return 2
    sizes = TINY_SIZES if args.tiny else REAL_SIZES
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    t0 = time.time()
    torch.manual_seed(0)
    res: dict = {
        "device": name,
        "sizes": sizes.name,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }

    def section(title: str) -> None:
        print(f"== {title} ({time.time() - t0:.0f} s) ==", flush=True)

    section("encoder")
    vlm, connector = build_vlm(sizes, device, dtype), build_connector(sizes, device, dtype)
    res["encoder"] = bench_encoder(sizes, device, dtype, vlm, connector)
    for t, r in res["encoder"]["per_tokens_per_image"].items():
        print(
            f"  {t:>4} tokens/image ({r['sequence_tokens']} tokens): {r['seconds'] * 1000:.0f} ms, peak {r['peak_gib']} GiB"
        )
    vlm.to("cpu")
    connector.to("cpu")
    release(device)

    section("UNet step, with and without the K/V cache")
    unet = build_unet(sizes, device, dtype)
    res["unet_step"] = bench_unet(sizes, device, dtype, unet)
    for n, r in res["unet_step"]["per_context_tokens"].items():
        print(
            f"  {n:>4} tokens: uncached {r['uncached_seconds'] * 1000:.0f} ms ({r['uncached_ratio']:.2f}x)  "
            f"cached {r['cached_seconds'] * 1000:.0f} ms ({r['cached_ratio']:.2f}x)  diff {r['max_abs_diff_vs_uncached']:.2e}"
        )

    section("encode -> release -> sample")
    res["encode_release_sample"] = encode_release_sample(
        sizes, device, dtype, vlm, connector, unet, steps=sizes.steps_timed
    )
    print(f"  {json.dumps(res['encode_release_sample'])}")

    if not args.skip_train:
        section("one training step, Table 1 recipe")
        unet.to(device)
        res["train_step"] = train_step(sizes, device, dtype, vlm, connector, unet, steps=2)
        flops = model_flops_per_train_step(sizes)
        peak = device_peak_flops(name) if device.type == "cuda" else None
        tr = res["train_step"]
        tr["model_flops_per_step"] = flops
        tr["device_peak_bf16_flops"] = peak
        tr["mfu"] = flops / tr["step_seconds"] / peak if flops and peak else None
        print(f"  {json.dumps(tr)}")
    res["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str))
    os.replace(tmp, args.out)
    print(f"wrote {args.out} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
