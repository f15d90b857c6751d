"""Input embedding and the trunk: single (B, L, d_single) and pair (B, L, L, d_pair) updates.

The trunk reads only prediction-time features (:data:`pipeline.data.features.FEATURE_KEYS`).
A trunk block is a slimmed Pairformer block (AF3 Algorithm 17) without triangle attention:
single-to-pair update, optional triangle multiplicative updates, pair transition, then
single attention with pair bias and a single transition.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.features import NUCLEOTIDES, UNKNOWN_NUCLEOTIDE
from pipeline.model.config import ModelConfig
from pipeline.model.layers import (
    AttentionPairBias,
    SingleToPair,
    Transition,
    TriangleMultiplication,
    key_mask_bias,
    run_block,
)

N_RESIDUE_TYPES = len(NUCLEOTIDES) + 1  # ACGU + unknown


class InputEmbedder(nn.Module):
    """Sequence and relative-position embedding.

    Relative position (AF3 Algorithm 3, reduced): the offset ``residue_index_j -
    residue_index_i`` clipped to ``+-relpos_max`` within one chain, and one extra bin for pairs
    on different chains.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.relpos_max = cfg.relpos_max
        self.residue = nn.Embedding(N_RESIDUE_TYPES, cfg.d_single)
        self.pair_left = nn.Linear(cfg.d_single, cfg.d_pair, bias=False)
        self.pair_right = nn.Linear(cfg.d_single, cfg.d_pair, bias=False)
        self.relpos = nn.Embedding(2 * cfg.relpos_max + 2, cfg.d_pair)

    def forward(self, features: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> ``s_inputs`` (B, L, d_single), ``z`` (B, L, L, d_pair)."""
        # Padding may hold any residue code (a collate pad value of -1, say): read it as
        # "unknown" so that it can never index out of the table.
        mask = features["residue_mask"].bool()
        aatype = torch.where(mask, features["aatype"], UNKNOWN_NUCLEOTIDE)
        s = self.residue(aatype)
        ri = features["residue_index"]
        ci = features["chain_index"]
        offset = (ri[:, None, :] - ri[:, :, None]).clamp(-self.relpos_max, self.relpos_max)
        same_chain = ci[:, None, :] == ci[:, :, None]
        bins = torch.where(same_chain, offset + self.relpos_max, 2 * self.relpos_max + 1)
        z = self.relpos(bins) + self.pair_left(s)[:, :, None] + self.pair_right(s)[:, None, :]
        return s, z


class TrunkBlock(nn.Module):
    """One trunk block; every residual update is followed by dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.single_to_pair = SingleToPair(cfg.d_single, cfg.d_pair)
        self.triangle = (
            nn.ModuleList(
                [
                    TriangleMultiplication(cfg.d_pair, outgoing=True),
                    TriangleMultiplication(cfg.d_pair, outgoing=False),
                ]
            )
            if cfg.triangle_updates
            else nn.ModuleList()
        )
        self.pair_transition = Transition(cfg.d_pair, cfg.transition_factor)
        self.pair_bias = nn.Sequential(
            nn.LayerNorm(cfg.d_pair), nn.Linear(cfg.d_pair, cfg.n_heads, bias=False)
        )
        self.single_norm = nn.LayerNorm(cfg.d_single)
        self.attn = AttentionPairBias(cfg.d_single, cfg.n_heads)
        self.single_transition = Transition(cfg.d_single, cfg.transition_factor)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, s: torch.Tensor, z: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``s`` (B, L, ds), ``z`` (B, L, L, dp), ``mask`` (B, L) bool -> updated (s, z)."""
        pair_mask = mask[:, :, None] & mask[:, None, :]
        z = z + self.dropout(self.single_to_pair(s))
        for tri in self.triangle:
            z = z + self.dropout(tri(z, pair_mask))
        z = z + self.pair_transition(z)
        bias = self.pair_bias(z).permute(0, 3, 1, 2).contiguous()  # see AttentionPairBias
        bias = bias + key_mask_bias(mask).to(bias.dtype)
        s = s + self.dropout(self.attn(self.single_norm(s), bias))
        s = s + self.single_transition(s)
        return s, z


class Trunk(nn.Module):
    """Embedding followed by ``n_blocks`` trunk blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = InputEmbedder(cfg)
        self.blocks = nn.ModuleList([TrunkBlock(cfg) for _ in range(cfg.n_blocks)])
        self.checkpoint = cfg.activation_checkpointing

    def forward(self, features: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features -> ``s_inputs`` (B, L, ds), ``s`` (B, L, ds), ``z`` (B, L, L, dp)."""
        mask = features["residue_mask"].bool()
        s_inputs, z = self.embed(features)
        s = s_inputs
        for block in self.blocks:
            s, z = run_block(block, s, z, mask, checkpoint=self.checkpoint)
        return s_inputs, s, z
