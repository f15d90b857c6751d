"""EDM diffusion over per-nucleotide atom coordinates (AF3 sections 3.7 and 4.3).

Each residue is one token carrying its ``A = len(ATOM_NAMES)`` atoms: the denoiser reads the
scaled noisy coordinates of the token's atoms and predicts an update for all of them, so no
separate atom transformer is needed for five atoms per nucleotide.

Symmetry, as designed:

- The denoiser is exactly translation-equivariant, ``D(x + t) = D(x) + t``: it works on
  coordinates centred on the centroid of the real residues' atoms and adds the centroid back.
- It is not rotation-equivariant by construction (as in AF3); it learns rotation equivariance
  from the uniformly random rotation applied to every training target and, in the sampler, to
  the current structure before every step (AF3 Algorithm 19, ``CentreRandomAugmentation``).
  Its attention bias from residue distances of the noisy structure is rotation-invariant.

Noise levels ``sigma`` are in A. Preconditioning (Karras et al. 2022, Table 1)::

    c_in = 1 / sqrt(sigma^2 + sigma_data^2)      c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out = sigma sigma_data / sqrt(...)          c_noise = log(sigma / sigma_data) / 4
    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.data.features import ATOM_NAMES, REPRESENTATIVE_ATOM
from pipeline.model.config import ModelConfig
from pipeline.model.layers import (
    ConditionedBlock,
    Transition,
    key_mask_bias,
    pairwise_distances,
    run_block,
)

N_ATOMS = len(ATOM_NAMES)
N_FOURIER = 256
#: Centres of the radial basis on distances between scaled noisy coordinates (c_in * x,
#: unitless: 1 is about sigma_data A at low noise).
RBF_CENTERS = (0.0, 3.0, 16)


def noise_schedule(cfg: ModelConfig, n_steps: int) -> list[float]:
    """Noise levels c_0 > c_1 > ... > c_T in A (T = ``n_steps``; AF3 Algorithm 18, Karras rho)."""
    hi, lo = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    return [(hi + i / n_steps * (lo - hi)) ** cfg.rho for i in range(n_steps + 1)]


def af3_step_fraction(cfg: ModelConfig, t_hat: float, c: float) -> float:
    """AF3's Euler step (Algorithm 18) as published: the fraction ``step_scale * (t_hat - c) /
    t_hat`` of the way from the noisy point to the denoised estimate."""
    return cfg.step_scale * (t_hat - c) / t_hat


def euler_step_fraction(cfg: ModelConfig, t_hat: float, c: float) -> float:
    """How far one sampler step moves from the noisy point towards the denoised estimate.

    AF3's Euler step (:func:`af3_step_fraction`) passes the denoised estimate when its fraction
    exceeds 1. What it leaves behind is
    ``fraction - 1`` of the noise present, with flipped sign. With few steps that residue is
    larger than the next level ``c`` (4 steps: fraction 1.34 from 2560 * 1.8 A to 487 A leaves
    ~1,570 A of noise), the next step underestimates the noise it gets, and the error grows
    each step. The fraction is therefore capped at ``1 + c / t_hat``: an overshoot leaves at
    most the noise level ``c`` the schedule promises. The cap never applies with 50 or AF3's
    200 steps; with this model's default 20 only at the last step (1.21 -> 1.19); with 10 at
    the last five. Written by hand: the cap is specific to this sampler.
    """
    return min(af3_step_fraction(cfg, t_hat, c), 1.0 + c / t_hat)


def random_rotations(
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniformly random proper rotations (``shape`` + (3, 3)) float32, from unit quaternions.

    A normalised 4-D Gaussian is uniform on the unit sphere of quaternions, which maps to the
    Haar measure on SO(3).
    """
    q = torch.randn(*shape, 4, device=device, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def masked_centroid(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Centroid (..., 3) of points ``x`` (..., L, A, 3) weighted by ``weight`` (..., L, A)."""
    w = weight.to(x.dtype)
    total = w.sum(dim=(-1, -2)).clamp_min(1.0)
    return (x * w[..., None]).sum(dim=(-2, -3)) / total[..., None]


def rigid_motion(
    x: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor
) -> torch.Tensor:
    """``x R^T + t`` in float32, also under autocast (bf16 would cost ~0.2 A at 50 A).

    Parameters
    ----------
    x : (B, L, A, 3) or (B, S, L, A, 3) coordinates in A.
    rotation : (B, S, 3, 3); translation : (B, S, 3) in A.

    Returns
    -------
    (B, S, L, A, 3) float32.
    """
    if x.dim() == 4:
        x = x[:, None].expand(-1, rotation.shape[1], -1, -1, -1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        moved = torch.einsum("bslac,bsdc->bslad", x.float(), rotation.float())
    return moved + translation.float()[:, :, None, None, :]


@dataclass
class Conditioning:
    """What the denoiser reads from the trunk; computed once, reused by every sampler step.

    ``single`` (B, L, d) float, ``pair_bias`` (n_blocks, B, H, L, L) with the key mask
    included, ``mask`` (B, L) bool.
    """

    single: torch.Tensor
    pair_bias: torch.Tensor
    mask: torch.Tensor


class DiffusionModule(nn.Module):
    """The EDM denoiser ``D(x_noisy; sigma)`` conditioned on the trunk (AF3 Algorithm 20)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.diffusion_d_model, cfg.diffusion_n_heads
        self.sigma_data = cfg.sigma_data
        self.n_heads = h
        self.n_blocks = cfg.diffusion_n_blocks
        self.checkpoint = cfg.activation_checkpointing
        self.single_cond = nn.Sequential(
            nn.LayerNorm(2 * cfg.d_single), nn.Linear(2 * cfg.d_single, d, bias=False)
        )
        self.pair_cond = nn.Sequential(
            nn.LayerNorm(cfg.d_pair), nn.Linear(cfg.d_pair, h * cfg.diffusion_n_blocks, bias=False)
        )
        # Fixed random Fourier features of the noise level (AF3 Algorithm 22); buffers, so a
        # state_dict round trip restores them exactly.
        self.register_buffer("fourier_w", torch.randn(N_FOURIER))
        self.register_buffer("fourier_b", torch.randn(N_FOURIER))
        self.noise_cond = nn.Sequential(
            nn.LayerNorm(N_FOURIER), nn.Linear(N_FOURIER, d, bias=False)
        )
        self.cond_transition = Transition(d, 2)
        lo, hi, n = RBF_CENTERS
        self.register_buffer("rbf_centers", torch.linspace(lo, hi, n), persistent=False)
        self.rbf_width = (hi - lo) / (n - 1)
        self.geometry_bias = nn.Linear(n, h, bias=False)
        self.token_from_single = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d, bias=False))
        self.token_from_coords = nn.Linear(3 * N_ATOMS, d, bias=False)
        self.blocks = nn.ModuleList([ConditionedBlock(d, h) for _ in range(cfg.diffusion_n_blocks)])
        self.out_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 3 * N_ATOMS, bias=False)
        # Zero output: a fresh denoiser returns c_skip * x, the EDM-optimal guess without data.
        nn.init.zeros_(self.out.weight)

    def condition(
        self,
        s_inputs: torch.Tensor,
        s_trunk: torch.Tensor,
        z_trunk: torch.Tensor,
        mask: torch.Tensor,
    ) -> Conditioning:
        """Trunk outputs (B, L, ds), (B, L, ds), (B, L, L, dp), mask (B, L) -> conditioning."""
        b, length = mask.shape
        single = self.single_cond(torch.cat([s_trunk, s_inputs], dim=-1))
        bias = self.pair_cond(z_trunk).view(b, length, length, self.n_blocks, self.n_heads)
        # Contiguous (n_blocks, B, H, L, L): the fused attention kernels need it.
        bias = bias.permute(3, 0, 4, 1, 2).contiguous() + key_mask_bias(mask).to(bias.dtype)
        return Conditioning(single=single, pair_bias=bias, mask=mask)

    def forward(
        self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """Denoise.

        Parameters
        ----------
        x_noisy : (B, S, L, A, 3) noisy coordinates in A (S diffusion samples per structure).
        sigma : (B, S) noise level in A.
        cond : trunk conditioning for the B structures.

        Returns
        -------
        (B, S, L, A, 3) float32 denoised coordinates in A.
        """
        b, n_samples, length = x_noisy.shape[:3]
        x = x_noisy.float()
        sigma = sigma.float()
        atom_weight = cond.mask[:, None, :, None].expand(b, n_samples, length, N_ATOMS)
        center = masked_centroid(x, atom_weight)[:, :, None, None, :]
        xc = x - center
        var = sigma**2 + self.sigma_data**2
        c_in = var.rsqrt()
        c_skip = self.sigma_data**2 / var
        c_out = sigma * self.sigma_data * c_in
        c_noise = torch.log(sigma / self.sigma_data) / 4
        r = xc * c_in[:, :, None, None, None]

        fourier = torch.cos(2 * math.pi * (c_noise[..., None] * self.fourier_w + self.fourier_b))
        s = cond.single[:, None] + self.noise_cond(fourier)[:, :, None]
        s = s + self.cond_transition(s)
        s = s.flatten(0, 1)  # (B*S, L, d)
        a = self.token_from_single(s) + self.token_from_coords(r.flatten(0, 1).flatten(-2))

        d = pairwise_distances(r[:, :, :, REPRESENTATIVE_ATOM].flatten(0, 1))
        rbf = torch.exp(-(((d[..., None] - self.rbf_centers) / self.rbf_width) ** 2))
        geometry = self.geometry_bias(rbf).permute(0, 3, 1, 2).contiguous()
        geometry = geometry.view(b, n_samples, self.n_heads, length, length)
        for block, pair_bias in zip(self.blocks, cond.pair_bias):
            a = run_block(block, a, s, pair_bias, geometry, checkpoint=self.checkpoint)
        update = self.out(self.out_norm(a)).float().view(b, n_samples, length, N_ATOMS, 3)
        shape = (b, n_samples, 1, 1, 1)
        return center + c_skip.view(shape) * xc + c_out.view(shape) * update
