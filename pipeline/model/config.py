"""Configuration of the Diffold model (section ``model`` of the run config).

The defaults describe a small model that trains in seconds on a laptop CPU; the presets in
``configs/presets/`` scale it up. Noise levels are in Angstrom throughout (AlphaFold 3 states
its sampler constants in units of ``sigma_data``; the defaults below are those constants times
``sigma_data = 16`` A).

Reference: Abramson, J. et al. (2024). Accurate structure prediction of biomolecular
interactions with AlphaFold 3. Nature 630, 493-500 (Supplementary Information, sections 3.7,
4.3 and 4.4). Karras, T. et al. (2022). Elucidating the design space of diffusion-based
generative models (EDM). NeurIPS.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.fields import spec


@dataclass
class LossConfig:
    """Weights of the loss terms and the smooth-lDDT inclusion radius.

    AlphaFold 3 weighs ``4 * (MSE + smooth lDDT) + 0.03 * distogram + 1e-4 * confidence``; here
    the diffusion terms carry weight 1 and the others are scaled up a little, because this model
    has no MSA and the distogram is its main direct signal for the trunk.
    """

    diffusion: float = spec(1.0, ge=0, help="weight of the EDM-weighted MSE after rigid alignment")
    smooth_lddt: float = spec(1.0, ge=0, help="weight of the smooth-lDDT loss (1 - smooth lDDT)")
    distogram: float = spec(0.05, ge=0, help="weight of the distogram cross-entropy")
    plddt: float = spec(0.01, ge=0, help="weight of the pLDDT cross-entropy (confidence head)")
    smooth_lddt_radius: float = spec(
        30.0, gt=0, help="inclusion radius of smooth lDDT in A (AF3 uses 30 A for nucleotides)"
    )


@dataclass
class ModelConfig:
    """Sizes and options of the Diffold trunk, diffusion module, heads and losses."""

    # --- trunk -----------------------------------------------------------------------------
    d_single: int = spec(64, ge=8, help="width of the per-residue (single) representation")
    d_pair: int = spec(32, ge=4, help="width of the residue-pair representation")
    n_blocks: int = spec(2, ge=1, help="number of trunk blocks")
    n_heads: int = spec(4, ge=1, help="attention heads in the trunk and confidence head")
    triangle_updates: bool = spec(
        True, help="triangle multiplicative updates (outgoing and incoming) in each trunk block"
    )
    transition_factor: int = spec(
        2, ge=1, help="hidden width of the SwiGLU transitions, as a multiple of the input width"
    )
    relpos_max: int = spec(
        32, ge=1, help="relative residue offsets are clipped to +-relpos_max (same chain only)"
    )
    dropout: float = spec(0.1, ge=0, lt=1, help="dropout on the residual updates of the trunk")
    # --- diffusion module ------------------------------------------------------------------
    diffusion_d_model: int = spec(64, ge=8, help="width of the diffusion transformer")
    diffusion_n_blocks: int = spec(2, ge=1, help="number of diffusion transformer blocks")
    diffusion_n_heads: int = spec(4, ge=1, help="attention heads in the diffusion transformer")
    # --- EDM training noise and preconditioning --------------------------------------------
    sigma_data: float = spec(16.0, gt=0, help="data standard deviation in A (AF3: 16)")
    p_mean: float = spec(-1.2, help="mean of log(sigma / sigma_data) of the training noise")
    p_std: float = spec(1.5, gt=0, help="std of log(sigma / sigma_data) of the training noise")
    n_diffusion_samples: int = spec(
        4, ge=1, help="noised copies per training example sharing one trunk pass (AF3: 48)"
    )
    augment_translation: float = spec(
        1.0, ge=0, help="std in A of the random translation added with the random rotation"
    )
    # --- sampler (AF3 Algorithm 18) ---------------------------------------------------------
    n_steps: int = spec(20, ge=1, help="sampler steps (denoiser calls) per structure (AF3: 200)")
    sigma_min: float = spec(0.0064, gt=0, help="last noise level of the schedule in A")
    sigma_max: float = spec(2560.0, gt=0, help="first noise level of the schedule in A")
    rho: float = spec(7.0, gt=0, help="Karras schedule exponent")
    gamma_0: float = spec(0.8, ge=0, help="stochastic churn: noise added is gamma_0 * sigma")
    gamma_min: float = spec(1.0, ge=0, help="churn only while the noise level is above this (A)")
    noise_scale: float = spec(1.003, ge=0, help="scale of the churn noise (AF3 lambda)")
    step_scale: float = spec(1.5, gt=0, help="scale of the Euler step (AF3 eta)")
    # --- heads ------------------------------------------------------------------------------
    plddt_bins: int = spec(50, ge=2, help="bins of the per-residue lDDT predicted by pLDDT head")
    confidence_blocks: int = spec(1, ge=1, help="attention blocks of the confidence head")
    distogram: bool = spec(True, help="train a distogram head on the trunk pair representation")
    distogram_bins: int = spec(64, ge=2, help="distance bins of the distogram head")
    distogram_min_dist: float = spec(2.0, ge=0, help="first bin edge of the distogram in A")
    distogram_max_dist: float = spec(
        32.0, gt=0, help="last bin edge of the distogram in A (beyond it: the last bin)"
    )
    # --- execution --------------------------------------------------------------------------
    activation_checkpointing: bool = spec(
        False, help="recompute trunk and diffusion blocks in backward to save memory"
    )
    compile: bool = spec(False, help="torch.compile the trunk and diffusion blocks")
    loss: LossConfig = spec(default_factory=LossConfig, help="loss weights (model.loss.*)")

    def validate(self) -> list[str]:
        """Problems that involve several fields, one message each (empty when consistent)."""
        problems = []
        for heads, width in (
            ("n_heads", "d_single"),
            ("diffusion_n_heads", "diffusion_d_model"),
        ):
            h, d = getattr(self, heads), getattr(self, width)
            if h > 0 and d % h:
                problems.append(f"model.{heads}: must divide model.{width} ({d}), got {h}")
        if self.sigma_min >= self.sigma_max:
            problems.append(
                f"model.sigma_min: must be below model.sigma_max ({self.sigma_max}), "
                f"got {self.sigma_min}"
            )
        if self.distogram_min_dist >= self.distogram_max_dist:
            problems.append(
                "model.distogram_min_dist: must be below model.distogram_max_dist "
                f"({self.distogram_max_dist}), got {self.distogram_min_dist}"
            )
        return problems
