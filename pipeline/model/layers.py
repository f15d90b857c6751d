"""Building blocks shared by the trunk, the diffusion module and the confidence head.

Shapes use ``N`` for a flattened batch (structures, or structures x diffusion samples), ``L``
for residues, ``H`` for heads. Masks are bool, True for real residues. Attention biases are
additive float tensors that already contain the key mask (see :func:`key_mask_bias`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

#: Additive bias for masked keys. Finite, so a row can never become all ``-inf`` (NaN in the
#: softmax); ``exp(-1e9)`` is exactly 0 in every float format, so padding gets zero weight.
MASK_BIAS = -1e9


def key_mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """(N, L) bool -> (N, 1, 1, L) float32 bias: 0 for real keys, :data:`MASK_BIAS` for padding."""
    return torch.where(mask, 0.0, MASK_BIAS).to(torch.float32)[:, None, None, :]


class Transition(nn.Module):
    """Pre-LayerNorm SwiGLU feed-forward block (AF3 Algorithm 11); returns the update only."""

    def __init__(self, d: int, factor: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * factor * d, bias=False)
        self.down = nn.Linear(factor * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class AttentionPairBias(nn.Module):
    """Gated multi-head self-attention whose logits get an additive per-head pair bias.

    The input is expected to be normalised already (by LayerNorm or AdaLN in the caller); the
    bias must hold the key mask. Uses :func:`torch.nn.functional.scaled_dot_product_attention`,
    which picks the memory-efficient kernel on CUDA for a float mask, provided the mask's last
    dimension is dense (stride 1). A bias permuted from a (..., L, L, H) projection is not:
    callers make it contiguous once, or SDPA silently falls back to its unfused math path,
    which materialises the attention matrix (measured: all attention of the model ran there).
    """

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"n_heads must divide d, but got d={d}, n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d, d)
        self.kvg = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x`` (N, L, d), ``bias`` (N, H, L, L) or broadcastable -> update (N, L, d)."""
        n, length, d = x.shape
        h = self.n_heads
        q = self.q(x)
        k, v, g = self.kvg(x).chunk(3, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, length, h, d // h).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        # SDPA wants the float mask in the query's dtype (bf16 under autocast).
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        o = o.transpose(1, 2).reshape(n, length, d)
        return self.out(torch.sigmoid(g) * o)


class TriangleMultiplication(nn.Module):
    """Triangle multiplicative update (AF2 Algorithms 11/12, AF3 Algorithms 12/13).

    ``outgoing``: z_ij += sum_k a_ik b_jk; ``incoming``: z_ij += sum_k a_ki b_kj. Padding pairs
    are zeroed in ``a`` and ``b``, so they never enter the sum over ``k``.
    """

    def __init__(self, d_pair: int, *, outgoing: bool) -> None:
        super().__init__()
        self.outgoing = outgoing
        self.norm_in = nn.LayerNorm(d_pair)
        self.proj = nn.Linear(d_pair, 4 * d_pair, bias=False)  # a, b and their gates
        self.gate = nn.Linear(d_pair, d_pair, bias=False)
        self.norm_out = nn.LayerNorm(d_pair)
        self.out = nn.Linear(d_pair, d_pair, bias=False)

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """``z`` (B, L, L, c), ``pair_mask`` (B, L, L) bool -> update (B, L, L, c)."""
        x = self.norm_in(z)
        batch, length, _, c = x.shape
        # The projection is computed channel-first, W @ x^T -> (4c, B, L, L), so that the sum
        # over k is one batched product over (channel, structure) whose operands need no
        # layout copies (einsum on channel-last a and b copies both, forward and backward).
        proj = torch.matmul(self.proj.weight, x.reshape(-1, c).transpose(0, 1))
        a, a_gate, b, b_gate = proj.view(4, c, batch, length, length).unbind(0)
        m = pair_mask.to(a.dtype)
        a = (a * torch.sigmoid(a_gate) * m).flatten(0, 1)  # (c * B, L, L)
        b = (b * torch.sigmoid(b_gate) * m).flatten(0, 1)
        if self.outgoing:  # t_ij = sum_k a_ik b_jk
            t = torch.bmm(a, b.transpose(1, 2))
        else:  # t_ij = sum_k a_ki b_kj
            t = torch.bmm(a.transpose(1, 2), b)
        t = t.view(c, batch, length, length).permute(1, 2, 3, 0)  # (B, L, L, c)
        return torch.sigmoid(self.gate(x)) * self.out(self.norm_out(t))


class SingleToPair(nn.Module):
    """Low-rank outer update of the pair from the single representation: z_ij += W(a_i * b_j).

    A cheap stand-in for AF2's outer-product mean (which needs an MSA): it lets each block's
    single update reach the pair, in O(L^2 c) memory instead of O(L^2 c^2).
    """

    def __init__(self, d_single: int, d_pair: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_single)
        self.proj = nn.Linear(d_single, 2 * d_pair, bias=False)
        self.out = nn.Linear(d_pair, d_pair)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``s`` (B, L, d_single) -> update (B, L, L, d_pair)."""
        a, b = self.proj(self.norm(s)).chunk(2, dim=-1)
        return self.out(a[:, :, None, :] * b[:, None, :, :])


class AdaLN(nn.Module):
    """Adaptive LayerNorm (AF3 Algorithm 26): normalise ``a`` and modulate it by ``s``."""

    def __init__(self, d: int, d_cond: int) -> None:
        super().__init__()
        self.norm_a = nn.LayerNorm(d, elementwise_affine=False)
        self.norm_s = nn.LayerNorm(d_cond, bias=False)
        self.scale = nn.Linear(d_cond, d)
        self.shift = nn.Linear(d_cond, d, bias=False)

    def forward(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = self.norm_s(s)
        return torch.sigmoid(self.scale(s)) * self.norm_a(a) + self.shift(s)


class ConditionedBlock(nn.Module):
    """Diffusion-transformer block (AF3 Algorithms 23-25): AdaLN attention with pair bias and
    an AdaLN SwiGLU transition, each output gated by ``sigmoid(Linear(s))`` initialised near 0.1
    so that a fresh block starts close to the identity."""

    def __init__(self, d: int, n_heads: int, factor: int = 2) -> None:
        super().__init__()
        self.attn_norm = AdaLN(d, d)
        self.attn = AttentionPairBias(d, n_heads)
        self.attn_gate = nn.Linear(d, d)
        self.ff_norm = AdaLN(d, d)
        self.ff_up = nn.Linear(d, 2 * factor * d, bias=False)
        self.ff_down = nn.Linear(factor * d, d, bias=False)
        self.ff_gate = nn.Linear(d, d)
        for gate in (self.attn_gate, self.ff_gate):
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, -2.0)

    def forward(
        self, a: torch.Tensor, s: torch.Tensor, pair_bias: torch.Tensor, sample_bias: torch.Tensor
    ) -> torch.Tensor:
        """One block.

        Parameters
        ----------
        a, s : (B*S, L, d) token activations and conditioning, S samples per structure.
        pair_bias : (B, H, L, L) this block's bias from the trunk pair, with the key mask.
        sample_bias : (B, S, H, L, L) bias shared by all blocks, per sample.

        The two biases are summed here rather than by the caller, so that activation
        checkpointing saves the small per-block part only (not a (B*S, H, L, L) sum per block).
        """
        bias = (pair_bias[:, None] + sample_bias).flatten(0, 1)
        a = a + torch.sigmoid(self.attn_gate(s)) * self.attn(self.attn_norm(a, s), bias)
        x, y = self.ff_up(self.ff_norm(a, s)).chunk(2, dim=-1)
        return a + torch.sigmoid(self.ff_gate(s)) * self.ff_down(F.silu(x) * y)


#: Added to squared distances (A^2) so that the gradient at zero distance stays finite.
_DIST_EPS = 1e-6


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (..., N, N) in float32 between points ``x`` (..., N, 3) in A.

    From the Gram matrix in float64: precise (float32 Gram loses ~0.01 A at 50 A, TF32 ~1 A),
    memory-lean in backward (unlike ``torch.cdist``'s difference kernel, whose CUDA backward
    allocates (..., N, N, 3) and overflows 32-bit indexing beyond 2^31 elements), and
    unaffected by autocast. A zero distance comes out as 1e-3 A, with a finite gradient.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.double()
        sq = (x * x).sum(-1)
        d2 = sq[..., :, None] + sq[..., None, :] - 2 * (x @ x.transpose(-1, -2))
        # Rounding can make d2 slightly negative (~1e-12 A^2): the eps dominates it.
        return (d2.float() + _DIST_EPS).sqrt()


def run_block(module: nn.Module, *args: torch.Tensor, checkpoint: bool):
    """Call ``module(*args)``, recomputing it in backward when ``checkpoint`` (training only)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)
