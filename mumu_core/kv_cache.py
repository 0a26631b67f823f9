"""Cross-attention K/V cache: project MUMU's constant context to keys and values once, not at every step.

A MUMU context is long (676 tokens for two 324-token images and text, 3,000+ with four images at 1,296) and
the same at every denoising step and in both CFG branches, yet SDXL's 70 cross-attention layers project it
with ``to_k`` / ``to_v`` at every step. :class:`KVCache` keeps those projections for the rows of context it
has seen and hands them back while the rows and the projection's weights are unchanged.

- Rows are matched by **content** (``torch.equal``), not by tensor identity: ComfyUI builds a new batched
  context tensor at every step (CFG pairs, ConditioningCombine, area and timestep-range conditionings in
  any grouping), so each row of the batch is looked up on its own; repeated rows are projected once.
  The same tensor object seen again (diffusers passes one prompt tensor to every step) skips the
  comparison.
- A row that is constant along its tokens (the zero negative) is projected for one token and stored as
  that single token broadcast to the row's length: its K/V are just the projection biases (zeros for
  SDXL, whose ``to_k`` / ``to_v`` have no bias), so it costs no memory.
- Entries are keyed on the weights actually used: every parameter of the projection module (identity
  through a weak reference, storage, version: ComfyUI's LoRA patching swaps parameters), the LoRA state
  of peft layers (scaling, active / merged adapters) and caller-given extras (ComfyUI's low-VRAM weight
  functions). A change recomputes; nothing stale is returned.
- Callers scope a cache to one sampling run and :meth:`KVCache.clear` it afterwards, which releases the
  memory; per row kept it holds ``tokens x sum(inner dims of to_k and to_v)`` values, for SDXL
  ``tokens x 166,400`` (333 MB at 1,000 tokens in fp16, 666 MB in fp32).
- Where caching would be wrong it computes instead: autograd on (training), or a ``max_bytes`` budget
  reached (then new projections are computed and not stored; :attr:`KVCache.over_budget` says so).

:class:`CachedCrossAttnProcessor` is the diffusers side (MumuPipeline); ComfyUI's glue is in ``nodes/``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# peft LoRA layers keep their state in plain attributes; a change of any of them changes the projection.
_PEFT_STATE_ATTRS = ("scaling", "_active_adapter", "merged_adapters", "_disable_adapters", "use_dora")
_MEMO_SIZE = 4  # context tensors remembered by identity (ComfyUI may split CFG into alternating batches)


@dataclass
class _Row:
    data: torch.Tensor  # (1, N, C), a private copy
    constant: bool  # every token equal (the zero negative)


@dataclass
class _Entry:
    token: tuple
    refs: list  # weak references to the parameters named in ``token``
    pinned: tuple  # caller extras, kept alive so their ids stay unique while the entry lives
    value: torch.Tensor  # (1, N, D), or (1, 1, D) for a constant row
    nbytes: int


@dataclass
class KVCacheStats:
    hits: int = 0  # projections returned from the cache (per layer, per row)
    misses: int = 0  # projections computed and stored
    bypassed: int = 0  # projections computed because caching was off, over budget or under autograd
    rows: int = 0  # distinct context rows seen
    extra: dict = field(default_factory=dict)


def _version(t) -> int:
    """A tensor's in-place version; inference tensors (ComfyUI samples under inference_mode) have none,
    and cannot be changed in place outside inference mode, so they count as version 0."""
    return 0 if t.is_inference() else t._version


def _module_state(module: nn.Module) -> Iterator[Any]:
    for sub in module.modules():
        for attr in _PEFT_STATE_ATTRS:
            if attr in sub.__dict__:
                v = sub.__dict__[attr]
                yield (attr, tuple(sorted(v.items())) if isinstance(v, dict) else repr(v))


def weight_token(module: nn.Module, extras: Sequence[object] = ()) -> tuple[tuple, list, tuple]:
    """What the output of ``module`` on a fixed input depends on: (hashable token, weak refs, pinned extras).

    Parameter identity alone is not enough (an id is reused once a parameter is freed): the entry keeps
    weak references and matches only while they still point at the same live parameters.
    """
    params = list(module.parameters())
    token = tuple((id(p), p.data_ptr(), _version(p), p.dtype, p.device, tuple(p.shape)) for p in params)
    token += tuple(_module_state(module))
    token += tuple(id(e) for e in extras)
    return token, [weakref.ref(p) for p in params], tuple(extras)


def _same_weights(entry: _Entry, token: tuple) -> bool:
    return entry.token == token and all(r() is not None for r in entry.refs)


class KVCache:
    """Projections of context rows by ``to_k`` / ``to_v`` modules, reused while rows and weights match."""

    def __init__(self, max_bytes: int | None = None, enabled: bool = True) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.stats = KVCacheStats()
        self.over_budget = False
        self._rows: list[_Row] = []
        self._memo: list[tuple[torch.Tensor, int, tuple[int, ...]]] = []
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._nbytes = 0

    # -- bookkeeping ----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of cached projections (row copies excluded: they are ``C / D_total`` of that, ~1%)."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and row: the memory goes back to the allocator. Counters are kept."""
        self._rows.clear()
        self._memo.clear()
        self._entries.clear()
        self._nbytes = 0
        self.over_budget = False

    def reset_stats(self) -> None:
        self.stats = KVCacheStats()

    # -- rows -----------------------------------------------------------------------------------------
    def row_ids(self, context: torch.Tensor) -> tuple[int, ...]:
        """The id of each batch row of ``context`` (B, N, C); equal rows get equal ids."""
        for tensor, version, ids in self._memo:
            if tensor is context and _version(tensor) == version:
                return ids
        ids = tuple(self._row_id(context[b : b + 1]) for b in range(context.shape[0]))
        # A strong reference: while remembered, no other tensor can take this one's identity.
        self._memo.insert(0, (context, _version(context), ids))
        del self._memo[_MEMO_SIZE:]
        return ids

    def declare_rows(self, context: torch.Tensor, constant: Sequence[bool]) -> None:
        """For a meta-device ``context`` (FLOP counting at real size, no values to look at): register its
        rows, saying which are constant along their tokens. Later calls match it by tensor identity."""
        if not context.is_meta:
            raise ValueError("declare_rows is for meta tensors only; real rows are matched by their values")
        if len(constant) != context.shape[0]:
            raise ValueError(f"constant has {len(constant)} flags for a batch of {context.shape[0]}")
        ids = []
        for b, c in enumerate(constant):
            self._rows.append(_Row(context[b : b + 1].detach().clone(), bool(c)))
            ids.append(len(self._rows) - 1)
        self._memo.insert(0, (context, _version(context), tuple(ids)))
        del self._memo[_MEMO_SIZE:]

    def _row_id(self, row: torch.Tensor) -> int:
        if row.is_meta:
            # No values to compare: a new non-constant row, matched later only by tensor identity.
            self._rows.append(_Row(row.detach().clone(), False))
            return len(self._rows) - 1
        for i, known in enumerate(self._rows):
            d = known.data
            if (
                d.shape == row.shape
                and d.dtype == row.dtype
                and d.device == row.device
                and torch.equal(d, row)
            ):
                return i
        constant = bool(torch.equal(row, row[:, :1].expand_as(row)))
        self._rows.append(_Row(row.detach().clone(), constant))
        self.stats.rows += 1
        return len(self._rows) - 1

    # -- projections ----------------------------------------------------------------------------------
    def projected(
        self,
        key: str,
        proj: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
        context: torch.Tensor,
        extras: Sequence[object] = (),
        rows: Sequence[int] | None = None,
        compact: bool = False,
    ) -> torch.Tensor:
        """``proj(context[rows])`` for a (B, N, C) ``context``, reusing stored rows of earlier calls under ``key``.

        ``key`` names the projection (e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"``);
        ``extras`` are objects the projection's output also depends on (kept alive while cached); ``rows``
        picks batch rows (default all). ``compact=True`` leaves constant rows one token long (the caller
        broadcasts them) instead of materialising them to N tokens.
        """
        if not self.usable(context, proj):
            self.stats.bypassed += 1
            return proj(context if rows is None else context[list(rows)])
        ids = self.row_ids(context)
        if rows is not None:
            ids = tuple(ids[i] for i in rows)
        token, refs, pinned = weight_token(proj, extras)
        values: dict[int, torch.Tensor] = {}
        todo: list[int] = []
        for rid in dict.fromkeys(ids):
            entry = self._entries.get((key, rid))
            if entry is not None and _same_weights(entry, token):
                values[rid] = entry.value
                self.stats.hits += 1
            else:
                todo.append(rid)
        if todo:
            self._compute(key, proj, todo, token, refs, pinned, values)
        n = context.shape[1]
        if len(ids) == 1 and (values[ids[0]].shape[1] == n or compact):
            return values[ids[0]]
        if compact and all(values[r].shape[1] == 1 for r in ids):
            return torch.cat([values[r] for r in ids])
        return torch.cat([values[rid].expand(1, n, -1) for rid in ids])

    def usable(self, context: torch.Tensor, proj: object) -> bool:
        """Whether :meth:`projected` may cache for this call (else it computes): enabled, a (B, N, C)
        context, an ``nn.Module`` projection, and no autograd through it (training would lose its graph)."""
        if not self.enabled or context.ndim != 3 or not isinstance(proj, nn.Module):
            return False
        return not (
            torch.is_grad_enabled()
            and (context.requires_grad or any(p.requires_grad for p in proj.parameters()))
        )

    def constant_rows(self, context: torch.Tensor) -> tuple[bool, ...]:
        """Per batch row: is it constant along its tokens (the zero negative)? All False when not usable."""
        if not self.enabled or context.ndim != 3 or (torch.is_grad_enabled() and context.requires_grad):
            return (False,) * context.shape[0]
        return tuple(self._rows[i].constant for i in self.row_ids(context))

    def _compute(self, key, proj, todo, token, refs, pinned, values) -> None:
        full = [r for r in todo if not self._rows[r].constant]
        const = [r for r in todo if self._rows[r].constant]
        computed: dict[int, torch.Tensor] = {}
        if full:
            # The stored copies equal the batch rows exactly (matched by torch.equal).
            out = proj(torch.cat([self._rows[r].data for r in full]))
            for i, r in enumerate(full):
                computed[r] = out[i : i + 1]
        for r in const:
            # Every token of a constant row projects to the same vector (for zeros: the bias).
            computed[r] = proj(self._rows[r].data[:, :1])
        for r, value in computed.items():
            values[r] = value
            old = self._entries.pop((key, r), None)
            if old is not None:
                self._nbytes -= old.nbytes
            nbytes = value.numel() * value.element_size()
            if self.max_bytes is not None and self._nbytes + nbytes > self.max_bytes:
                if not self.over_budget:
                    log.warning(
                        "K/V cache budget of %.0f MB reached: further projections are computed, not cached",
                        self.max_bytes / 2**20,
                    )
                self.over_budget = True
                self.stats.bypassed += 1
                continue
            # A separate tensor per row (not a view of the batch), so dropping one entry frees its memory.
            stored = value.clone() if len(full) > 1 and r in full else value
            self._entries[(key, r)] = _Entry(token, refs, pinned, stored, nbytes)
            self._nbytes += nbytes
            self.stats.misses += 1


