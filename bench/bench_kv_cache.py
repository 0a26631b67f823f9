"""Cross-attention K/V cache benchmark: what a denoising step costs at long MUMU contexts with and without it.

1. FLOPs at real size (meta device, no weights): one SDXL base UNet step, 1024 px, CFG batch 2 (the zero
   negative + the positive, diffusers' order), at 77 / 1000 / 3000 context tokens, uncached (stock
   processors) and cached (``mumu_core.kv_cache`` processors, counted on a step after the one that filled
   the cache: K/V come from the cache, the zero negative's attention is its value vector).
2. Time on this CPU: the same steps on bench_core's reduced SDXL layout (1/4 channels, fewer transformer
   layers, 2048-d cross-attention; ``--latent``, default 32x32), all six variants timed in one run,
   interleaved (minimum over rounds), as ratios to the uncached 77-token step. Each step is timed both as
   wall time and as this process's CPU time (one thread): on a CPU shared with higher-priority jobs the
   wall time mostly measures waiting, the CPU time measures the step's work.

Goal (issue 14): at 1000 tokens a cached step costs <= 1.05x a 77-token step in FLOPs (uncached: 1.15x),
and the CPU wall ratio at 1000 tokens drops by at least a third.

Run: ``python bench/bench_kv_cache.py [--quick]``. Writes bench/results/kv_cache.json and prints ratios.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_core import MID_UNET, flops  # noqa: E402
from mumu_core.kv_cache import KVCache, cache_bytes_per_row, install_kv_cache, uninstall_kv_cache  # noqa: E402
from mumu_core.presets import SDXL_UNET_CONFIG  # noqa: E402

CONTEXTS = [77, 1000, 3000]


def _inputs(latent: int, n: int, device: str, gen: torch.Generator | None = None):
    kw = {"device": device}
    x = (
        torch.zeros(2, 4, latent, latent, **kw)
        if device == "meta"
        else torch.randn(2, 4, latent, latent, generator=gen)
    )
    pos = torch.zeros(1, n, 2048, **kw) if device == "meta" else torch.randn(1, n, 2048, generator=gen)
    context = torch.cat([torch.zeros(1, n, 2048, **kw), pos])  # negative (zeros), positive
    added = {
        "text_embeds": torch.zeros(2, 1280, **kw),
        "time_ids": torch.zeros(2, 6, **kw)
        if device == "meta"
        else torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2),
    }
    t = torch.tensor([500, 500], **kw)
    return x, t, context, added


def kv_inner_dims(unet) -> list[int]:
    from diffusers.models.attention_processor import Attention

    return [
        m.to_k.out_features
        for name, m in unet.named_modules()
        if name.endswith("attn2") and isinstance(m, Attention) and m.is_cross_attention
    ]


@torch.no_grad()
def real_size_flops(contexts: list[int]) -> dict:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    rows: dict = {}
    for n in contexts:
        x, t, ctx, added = _inputs(128, n, "meta")
        uncached = flops(lambda x=x, t=t, c=ctx, a=added: unet(x, t, c, added_cond_kwargs=a))
        cache = KVCache()
        cache.declare_rows(ctx, [True, False])  # meta tensors hold no values: row 0 is the zero negative
        install_kv_cache(unet, cache)
        unet(x, t, ctx, added_cond_kwargs=added)  # the first step of a run fills the cache
        cached = flops(lambda x=x, t=t, c=ctx, a=added: unet(x, t, c, added_cond_kwargs=a))
        assert cache.stats.hits > 0, "the cached step did not use the cache"
        uninstall_kv_cache(unet)
        rows[n] = {"uncached_tflops": uncached / 1e12, "cached_tflops": cached / 1e12}
    base_u, base_c = rows[contexts[0]]["uncached_tflops"], rows[contexts[0]]["cached_tflops"]
    for r in rows.values():
        r["uncached_ratio"] = r["uncached_tflops"] / base_u
        r["cached_ratio_vs_uncached_77"] = r["cached_tflops"] / base_u
        r["cached_ratio_vs_cached_77"] = r["cached_tflops"] / base_c
    dims = kv_inner_dims(unet)
    return {
        "model": "SDXL base UNet, 1024 px (128x128 latent), CFG batch 2 (zero negative + positive)",
        "cross_attention_layers": len(dims),
        "cache_mb_per_prompt_fp16": {n: cache_bytes_per_row(n, dims, 2) / 2**20 for n in contexts},
        "cache_mb_per_prompt_fp32": {n: cache_bytes_per_row(n, dims, 4) / 2**20 for n in contexts},
        "per_context_tokens": rows,
    }


def interleaved_min_times(fns: dict, rounds: int) -> tuple[dict, dict, dict]:
    """(wall seconds, CPU seconds, warm-up outputs) per ``fns`` entry: minimum over ``rounds`` rounds that
    run every entry in turn, after one warm-up round (which also fills the K/V cache of cached entries)."""
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    first: dict = {}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            if r:
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
            else:
                first[k] = out
    return {k: min(v) for k, v in wall.items()}, {k: min(v) for k, v in cpu.items()}, first


@torch.no_grad()
def cpu_wall(contexts: list[int], repeat: int, latent: int = 32) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    plain = UNet2DConditionModel(**MID_UNET).eval()
    cached = UNet2DConditionModel(**MID_UNET).eval()
    cached.load_state_dict(plain.state_dict())
    cache = KVCache()
    install_kv_cache(cached, cache)
    gen = torch.Generator().manual_seed(0)
    inputs = {n: _inputs(latent, n, "cpu", gen) for n in contexts}
    fns = {}
    for n, (x, t, ctx, added) in inputs.items():
        fns[("uncached", n)] = lambda x=x, t=t, c=ctx, a=added: plain(x, t, c, added_cond_kwargs=a).sample
        fns[("cached", n)] = lambda x=x, t=t, c=ctx, a=added: cached(x, t, c, added_cond_kwargs=a).sample
    wall, cpu, first = interleaved_min_times(fns, repeat)
    rows = {}
    for n in contexts:
        # What is timed is exact: the warm-up outputs of both variants agree.
        diff = float((first[("cached", n)] - first[("uncached", n)]).abs().max())
        assert diff < 1e-3, f"cached and uncached steps differ by {diff} at {n} tokens"
        rows[n] = {"max_abs_diff": diff}
        for kind, secs in (("cpu", cpu), ("wall", wall)):
            base = secs[("uncached", contexts[0])]
            rows[n][f"uncached_{kind}_seconds"] = secs[("uncached", n)]
            rows[n][f"cached_{kind}_seconds"] = secs[("cached", n)]
            rows[n][f"uncached_{kind}_ratio"] = secs[("uncached", n)] / base
            rows[n][f"cached_{kind}_ratio"] = secs[("cached", n)] / base
    return {
        "model": f"random UNet2DConditionModel, SDXL layout at 1/4 channels, transformer layers "
        f"{MID_UNET['transformer_layers_per_block']}, cross-attention 2048, latent {latent}x{latent}, CFG batch 2, "
        "CPU; ratios to the uncached 77-token step",
        "rounds": repeat,
        "per_context_tokens": rows,
        "cache_mb_fp32": cache.nbytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed round instead of two")
    parser.add_argument("--latent", type=int, default=32, help="latent side of the CPU runs (default 32)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_cache.json")
    args = parser.parse_args()
    repeat = 1 if args.quick else 2
    t0 = time.time()
    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
            "load_average_at_start": os.getloadavg(),
        },
        "flops_real_size": real_size_flops(CONTEXTS),
    }
    fr = results["flops_real_size"]
    print("== SDXL UNet step FLOPs at real size (meta device), 1024 px, CFG batch 2 ==", flush=True)
    for n, r in fr["per_context_tokens"].items():
        print(
            f"  {n:>4} tokens: uncached {r['uncached_tflops']:.2f} TFLOP ({r['uncached_ratio']:.3f}x)  "
            f"cached {r['cached_tflops']:.2f} TFLOP ({r['cached_ratio_vs_uncached_77']:.3f}x of uncached 77, "
            f"{r['cached_ratio_vs_cached_77']:.3f}x of cached 77)  cache {fr['cache_mb_per_prompt_fp16'][n]:.0f} MB fp16"
        )
    results["cpu_time"] = cpu_wall(CONTEXTS, repeat, args.latent)
    print("== UNet step time, reduced SDXL layout, CPU (ratios to the uncached 77-token step) ==")
    for n, r in results["cpu_time"]["per_context_tokens"].items():
        print(
            f"  {n:>4} tokens: CPU time uncached {r['uncached_cpu_seconds'] * 1000:7.0f} ms "
            f"({r['uncached_cpu_ratio']:.2f}x)  cached {r['cached_cpu_seconds'] * 1000:7.0f} ms "
            f"({r['cached_cpu_ratio']:.2f}x);  wall {r['uncached_wall_ratio']:.2f}x -> {r['cached_wall_ratio']:.2f}x"
        )
    w = results["cpu_time"]["per_context_tokens"][1000]
    f = fr["per_context_tokens"][1000]
    results["goals"] = {
        "flops_1000_cached_vs_uncached_77": f["cached_ratio_vs_uncached_77"],
        "flops_goal_met": f["cached_ratio_vs_uncached_77"] <= 1.05,
        "cpu_ratio_1000_uncached": w["uncached_cpu_ratio"],
        "cpu_ratio_1000_cached": w["cached_cpu_ratio"],
        "cpu_ratio_goal_met": w["cached_cpu_ratio"] <= w["uncached_cpu_ratio"] * 2 / 3,
        "wall_ratio_1000_uncached": w["uncached_wall_ratio"],
        "wall_ratio_1000_cached": w["cached_wall_ratio"],
        "wall_ratio_goal_met": w["cached_wall_ratio"] <= w["uncached_wall_ratio"] * 2 / 3,
    }
    results["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, args.out)
    g = results["goals"]
    print(
        f"goals: FLOPs at 1000 cached {g['flops_1000_cached_vs_uncached_77']:.3f}x of uncached 77 "
        f"(<= 1.05: {g['flops_goal_met']}); "
        f"CPU-time ratio at 1000 {g['cpu_ratio_1000_uncached']:.2f}x -> {g['cpu_ratio_1000_cached']:.2f}x "
        f"(drop by a third: {g['cpu_ratio_goal_met']}); wall {g['wall_ratio_1000_uncached']:.2f}x -> "
        f"{g['wall_ratio_1000_cached']:.2f}x ({g['wall_ratio_goal_met']})"
    )
    print(f"wrote {args.out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
