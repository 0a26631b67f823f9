"""Run with a real ComfyUI's python: sample a random SDXL-family (Vega) checkpoint with and without the MUMU
cross-attention K/V cache in ComfyUI's own sampler and print a JSON report on the last stdout line.

usage: python comfy_kv_cache_check.py COMFYUI_DIR PACK_DIR MODELS_DIR VEGA_CKPT WORK_DIR

Cases: CFG batching (positive + zero negative in one batch), ConditioningCombine, ConditioningSetTimestepRange,
ConditioningSetArea, a LoRA patched on to_k / to_v before and after the cache patch and at two strengths on
one MODEL, the MUMU LoRA Merge node (which installs the cache), a MODEL shared by several samplers, and the
runs where the cache must turn itself off. tests/nodes/test_kv_cache_in_comfyui.py asserts on the report.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback

from comfy_boot import boot_comfyui

STEPS = 2  # every step after the first reuses the cache; keeps the CPU run short
TOKENS = 120


def main() -> None:
    comfy_dir, pack_dir, models_dir, vega_ckpt, work = (os.path.abspath(p) for p in sys.argv[1:6])
    logs = boot_comfyui(comfy_dir, models_dir, work)

    import comfy.patcher_extension
    import comfy.sd
    import torch

    import nodes as comfy_nodes

    torch.set_num_threads(1)
    report: dict = {"checks": {}, "errors": []}
    assert asyncio.run(comfy_nodes.load_custom_node(pack_dir)), "the pack did not load"
    kvc = next(m for n, m in sys.modules.items() if n.endswith(".nodes.kv_cache"))

    def check(name: str, fn) -> None:
        try:
            report["checks"][name] = fn()
        except Exception as e:
            report["errors"].append(
                {"check": name, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
            )

    base = comfy.sd.load_checkpoint_guess_config(vega_ckpt, output_vae=False, output_clip=False)[0]
    cached = kvc.with_kv_cache(base)
    state = kvc.cache_state(cached)
    g = torch.Generator().manual_seed(0)

    def conditioning(seed: int, tokens: int = TOKENS, zero: bool = False):
        gg = torch.Generator().manual_seed(seed)
        ctx = torch.zeros(1, tokens, 2048) if zero else torch.randn(1, tokens, 2048, generator=gg)
        pooled = torch.zeros(1, 1280) if zero else torch.randn(1, 1280, generator=gg)
        sizes = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
        return kvc.mark_conditioning([[ctx, {"pooled_output": pooled, **sizes}]], True)

    pos_a, pos_b, neg = conditioning(1), conditioning(2), conditioning(0, zero=True)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    del g

    def sample(model, positive, negative, seed: int = 7, cfg: float = 6.0, batch: int = 1):
        lat = {"samples": torch.zeros(batch, 4, 8, 8)} if batch != 1 else latent
        out = comfy_nodes.common_ksampler(model, seed, STEPS, cfg, "euler", "normal", positive, negative, lat)
        return out[0]["samples"].float()

    references: dict = {}  # uncached results, each computed once (models and conds live all run)

    def reference(model, positive, negative, seed: int = 7, batch: int = 1):
        key = (id(model), id(positive), id(negative), seed, batch)
        if key not in references:
            references[key] = sample(model, positive, negative, seed=seed, batch=batch)
        return references[key]

    def compare(model_cached, model_plain, positive, negative, **kw) -> dict:
        a = sample(model_cached, positive, negative, **kw)
        run = dict(state.runs[-1]) if state.runs else None
        b = reference(model_plain, positive, negative, **kw)
        return {
            "max_abs_diff": float((a - b).abs().max()),
            "scale": float(b.abs().max()),
            "finite": bool(torch.isfinite(a).all()),
            "run": run,
        }

    report["layers"] = state.layers
    check("cfg_batch", lambda: compare(cached, base, pos_a, neg))
    check("cfg_batch_of_2_latents", lambda: compare(cached, base, pos_a, neg, batch=2))
    combine = comfy_nodes.ConditioningCombine().combine
    check("combine", lambda: compare(cached, base, combine(pos_a, pos_b)[0], neg))
    ranged = comfy_nodes.ConditioningSetTimestepRange().set_range
    check(
        "timestep_range",
        lambda: compare(
            cached, base, combine(ranged(pos_a, 0.0, 0.3)[0], ranged(pos_b, 0.3, 1.0)[0])[0], neg
        ),
    )
    area = comfy_nodes.ConditioningSetArea().append
    check("area", lambda: compare(cached, base, combine(pos_a, area(pos_b, 32, 32, 0, 0, 1.0)[0])[0], neg))
    check(
        "other_length_negative", lambda: compare(cached, base, pos_a, conditioning(0, tokens=77, zero=True))
    )

    # A random kohya LoRA on every to_k / to_v of attn2 (what changes the cached projections).
    sd_keys = [k for k in base.model.state_dict() if ".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k]
    lora = {}
    lg = torch.Generator().manual_seed(5)
    for k in sd_keys:
        name = "lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
        w = base.model.state_dict()[k]
        lora[f"{name}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=lg) * 0.05
        lora[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=lg) * 0.05
        lora[f"{name}.alpha"] = torch.tensor(4.0)

    def with_lora(model, strength: float):
        return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]

    def lora_cases() -> dict:
        plain_1, plain_half = with_lora(base, 1.0), with_lora(base, 0.5)
        out = {"lora_keys": len(sd_keys)}
        # The LoRA applied after the cache patch (a clone shares the cache), at two strengths in turn,
        # with the unpatched MODEL sampled in between: ComfyUI re-patches the shared weights each time.
        out["after_1.0"] = compare(with_lora(cached, 1.0), plain_1, pos_a, neg)
        out["after_0.5"] = compare(with_lora(cached, 0.5), plain_half, pos_a, neg)
        out["base_again"] = compare(cached, base, pos_a, neg)
        # The LoRA applied before the cache patch.
        out["before_1.0"] = compare(kvc.with_kv_cache(plain_1), plain_1, pos_a, neg)
        out["lora_changes_output"] = float(
            (reference(plain_1, pos_a, neg) - reference(base, pos_a, neg)).abs().max()
        )
        return out

    check("lora", lora_cases)

    def shared_model() -> dict:
        # One cached MODEL feeding three samplers in a row with different prompts; each must match.
        out = {}
        for i, pos in enumerate((pos_a, pos_b, pos_a)):
            out[f"sampler_{i}"] = compare(cached, base, pos, neg, seed=11 + i)
        return out

    check("shared_model", shared_model)

    def lora_merge_node() -> dict:
        bundle = sorted(os.listdir(os.path.join(models_dir, "mumu")))[0]
        merge = comfy_nodes.NODE_CLASS_MAPPINGS["MUMULoraMerge"]
        merged = (
            merge.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(model=base, bundle=bundle, strength=1.0).args[0]
        )
        merged_state = kvc.cache_state(merged)
        plain = merged.clone()
        plain.object_patches = {}
        plain.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, kvc.WRAPPER_KEY)
        a = sample(merged, pos_a, neg)
        run = dict(merged_state.runs[-1]) if merged_state and merged_state.runs else None
        b = sample(plain, pos_a, neg)
        node = comfy_nodes.NODE_CLASS_MAPPINGS["MUMUKVCache"]
        via_node = node.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(model=base).args[0]
        node_state = kvc.cache_state(via_node)
        c = sample(via_node, pos_a, neg)
        node_run = dict(node_state.runs[-1]) if node_state and node_state.runs else None
        return {
            "installed": merged_state is not None,
            "max_abs_diff": float((a - b).abs().max()),
            "run": run,
            "node_installed": node_state is not None,
            "node_run": node_run,
            "node_max_abs_diff": float((c - reference(base, pos_a, neg)).abs().max()),
            "released_after_run": len(merged_state.cache) == 0 and merged_state.cache.nbytes == 0,
        }

    check("lora_merge_node", lora_merge_node)

    def off_cases() -> dict:
        out = {}
        unmarked = [[pos_a[0][0], {k: v for k, v in pos_a[0][1].items() if k != kvc.KV_CACHE_KEY}]]
        sample(cached, unmarked, [[neg[0][0], {k: v for k, v in neg[0][1].items() if k != kvc.KV_CACHE_KEY}]])
        out["unmarked"] = dict(state.runs[-1])
        sample(cached, kvc.mark_conditioning(pos_a, False), kvc.mark_conditioning(neg, False))
        out["switched_off"] = dict(state.runs[-1])
        replaced = cached.clone()
        calls = {"n": 0}

        def replace(q, k, v, extra_options):
            import comfy.ldm.modules.attention as attention

            calls["n"] += 1
            return attention.optimized_attention(q, k, v, extra_options["n_heads"])

        replaced.set_model_attn2_replace(replace, "input", 4, 0)
        r = compare(replaced, base, pos_a, neg)
        out["attn2_replace"] = {**r, "replace_calls": calls["n"]}
        return out

    check("off", off_cases)
    report["log_lines"] = [m for m in logs if "K/V cache" in m][-20:]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