def cached_cross_attention(
    cache: KVCache,
    name: str,
    x: torch.Tensor,
    context: torch.Tensor,
    to_q: Callable[[torch.Tensor], torch.Tensor],
    to_k: nn.Module,
    to_v: nn.Module,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    value: torch.Tensor | None = None,
    extras_k: Sequence[object] = (),
    extras_v: Sequence[object] = (),
    constant_shortcut: bool = True,
) -> torch.Tensor:
    """Cross-attention up to (not including) its output projection, with K/V through ``cache``.

    ``attend(q, k, v)`` is the host's attention on (b, tokens, inner) tensors. Rows whose context is
    constant along its tokens (the zero negative) skip ``to_q`` and the attention: with every key equal the
    softmax weights are uniform, so the output is that row's one value vector whatever the query (for
    SDXL's bias-free ``to_v`` and a zero context: exactly 0). ``constant_shortcut=False`` (attention masks,
    host attention overrides that index the batch) attends every row.
    """
    b, n = x.shape[0], x.shape[1]
    const = (False,) * b
    if constant_shortcut and value is None and context.shape[0] == b and cache.usable(context, to_v):
        const = cache.constant_rows(context)
    if not any(const):
        k = cache.projected(name + ".to_k", to_k, context, extras_k)
        v = cache.projected(name + ".to_v", to_v, context if value is None else value, extras_v)
        return attend(to_q(x), k, v)
    live = [i for i, c in enumerate(const) if not c]
    dead = [i for i, c in enumerate(const) if c]
    v0 = cache.projected(name + ".to_v", to_v, context, extras_v, rows=dead, compact=True)[:, :1]
    if not live:
        return v0.expand(len(dead), n, -1).contiguous()
    k = cache.projected(name + ".to_k", to_k, context, extras_k, rows=live)
    v = cache.projected(name + ".to_v", to_v, context, extras_v, rows=live)
    part = attend(to_q(x[live]), k, v)
    out = part.new_empty(b, n, part.shape[-1])
    out[live] = part
    out[dead] = v0.to(part.dtype).expand(-1, n, -1)
    return out


