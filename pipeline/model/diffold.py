"""Diffold: trunk + EDM diffusion module + distogram and pLDDT heads.

Training (``forward``): the trunk runs once per structure; ``n_diffusion_samples`` randomly
rotated, translated and noised copies of the native share it (AF3's "diffusion batch"). Noise
comes from torch's global RNG, so the trainer's seeding makes runs reproducible.

Prediction (``sample``): the trunk runs once; the AF3 sampler (Algorithm 18) repeats the
denoiser ``n_steps`` times; the confidence head scores the final structures. It reads only
:data:`pipeline.data.features.FEATURE_KEYS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.flop_counter import FlopCounterMode

from pipeline.data.features import FEATURE_KEYS, TARGET_KEYS
from pipeline.errors import ConfigError
from pipeline.model import losses
from pipeline.model.config import ModelConfig
from pipeline.model.diffusion import (
    N_ATOMS,
    DiffusionModule,
    euler_step_fraction,
    masked_centroid,
    noise_schedule,
    random_rotations,
    rigid_motion,
)
from pipeline.model.heads import ConfidenceHead, DistogramHead, distogram_edges, plddt_bin_centers
from pipeline.model.trunk import Trunk

logger = logging.getLogger(__name__)

#: Odd 64-bit constant (golden ratio) that spreads per-structure sampler seeds apart.
_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclasses.dataclass
class TrainingNoise:
    """The random draws of one training forward pass (B structures, S samples each).

    ``sigma`` (B, S) noise level in A; ``rotation`` (B, S, 3, 3) proper rotations and
    ``translation`` (B, S, 3) in A applied to the centred native; ``eps`` (B, S, L, A, 3)
    standard normal noise.
    """

    sigma: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    eps: torch.Tensor


class Diffold(nn.Module):
    """The Diffold model. Build it with :func:`build_model`.

    Parameters
    ----------
    cfg : validated model configuration; cross-field problems raise :class:`ConfigError`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ConfigError("; ".join(problems))
        self.cfg = cfg
        self.trunk = Trunk(cfg)
        self.diffusion = DiffusionModule(cfg)
        self.distogram = DistogramHead(cfg) if cfg.distogram else None
        self.confidence = ConfidenceHead(cfg)
        self.register_buffer("distogram_edges", distogram_edges(cfg), persistent=False)
        if cfg.compile:
            # In-place compilation of the repeated blocks keeps state_dict keys unchanged
            # (compiling the whole model would prefix them with "_orig_mod.").
            for block in [*self.trunk.blocks, *self.diffusion.blocks]:
                block.compile()

    # ------------------------------------------------------------------------------ training
    def draw_training_noise(self, batch: dict) -> TrainingNoise:
        """Draw sigma, augmentation and noise for ``batch`` from torch's global RNG."""
        cfg = self.cfg
        coords = batch["coords"]
        b, length = coords.shape[:2]
        shape = (b, cfg.n_diffusion_samples)
        device = coords.device
        log_sigma = cfg.p_mean + cfg.p_std * torch.randn(shape, device=device)
        return TrainingNoise(
            sigma=cfg.sigma_data * torch.exp(log_sigma),
            rotation=random_rotations(shape, device=device),
            translation=cfg.augment_translation * torch.randn(*shape, 3, device=device),
            eps=torch.randn(*shape, length, N_ATOMS, 3, device=device),
        )

    def loss_terms(self, batch: dict, noise: TrainingNoise) -> dict[str, torch.Tensor]:
        """Unweighted loss terms per structure, each (B,), for the given random draws.

        Kept separate from :meth:`forward` so that tests can feed identical draws to a padded
        and an unpadded batch.
        """
        cfg = self.cfg
        features = {k: batch[k] for k in FEATURE_KEYS}
        mask = batch["residue_mask"].bool()
        atom_mask = batch["atom_mask"].bool() & mask[..., None]
        native = _centred_native(batch["coords"].float(), atom_mask)

        # record_function labels the phases in profiler traces (negligible cost otherwise).
        with record_function("diffold.trunk"):
            s_inputs, s, z = self.trunk(features)
        with record_function("diffold.diffusion"):
            cond = self.diffusion.condition(s_inputs, s, z, mask)
            # Missing atoms are filled (see _centred_native) so the denoiser input stays
            # plausible; they are masked out of every loss.
            target = rigid_motion(native, noise.rotation, noise.translation)
            x_noisy = target + noise.sigma[:, :, None, None, None] * noise.eps
            denoised = self.diffusion(x_noisy, noise.sigma, cond)
        with record_function("diffold.heads"):
            plddt_logits = self.confidence(s, z, denoised, mask)
            distogram_logits = self.distogram(z) if self.distogram is not None else None

        with record_function("diffold.losses"), torch.autocast(
            device_type=denoised.device.type, enabled=False
        ):
            terms = {
                "diffusion": losses.aligned_mse(
                    denoised, target, atom_mask, noise.sigma.float(), cfg.sigma_data
                ).mean(1),
                "smooth_lddt": losses.smooth_lddt_loss(
                    denoised, native, atom_mask, cfg.loss.smooth_lddt_radius
                ).mean(1),
            }
            if distogram_logits is not None:
                terms["distogram"] = losses.distogram_loss(
                    distogram_logits, native, atom_mask, self.distogram_edges
                )
            bins, valid = losses.plddt_targets(denoised, native, atom_mask, cfg.plddt_bins)
            terms["plddt"] = losses.plddt_loss(plddt_logits, bins, valid)
        return terms

    def forward(self, batch: dict) -> dict:
        """Training loss of a batch (see :mod:`pipeline.data.features` for the keys).

        Returns
        -------
        dict with ``"loss"``: scalar float32, differentiable, the weighted sum of the terms
        averaged over structures; ``"terms"``: name -> detached scalar (unweighted), names
        ``diffusion``, ``smooth_lddt``, ``distogram`` (when enabled), ``plddt``.
        """
        per_structure = self.loss_terms(batch, self.draw_training_noise(batch))
        terms = {name: value.mean() for name, value in per_structure.items()}
        weights = dataclasses.asdict(self.cfg.loss)
        loss = sum(weights[name] * value for name, value in terms.items())
        return {"loss": loss, "terms": {name: v.detach() for name, v in terms.items()}}

    # ---------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def sample(
        self,
        features: dict,
        *,
        n_samples: int = 1,
        n_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """Predict structures from sequence features alone.

        Parameters
        ----------
        features : the :data:`FEATURE_KEYS` of a batch, on the model's device. Passing
            ``coords`` raises ``ValueError``: prediction must never see the native.
        n_samples : structures sampled per input (they share one trunk pass).
        n_steps : sampler steps; default ``cfg.n_steps``.
        generator : source of all randomness; equal generator states give equal outputs. Each
            structure draws from its own stream seeded from ``generator``, so a structure's
            samples do not depend on how long the others in its batch are (padding must be at
            the end of each row, as :func:`pipeline.data.collate` makes it).

        Returns
        -------
        dict with ``"coords"`` (B, S, L, A, 3) float32 in A (0 at padding) and ``"plddt"``
        (B, S, L) float32 in [0, 100] (0 at padding).
        """
        forbidden = [k for k in TARGET_KEYS if k in features]
        if forbidden:
            raise ValueError(
                f"sample() takes prediction features only ({', '.join(FEATURE_KEYS)}); "
                f"got native key(s) {forbidden}: pass pipeline.data.features_only(batch)"
            )
        missing = [k for k in FEATURE_KEYS if k not in features]
        if missing:
            raise ValueError(f"sample() features lack key(s) {missing}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, but got n_samples={n_samples}")
        n_steps = self.cfg.n_steps if n_steps is None else n_steps
        if n_steps < 1:
            raise ValueError(f"n_steps must be at least 1, but got n_steps={n_steps}")

        cfg = self.cfg
        mask = features["residue_mask"].bool()
        b, length = mask.shape
        device = mask.device
        with _eval_mode(self):
            s_inputs, s, z = self.trunk({k: features[k] for k in FEATURE_KEYS})
            cond = self.diffusion.condition(s_inputs, s, z, mask)
            # One host sync per call (not per step): how many leading positions of each row
            # get noise (up to its last real residue; padding sits at the end).
            positions = torch.arange(1, length + 1, device=device)
            lengths = (positions * mask).amax(1).tolist()
            streams = _structure_streams(b, generator, device)
            sigmas = noise_schedule(cfg, n_steps)
            x = sigmas[0] * _draw_noise(streams, lengths, n_samples, length, device)
            atom_weight = mask[:, None, :, None].expand(b, n_samples, length, N_ATOMS)
            for c_prev, c in zip(sigmas[:-1], sigmas[1:]):
                rotation, translation = _draw_rigid(streams, n_samples, device)
                x = x - masked_centroid(x, atom_weight)[:, :, None, None, :]
                x = rigid_motion(x, rotation, cfg.augment_translation * translation)
                gamma = cfg.gamma_0 if c > cfg.gamma_min else 0.0
                t_hat = c_prev * (gamma + 1)
                churn = cfg.noise_scale * math.sqrt(max(t_hat**2 - c_prev**2, 0.0))
                x_noisy = x + churn * _draw_noise(streams, lengths, n_samples, length, device)
                sigma = torch.full((b, n_samples), t_hat, device=device)
                denoised = self.diffusion(x_noisy, sigma, cond)
                x = x_noisy - euler_step_fraction(cfg, t_hat, c) * (x_noisy - denoised)
            logits = self.confidence(s, z, x, mask)
            centers = plddt_bin_centers(cfg.plddt_bins, device)
            plddt = (torch.softmax(logits.float(), dim=-1) * centers).sum(-1)
        real = mask[:, None, :]
        return {
            "coords": (x * real[..., None, None]).float(),
            "plddt": (plddt * real).float(),
        }


