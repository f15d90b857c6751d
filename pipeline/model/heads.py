"""Output heads: distogram (from the trunk pair) and pLDDT confidence (from a structure)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.features import REPRESENTATIVE_ATOM
from pipeline.model.config import ModelConfig
from pipeline.model.layers import AttentionPairBias, Transition, key_mask_bias, pairwise_distances

#: Edges in A of the representative-atom distance bins that the confidence head sees of the
#: structure it scores (AF3 Algorithm 31 uses 3.375-21.375 A for its distance embedding).
CONFIDENCE_DISTANCE_EDGES = (3.375, 21.375, 39)


def distogram_edges(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inner bin edges in A, ``distogram_bins - 1`` of them.

    Bin k holds ``edges[k-1] < d <= edges[k]`` (torch.bucketize); the first and last bins are
    open-ended.
    """
    return torch.linspace(
        cfg.distogram_min_dist, cfg.distogram_max_dist, cfg.distogram_bins - 1, device=device
    )


def plddt_bin_centers(n_bins: int, device: torch.device | None = None) -> torch.Tensor:
    """Centres of the ``n_bins`` equal-width lDDT bins on [0, 100]."""
    return (torch.arange(n_bins, device=device, dtype=torch.float32) + 0.5) * (100.0 / n_bins)


class DistogramHead(nn.Module):
    """Symmetric logits (B, L, L, distogram_bins) of the representative-atom distance."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(cfg.d_pair), nn.Linear(cfg.d_pair, cfg.distogram_bins)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.proj(z)
        return (logits + logits.transpose(1, 2)) / 2


class ConfidenceHead(nn.Module):
    """Per-residue lDDT logits of a given structure (reduced AF3 Algorithm 31).

    Reads the trunk single and pair representations and the binned representative-atom
    distances of the structure being scored; all inputs are detached, so the confidence loss
    trains this head only (as in AF3).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lo, hi, n = CONFIDENCE_DISTANCE_EDGES
        self.register_buffer("edges", torch.linspace(lo, hi, n), persistent=False)
        self.n_heads = cfg.n_heads
        self.n_blocks = cfg.confidence_blocks
        hb = cfg.n_heads * cfg.confidence_blocks
        self.single_in = nn.Sequential(
            nn.LayerNorm(cfg.d_single), nn.Linear(cfg.d_single, cfg.d_single, bias=False)
        )
        self.pair_bias = nn.Sequential(
            nn.LayerNorm(cfg.d_pair), nn.Linear(cfg.d_pair, hb, bias=False)
        )
        self.distance_bias = nn.Embedding(n + 1, hb)
        self.norms = nn.ModuleList([nn.LayerNorm(cfg.d_single) for _ in range(self.n_blocks)])
        self.attns = nn.ModuleList(
            [AttentionPairBias(cfg.d_single, cfg.n_heads) for _ in range(self.n_blocks)]
        )
        self.transitions = nn.ModuleList(
            [Transition(cfg.d_single, cfg.transition_factor) for _ in range(self.n_blocks)]
        )
        self.out = nn.Sequential(
            nn.LayerNorm(cfg.d_single), nn.Linear(cfg.d_single, cfg.plddt_bins)
        )

    def forward(
        self, s: torch.Tensor, z: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, S, L, plddt_bins).

        Parameters
        ----------
        s : (B, L, ds) trunk single; z : (B, L, L, dp) trunk pair.
        coords : (B, S, L, A, 3) structures in A (S per trunk pass).
        mask : (B, L) bool, real residues.
        """
        b, n_samples, length = coords.shape[:3]
        s, z, coords = s.detach(), z.detach(), coords.detach()
        d = pairwise_distances(coords[:, :, :, REPRESENTATIVE_ATOM])
        bins = torch.bucketize(d, self.edges)
        bias = self.pair_bias(z)[:, None] + self.distance_bias(bins)  # (B, S, L, L, H * blocks)
        bias = bias.view(b * n_samples, length, length, self.n_blocks, self.n_heads)
        bias = bias.permute(3, 0, 4, 1, 2).contiguous()  # see AttentionPairBias
        key_bias = key_mask_bias(mask).repeat_interleave(n_samples, dim=0).to(bias.dtype)
        x = self.single_in(s).repeat_interleave(n_samples, dim=0)  # (B*S, L, ds)
        blocks = zip(self.norms, self.attns, self.transitions, bias)
        for norm, attn, transition, block_bias in blocks:
            x = x + attn(norm(x), block_bias + key_bias)
            x = x + transition(x)
        return self.out(x).view(b, n_samples, length, -1)
