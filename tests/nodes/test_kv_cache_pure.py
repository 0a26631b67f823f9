"""The comfy-free parts of nodes/kv_cache.py: the conditioning marker and when a run must stay uncached."""

from __future__ import annotations

import torch

from nodes.kv_cache import KV_CACHE_KEY, mark_conditioning, reason_off


def _cond(**extra):
    return [[torch.zeros(1, 4, 2048), {"pooled_output": torch.zeros(1, 1280), **extra}]]


def test_mark_copies_and_keeps_the_structure():
    cond = _cond(width=64)
    marked = mark_conditioning(cond, True)
    assert marked[0][1][KV_CACHE_KEY] is True and KV_CACHE_KEY not in cond[0][1]
    assert marked[0][0] is cond[0][0] and marked[0][1]["width"] == 64
    assert mark_conditioning(cond, False)[0][1][KV_CACHE_KEY] is False


def _conds(*marks, **extra):
    entries = [{KV_CACHE_KEY: m, **extra} if m is not None else dict(extra) for m in marks]
    return {"positive": entries[:1], "negative": entries[1:]}


def test_reason_off():
    assert reason_off(_conds(True, True), {}) is None
    assert "no MUMU conditioning" in reason_off(_conds(None, None), {})
    assert "setting is off" in reason_off(_conds(False, False), {})
    # ConditioningCombine of a MUMU conditioning with kv_cache off and one with it on: off.
    assert "kv_cache off" in reason_off({"positive": [{KV_CACHE_KEY: True}, {KV_CACHE_KEY: False}]}, {})
    # A MUMU positive with a plain negative from elsewhere: the marked rows decide.
    assert reason_off(_conds(True, None), {}) is None
    assert "hooks" in reason_off(_conds(True, True, hooks=object()), {})
    replace = {"transformer_options": {"patches_replace": {"attn2": {("input", 4, 0): object()}}}}
    assert "attn2 replace" in reason_off(_conds(True, True), replace)
    assert (
        reason_off(_conds(True, True), {"transformer_options": {"patches_replace": {"attn1": {1: 2}}}})
        is None
    )