def cache_bytes_per_row(tokens: int, kv_inner_dims: Sequence[int], element_size: int) -> int:
    """Memory one (non-constant) context row holds: ``tokens x sum over layers of (K + V inner dims)``."""
    return tokens * 2 * sum(kv_inner_dims) * element_size


# -- diffusers --------------------------------------------------------------------------------------


class CachedCrossAttnProcessor:
    """A diffusers attention processor for cross-attention whose ``to_k`` / ``to_v`` go through a KVCache.

    The same computation as diffusers' ``AttnProcessor2_0`` for SDXL's cross-attention layers (3-D input,
    no group / spatial / cross norms, no residual, output factor 1); any other configuration, and
    self-attention, go to ``fallback`` unchanged.
    """

    def __init__(self, cache: KVCache, name: str, fallback: Callable) -> None:
        self.cache = cache
        self.name = name
        self.fallback = fallback

    @staticmethod
    def supports(attn) -> bool:
        return (
            getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "group_norm", None) is None
            and getattr(attn, "norm_q", None) is None
            and getattr(attn, "norm_k", None) is None
            and not getattr(attn, "norm_cross", None)
            and not getattr(attn, "residual_connection", False)
            and getattr(attn, "rescale_output_factor", 1.0) == 1.0
        )

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if (
            encoder_hidden_states is None
            or hidden_states.ndim != 3
            or args
            or kwargs
            or not self.supports(attn)
        ):
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        b = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        heads = attn.heads

        def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            bb, head_dim = query.shape[0], key.shape[-1] // heads
            query, key, value = (t.view(bb, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
            return out.transpose(1, 2).reshape(bb, -1, heads * head_dim).to(query.dtype)

        out = cached_cross_attention(
            self.cache,
            self.name,
            hidden_states,
            encoder_hidden_states,
            attn.to_q,
            attn.to_k,
            attn.to_v,
            attend,
            constant_shortcut=attention_mask is None,
        )
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def install_kv_cache(unet: nn.Module, cache: KVCache) -> int:
    """Route every cross-attention (``attn2``) of a diffusers UNet through ``cache``; returns the layer count.

    Idempotent: a layer already routed through a cache is re-pointed at this one.
    """
    from diffusers.models.attention_processor import Attention

    n = 0
    for name, module in unet.named_modules():
        if name.endswith("attn2") and isinstance(module, Attention) and module.is_cross_attention:
            current = module.processor
            fallback = current.fallback if isinstance(current, CachedCrossAttnProcessor) else current
            module.set_processor(CachedCrossAttnProcessor(cache, name, fallback))
            n += 1
    return n


def uninstall_kv_cache(unet: nn.Module) -> int:
    """Give every cached cross-attention layer its previous processor back; returns the layer count."""
    n = 0
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, CachedCrossAttnProcessor):
            module.set_processor(processor.fallback)
            n += 1
    return n


def kv_cached_layers(unet: nn.Module) -> int:
    return sum(isinstance(getattr(m, "processor", None), CachedCrossAttnProcessor) for m in unet.modules())
