"""Cross-attention K/V cache (mumu_core.kv_cache): exact against uncached, keyed on rows and weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mumu_core.kv_cache import (
    CachedCrossAttnProcessor,
    KVCache,
    cache_bytes_per_row,
    install_kv_cache,
    kv_cached_layers,
    uninstall_kv_cache,
)
from mumu_core.presets import TINY, build_unet
from mumu_core.testing import randomize_lora

TOL = dict(rtol=1e-5, atol=1e-6)


def _proj(seed: int = 0, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(8, 6, bias=bias)


def test_rows_are_matched_by_content_and_projected_once():
    cache, proj = KVCache(), _proj()
    pos = torch.randn(1, 5, 8)
    batch1 = torch.cat([pos, torch.zeros(1, 5, 8)])
    with torch.no_grad():
        a = cache.projected("l.to_k", proj, batch1)
        torch.testing.assert_close(a, proj(batch1), **TOL)
        assert cache.stats.misses == 2 and cache.stats.hits == 0
        # A new tensor with the same rows in another order (another CFG grouping), plus a repeat.
        batch2 = torch.cat([torch.zeros(1, 5, 8), pos.clone(), pos.clone()])
        b = cache.projected("l.to_k", proj, batch2)
        torch.testing.assert_close(b, proj(batch2), **TOL)
        assert cache.stats.misses == 2 and cache.stats.hits == 2
        # Another row: only it is computed.
        other = torch.randn(1, 5, 8)
        cache.projected("l.to_k", proj, torch.cat([pos, other]))
        assert cache.stats.misses == 3
        # Another layer key never shares entries.
        cache.projected("m.to_k", proj, batch1)
        assert cache.stats.misses == 5


def test_zero_row_costs_one_token_and_is_the_bias():
    cache = KVCache()
    for bias in (False, True):
        proj = _proj(1, bias)
        zeros = torch.zeros(1, 300, 8)
        with torch.no_grad():
            k = cache.projected(f"zero{bias}", proj, zeros)
        expected = proj.bias.expand(1, 300, 6) if bias else torch.zeros(1, 300, 6)
        torch.testing.assert_close(k, expected)
    # Only one token of each row is stored.
    assert cache.nbytes == 2 * 6 * 4


def test_weights_changing_recompute():
    cache, proj = KVCache(), _proj(2)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        cache.projected("k", proj, x)
        proj.weight.add_(1.0)  # in place (version bump)
        torch.testing.assert_close(cache.projected("k", proj, x), proj(x), **TOL)
        proj.weight = nn.Parameter(torch.randn(6, 8))  # swapped (ComfyUI's set_attr_param)
        torch.testing.assert_close(cache.projected("k", proj, x), proj(x), **TOL)
    assert cache.stats.misses == 6 and cache.stats.hits == 0


def test_peft_lora_scale_change_recomputes():
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential()
    model.add_module("to_k", _proj(3))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]), model)
    randomize_lora(model, 0, std=0.5)
    layer = model.to_k
    x = torch.randn(1, 4, 8)
    cache = KVCache()
    with torch.no_grad():
        first = cache.projected("k", layer, x)
        layer.scaling["default"] = 3.0
        second = cache.projected("k", layer, x)
        torch.testing.assert_close(second, layer(x), **TOL)
    assert not torch.allclose(first, second)


def test_extras_key_the_entries():
    cache, proj = KVCache(), _proj(4)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        cache.projected("k", proj, x, extras=(object(),))
        cache.projected("k", proj, x, extras=(object(),))
    assert cache.stats.misses == 2


def test_autograd_and_disabled_bypass():
    proj = _proj(5)
    x = torch.randn(1, 4, 8)
    cache = KVCache()
    out = cache.projected("k", proj, x)  # grad enabled, weights require grad: training
    assert out.requires_grad and len(cache) == 0 and cache.stats.bypassed == 1
    off = KVCache(enabled=False)
    with torch.no_grad():
        off.projected("k", proj, x)
    assert len(off) == 0


def test_budget_and_clear_release_memory():
    proj = _proj(6)
    cache = KVCache(max_bytes=4 * 6 * 4)  # one 4-token row of 6 float32
    with torch.no_grad():
        x = torch.randn(2, 4, 8)
        out = cache.projected("k", proj, x)
    torch.testing.assert_close(out, proj(x), **TOL)
    assert cache.over_budget and len(cache) == 1 and cache.nbytes == 96
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and not cache.over_budget
    with pytest.raises(ValueError, match="max_bytes"):
        KVCache(max_bytes=-1)


def test_memory_per_row_formula_for_sdxl():
    # SDXL: 10 cross-attention layers of 640 and 60 of 1280 (to_k and to_v each).
    dims = [640] * 10 + [1280] * 60
    assert cache_bytes_per_row(1000, dims, 2) == 1000 * 166_400 * 2


# -- diffusers: a tiny random SDXL-layout UNet --------------------------------------------------------


def _unet_inputs(n_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, n_tokens, TINY.unet["cross_attention_dim"], generator=g)
    context = torch.cat([torch.zeros_like(ctx), ctx])  # diffusers' CFG order: negative, positive
    pooled = torch.randn(2, 32, generator=g)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    return context, added


@torch.no_grad()
def test_unet_cached_equals_uncached_over_steps():
    unet = build_unet(TINY).eval()
    context, added = _unet_inputs(37)
    xs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    ref = [unet(x, 999 - 300 * i, context, added_cond_kwargs=added).sample for i, x in enumerate(xs)]
    cache = KVCache()
    layers = install_kv_cache(unet, cache)
    assert layers == kv_cached_layers(unet) == 4  # TINY: one transformer per cross-attention block, 4 blocks
    got = [unet(x, 999 - 300 * i, context, added_cond_kwargs=added).sample for i, x in enumerate(xs)]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # Step 1 computes K and V of the positive row and V of one token of the zero row (whose attention
    # output is that vector: its K are never needed); later steps reuse them.
    assert cache.stats.misses == 3 * layers
    assert cache.stats.hits == 3 * layers * (len(xs) - 1)
    assert uninstall_kv_cache(unet) == layers and kv_cached_layers(unet) == 0


@torch.no_grad()
def test_unet_with_peft_lora_tracks_the_scale():
    from mumu_core.bundle import add_unet_lora

    unet = build_unet(TINY).eval()
    add_unet_lora(unet, rank=2, alpha=4.0)
    randomize_lora(unet, 1, std=0.3)
    context, added = _unet_inputs(9, seed=1)
    x = torch.randn(2, 4, 8, 8)
    cache = KVCache()
    install_kv_cache(unet, cache)
    unet(x, 500, context, added_cond_kwargs=added)
    for m in unet.modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict):
            for k in m.scaling:
                m.scaling[k] = 0.5
    got = unet(x, 500, context, added_cond_kwargs=added).sample
    uninstall_kv_cache(unet)
    torch.testing.assert_close(got, unet(x, 500, context, added_cond_kwargs=added).sample, **TOL)


def test_processor_falls_back_for_self_attention():
    calls = []

    def fallback(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        calls.append(encoder_hidden_states)
        return hidden_states

    p = CachedCrossAttnProcessor(KVCache(), "x", fallback)
    h = torch.randn(1, 3, 4)
    assert p(object(), h) is h and calls == [None]


def test_pipeline_cache_on_by_default_and_exact(tiny_models):
    from mumu_core.pipeline import MumuPipeline
    from mumu_core.prompt import InterleavedPrompt, load_image

    cached = MumuPipeline.from_paths(tiny_models.vlm, tiny_models.bundle, tiny_models.sdxl)
    plain = MumuPipeline.from_paths(tiny_models.vlm, tiny_models.bundle, tiny_models.sdxl, kv_cache=False)
    assert kv_cached_layers(cached.pipe.unet) > 0 and cached.kv_cache.enabled
    assert not plain.kv_cache.enabled
    images = [load_image(p) for p in tiny_models.images]
    prompts = [
        InterleavedPrompt.parse("a <image> man and a <image> dog", images, tokens_per_image=4),
        InterleavedPrompt.parse("a <image> cat", images[:1], tokens_per_image=4),
    ]
    a = cached(prompts, seed=3, steps=3, progress=False)
    assert cached.kv_cache.stats.hits > 0 and len(cached.kv_cache) == 0  # used, then released
    b = plain(prompts, seed=3, steps=3, progress=False)
    assert plain.kv_cache.stats.hits == 0
    for x, y in zip(a, b, strict=True):
        diff = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
        assert diff.max() <= 1  # 8-bit images of float outputs equal to tolerance


def _reference_attention(x, context, to_q, to_k, to_v, heads=2):
    q, k, v = to_q(x), to_k(context), to_v(context)
    b, d = q.shape[0], q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True])
def test_constant_rows_skip_attention_exactly(bias):
    from mumu_core.kv_cache import cached_cross_attention

    torch.manual_seed(0)
    to_q, to_k, to_v = nn.Linear(6, 8, bias=bias), nn.Linear(5, 8, bias=bias), nn.Linear(5, 8, bias=bias)
    x = torch.randn(3, 7, 6)
    pos = torch.randn(1, 4, 5)
    calls = []

    def attend(q, k, v):
        calls.append(q.shape[0])
        b, d = q.shape[0], 4
        q, k, v = (t.view(b, -1, 2, d).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, 8)

    cache = KVCache()
    for context in (
        torch.cat([torch.zeros(1, 4, 5), pos, torch.full((1, 4, 5), 0.5)]),  # zero and constant rows
        torch.zeros(3, 4, 5),  # a negative batch alone (ComfyUI splits CFG when memory is short)
    ):
        got = cached_cross_attention(cache, "l", x, context, to_q, to_k, to_v, attend)
        torch.testing.assert_close(got, _reference_attention(x, context, to_q, to_k, to_v), **TOL)
    assert calls == [1]  # only the positive row was attended; the all-constant batch not at all


def test_meta_tensors_cache_by_identity():
    # FLOP counting at real size runs on the meta device: the second call with the same tensor hits.
    with torch.device("meta"):
        proj = nn.Linear(8, 6)
        ctx = torch.zeros(2, 5, 8)
    cache = KVCache()
    with torch.no_grad():
        cache.projected("k", proj, ctx)
        out = cache.projected("k", proj, ctx)
    assert out.shape == (2, 5, 6) and out.is_meta and cache.stats.hits == 2


def test_declare_rows_is_for_meta_only():
    cache = KVCache()
    with pytest.raises(ValueError, match="meta tensors only"):
        cache.declare_rows(torch.zeros(2, 3, 4), [True, False])
    ctx = torch.zeros(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match="1 flags for a batch of 2"):
        cache.declare_rows(ctx, [True])
    cache.declare_rows(ctx, [True, False])
    assert cache.constant_rows(ctx) == (True, False)
