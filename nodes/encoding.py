"""Cached encoding of MUMU prompts (comfy-free; the Encoder node passes ComfyUI's progress and interrupt).

ComfyUI's own output cache skips a node whose inputs are unchanged. This LRU covers what it cannot:
the same prompt content reaching the encoder again through new objects (a reloaded model of the same
files, a rebuilt prompt with the same pixels, one changed prompt in a batch). Entries are keyed by
a hash of the model identity (files, their mtimes, dtype) and of one prompt's text, pixels, masks,
token counts and weights, and hold CPU tensors.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mumu_core.conditioning import SDXLConditioning
from mumu_core.prompt import ImageRef, InterleavedPrompt

from .conditioning_format import stack_conditionings


def prompt_digest(prompt: InterleavedPrompt) -> str:
    """Hash of everything the encoding of one prompt depends on."""
    h = hashlib.sha256()
    for seg in prompt.segments:
        if isinstance(seg, str):
            h.update(b"T" + seg.encode() + b"\0")
        else:
            _update_image(h, seg)
    return h.hexdigest()


def _update_image(h, ref: ImageRef) -> None:
    h.update(repr(("I", ref.image.mode, ref.image.size, ref.tokens, float(ref.weight))).encode())
    h.update(np.asarray(ref.image).tobytes())
    if ref.mask is not None:
        h.update(repr(("M", ref.mask.mode, ref.mask.size)).encode())
        h.update(np.asarray(ref.mask).tobytes())


def cache_key(model_identity: str, prompt: InterleavedPrompt) -> str:
    return hashlib.sha256((model_identity + "\0" + prompt_digest(prompt)).encode()).hexdigest()


class EncodeCache:
    """A small LRU of single-prompt encodings (CPU tensors)."""

    def __init__(self, max_items: int = 16) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.max_items = max_items
        self._items: OrderedDict[str, SDXLConditioning] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> SDXLConditioning | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item

    def put(self, key: str, value: SDXLConditioning) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


# One process-wide cache: ComfyUI runs one graph at a time, and a reloaded model with the same identity
# must find its earlier encodings.
GLOBAL_CACHE = EncodeCache()


def encode_prompts(
    conditioner: Callable[[Sequence[InterleavedPrompt]], SDXLConditioning],
    prompts: Sequence[InterleavedPrompt],
    model_identity: str,
    cache: EncodeCache = GLOBAL_CACHE,
    prepare: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> SDXLConditioning:
    """Encode ``prompts`` one at a time through ``conditioner``, reusing cached encodings.

    ``prepare`` runs once before the first prompt that misses the cache (the node loads the model onto
    its device there), so a fully cached run never touches the model. ``on_progress(done, total)`` runs
    after each prompt; ``check_interrupt`` before each one and raises to stop.
    """
    if not prompts:
        raise ValueError("no prompt to encode")
    results: list[SDXLConditioning] = []
    prepared = False
    for i, prompt in enumerate(prompts):
        if check_interrupt is not None:
            check_interrupt()
        key = cache_key(model_identity, prompt)
        cond = cache.get(key)
        if cond is None:
            if not prepared and prepare is not None:
                prepare()
            prepared = True
            with torch.inference_mode():
                out = conditioner([prompt])
            # Cached tensors live on the CPU in float32 so later graphs may use them on any device.
            cond = out.to(device="cpu", dtype=torch.float32)
            cache.put(key, cond)
        results.append(cond)
        if on_progress is not None:
            on_progress(i + 1, len(prompts))
    return stack_conditionings(results)