# -------------------------------------------------------------------------------- helpers
def _centred_native(coords: torch.Tensor, atom_mask: torch.Tensor) -> torch.Tensor:
    """Native (B, L, A, 3) centred on its present atoms; a missing atom is placed at the
    centroid of its residue's present atoms (or at the origin if it has none). Masked
    coordinates may hold anything, NaN included."""
    coords = torch.where(atom_mask[..., None], coords, 0.0)
    x = coords - masked_centroid(coords, atom_mask)[:, None, None, :]
    m = atom_mask[..., None].to(x.dtype)
    residue_centroid = (x * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1)
    return torch.where(atom_mask[..., None], x, residue_centroid)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _structure_streams(
    n: int, generator: torch.Generator | None, device: torch.device
) -> list[torch.Generator]:
    """One generator per structure, all seeded from one draw of ``generator``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
    return [
        torch.Generator(device=device).manual_seed((base + i * _SEED_STRIDE) % 2**63)
        for i in range(n)
    ]


def _draw_noise(
    streams: list[torch.Generator], lengths: list[int], n_samples: int, length: int,
    device: torch.device,
) -> torch.Tensor:
    """Standard normal (B, S, L, A, 3); zero at padding; structure b drawn from streams[b]."""
    out = torch.zeros(len(streams), n_samples, length, N_ATOMS, 3, device=device)
    for i, (stream, n) in enumerate(zip(streams, lengths)):
        out[i, :, :n] = torch.randn(n_samples, n, N_ATOMS, 3, device=device, generator=stream)
    return out


def _draw_rigid(
    streams: list[torch.Generator], n_samples: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotations (B, S, 3, 3) and standard normal translations (B, S, 3), per stream."""
    rotation = torch.stack(
        [random_rotations((n_samples,), device=device, generator=g) for g in streams]
    )
    translation = torch.stack(
        [torch.randn(n_samples, 3, device=device, generator=g) for g in streams]
    )
    return rotation, translation


def build_model(cfg: ModelConfig) -> Diffold:
    """Build a Diffold model from its config (parameters initialised from torch's global RNG)."""
    model = Diffold(cfg)
    logger.info("built Diffold with %s parameters", f"{count_parameters(model):,}")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_step(model: nn.Module, batch: dict) -> int:
    """Floating-point operations of one training step's forward and backward on ``batch``.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
    attention; elementwise work is not counted). Leaves the model's gradients and torch's RNG
    state as they were.
    """
    device = batch["aatype"].device
    saved = {p: p.grad for p in model.parameters()}
    for p in saved:
        p.grad = None
    counter = FlopCounterMode(display=False)
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices), counter:
            model(batch)["loss"].backward()
    finally:
        for p, grad in saved.items():
            p.grad = grad
    return int(counter.get_total_flops())
