"""The connector: VLM hidden states -> SDXL cross-attention context and pooled vector.

A stack of pre-norm, non-causal transformer blocks (the paper: 16 layers) over the VLM's last hidden
states. Padding positions are masked out of every attention and zeroed in the output, so a padded batch
gives exactly the unpadded result at real positions. The pooled vector (SDXL's 1280-d "text_embeds")
comes from a learned query that attends over the real tokens: unlike a mean, it can weigh tokens, and it
is the only per-prompt summary SDXL's micro-conditioning path sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConnectorConfig:
    in_dim: int = 4096  # the VLM's hidden size (idefics2-8b's Mistral-7B)
    width: int = 1024
    layers: int = 16
    heads: int = 16
    mlp_ratio: float = 4.0
    context_dim: int = 2048  # SDXL cross-attention dim
    pooled_dim: int = 1280  # SDXL pooled text embedding dim

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"connector width {self.width} is not divisible by heads {self.heads}")


class ConnectorBlock(nn.Module):
    """Pre-norm transformer block; the unit FSDP shards and activation checkpointing wraps."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class MumuConnector(nn.Module):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
        self.proj_in = nn.Linear(config.in_dim, config.width)
        self.blocks = nn.ModuleList(
            ConnectorBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.norm_out = nn.LayerNorm(config.width)
        self.proj_context = nn.Linear(config.width, config.context_dim)
        self.pool_query = nn.Parameter(torch.randn(1, 1, config.width) * config.width**-0.5)
        self.pool_attn = nn.MultiheadAttention(config.width, config.heads, batch_first=True)
        self.proj_pooled = nn.Linear(config.width, config.pooled_dim)
        self.gradient_checkpointing = False

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, in_dim), mask (B, N) true at real tokens -> context (B, N, C), pooled (B, P)."""
        b, n, _ = hidden_states.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.bool, device=hidden_states.device)
        mask = attention_mask.bool()
        if not mask.any(dim=1).all():
            raise ValueError("a prompt in the batch has no tokens at all (its attention mask is all zero)")
        x = self.proj_in(hidden_states)
        # Additive bias, (B, 1, 1, N): padded keys get -inf for every query.
        bias = torch.zeros(b, 1, 1, n, dtype=x.dtype, device=x.device).masked_fill(
            ~mask[:, None, None, :], float("-inf")
        )
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        x = self.norm_out(x)
        context = self.proj_context(x) * mask[..., None].to(x.dtype)
        query = self.pool_query.expand(b, -1, -1).to(x.dtype)
        pooled, _ = self.pool_attn(query, x, x, key_padding_mask=~mask, need_weights=False)
        return context, self.proj_pooled(pooled[:, 0])
