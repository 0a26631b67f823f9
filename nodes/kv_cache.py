"""The cross-attention K/V cache inside ComfyUI's sampler, through ModelPatcher object patches and a wrapper.

What it does: every SDXL ``attn2`` (CrossAttention) of the MODEL is replaced, with
``ModelPatcher.add_object_patch``, by :class:`CachedCrossAttention`, which owns the same ``to_q`` / ``to_k`` /
``to_v`` / ``to_out`` modules (so state-dict keys, LoRA / merge weight patches and low-VRAM casting reach
them unchanged) and sends ``to_k`` / ``to_v`` through one ``mumu_core.kv_cache.KVCache``. An
``OUTER_SAMPLE`` wrapper (``ModelPatcher.add_wrapper_with_key``) scopes the cache to one sampling run: it
decides from the run's conditionings whether the cache may be on, and empties it afterwards (the memory is
released when the run ends, so a new prompt, seed or LoRA strength starts from nothing).

Why it stays exact: rows of context are matched by content (any CFG batching, ConditioningCombine,
timestep ranges, areas); entries are keyed on the projection's live parameters and ComfyUI's low-VRAM
weight functions (LoRA-patched, merged and re-patched models; a MODEL shared by several samplers, whose
weights ComfyUI swaps between them). It turns itself off for a run, with a log line, where it cannot be
correct or is not asked for:
- no conditioning of the run comes from a MUMU Encoder with ``kv_cache`` on (``KV_CACHE_KEY`` is the marker);
- an ``attn2`` replace patch is set (IPAdapter-style nodes project K/V themselves, the patched module is
  then never called);
- conditionings carry hooks (hooked LoRA / keyframed weights change between steps by design).

This module imports ComfyUI only inside functions, so its pure parts are tested without ComfyUI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mumu_core.kv_cache import KVCache, cached_cross_attention

log = logging.getLogger("ComfyUI-MUMU")

KV_CACHE_KEY = "mumu_kv_cache"  # in a CONDITIONING entry's dict: True = MUMU context, cache allowed
WRAPPER_KEY = "mumu_kv_cache"
BUDGET_FRACTION = 0.4  # of the device memory free when the first step runs


def mark_conditioning(conditioning: list[list[Any]], enabled: bool) -> list[list[Any]]:
    """A copy of a CONDITIONING list whose entries say whether the K/V cache may be used for them."""
    return [[c, {**d, KV_CACHE_KEY: bool(enabled)}] for c, d in conditioning]


def reason_off(
    conds: Mapping[str, Iterable[Mapping[str, Any]]], model_options: Mapping[str, Any]
) -> str | None:
    """Why the cache must stay off for a sampling run with these conds (ComfyUI's converted dicts), or None."""
    entries = [d for group in conds.values() for d in (group or ()) if isinstance(d, Mapping)]
    marks = [d.get(KV_CACHE_KEY) for d in entries]
    if not any(m is True for m in marks):
        if any(m is False for m in marks):
            return "the MUMU Encoder's kv_cache setting is off"
        return "no MUMU conditioning in this run"
    if any(m is False for m in marks):
        return "a MUMU Encoder with kv_cache off feeds this run"
    if any(d.get("hooks") is not None for d in entries):
        return "conditionings carry hooks (weights may change between steps)"
    replace = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    if replace:
        return f"{len(replace)} attn2 replace patch(es) are set (e.g. IPAdapter); they project K/V themselves"
    return None


class CacheState:
    """One per patched MODEL (shared by its clones): the cache and whether the current run may use it."""

    def __init__(self) -> None:
        self.cache = KVCache()
        self.active = False
        self.budget_set = False
        self.layers = 0
        self.runs: list[dict[str, Any]] = []  # one summary per sampling run (tests and logs read it)

    def begin(self, reason: str | None) -> None:
        self.cache.clear()
        self.cache.reset_stats()
        self.cache.max_bytes = None
        self.budget_set = False
        self.active = reason is None
        if reason is not None:
            log.info("MUMU: cross-attention K/V cache off for this sampling run: %s", reason)

    def end(self, reason: str | None) -> None:
        s = self.cache.stats
        summary = {
            "active": reason is None,
            "reason": reason,
            "computed": s.misses,
            "reused": s.hits,
            "bypassed": s.bypassed,
            "rows": s.rows,
            "peak_mb": round(self.cache.nbytes / 2**20, 1),
            "over_budget": self.cache.over_budget,
        }
        self.runs.append(summary)
        del self.runs[:-16]
        if reason is None:
            log.info(
                "MUMU: cross-attention K/V cache: %d layers, %d projections computed, %d reused, %.1f MB "
                "(released)",
                self.layers,
                s.misses,
                s.hits,
                self.cache.nbytes / 2**20,
            )
        self.active = False
        self.cache.clear()

    def ensure_budget(self, device: torch.device) -> None:
        if self.budget_set:
            return
        import comfy.model_management as mm

        # Measured once the model is on its device (the first step): what the cache may take.
        self.cache.max_bytes = int(mm.get_free_memory(device) * BUDGET_FRACTION)
        self.budget_set = True

    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        reason = reason_off(getattr(guider, "conds", {}) or {}, getattr(guider, "model_options", {}) or {})
        self.begin(reason)
        try:
            return executor(*args, **kwargs)
        finally:
            self.end(reason)


class CachedCrossAttention(nn.Module):
    """ComfyUI's CrossAttention with ``to_k`` / ``to_v`` through the run's K/V cache.

    The original module is held outside ``_modules`` so the state dict keeps exactly the original keys;
    its submodules are registered here under their own names.
    """

    def __init__(self, original: nn.Module, name: str, state: CacheState) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)
        self.to_q, self.to_k, self.to_v, self.to_out = (
            original.to_q,
            original.to_k,
            original.to_v,
            original.to_out,
        )
        self.heads = original.heads
        self.dim_head = getattr(original, "dim_head", None)
        self.attn_precision = getattr(original, "attn_precision", None)
        self.layer_name = name
        self.state = state

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (ComfyUI's signature)
        state = self.state
        if not state.active or context is None:
            return self.original(
                x, context=context, value=value, mask=mask, transformer_options=transformer_options
            )
        from comfy.ldm.modules import attention

        state.ensure_budget(x.device)
        if value is context:
            value = None  # an attn2_patch hands the context over as the value too
        opts = {"attn_precision": self.attn_precision, "transformer_options": transformer_options}
        heads = self.heads

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if mask is None:
                return attention.optimized_attention(q, k, v, heads, **opts)
            return attention.optimized_attention_masked(q, k, v, heads, mask, **opts)

        out = cached_cross_attention(
            state.cache,
            self.layer_name,
            x,
            context,
            self.to_q,
            self.to_k,
            self.to_v,
            attend,
            value=value,
            extras_k=_patch_extras(self.to_k),
            extras_v=_patch_extras(self.to_v),
            # An attention override may index the batch (cond_or_uncond); a mask covers every row.
            constant_shortcut=mask is None and "optimized_attention_override" not in transformer_options,
        )
        return self.to_out(out)


def _patch_extras(module: nn.Module) -> tuple:
    # ComfyUI's low-VRAM mode applies LoRA at call time through these lists (comfy.ops cast_bias_weight).
    return tuple(getattr(module, "weight_function", ()) or ()) + tuple(
        getattr(module, "bias_function", ()) or ()
    )


def with_kv_cache(model):
    """A clone of a ComfyUI MODEL (ModelPatcher) whose cross-attention K/V are cached per sampling run.

    Idempotent (a MODEL patched before gets one fresh cache). Raises TypeError for a non-UNet MODEL.
    """
    import comfy.patcher_extension
    from comfy.ldm.modules.attention import CrossAttention

    patched = model.clone()
    diffusion = patched.get_model_object("diffusion_model")
    state = CacheState()
    for name, module in diffusion.named_modules():
        if not name.endswith("attn2") or not isinstance(module, CrossAttention | CachedCrossAttention):
            continue
        key = f"diffusion_model.{name}"
        original = patched.get_model_object(key)
        if isinstance(original, CachedCrossAttention):
            original = original.original
        patched.add_object_patch(key, CachedCrossAttention(original, key, state))
        state.layers += 1
    if state.layers == 0:
        raise TypeError("this MODEL has no cross-attention (attn2) layers: the K/V cache needs an SDXL UNet")
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    patched.remove_wrappers_with_key(outer, WRAPPER_KEY)
    patched.add_wrapper_with_key(outer, WRAPPER_KEY, state.outer_sample)
    return patched


def cache_state(model) -> CacheState | None:
    """The CacheState of a MODEL patched by :func:`with_kv_cache`, else None."""
    import comfy.patcher_extension

    for w in model.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY):
        state = getattr(w, "__self__", None)
        if isinstance(state, CacheState):
            return state
    return None
