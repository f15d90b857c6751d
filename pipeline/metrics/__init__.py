"""Structure-comparison metrics: pure, batched, masked torch functions (CPU and CUDA).

Conventions (design brief, section 4) are stated in each module's docstring:

- :mod:`~pipeline.metrics.superpose`: proper Kabsch superposition, RMSD;
- :mod:`~pipeline.metrics.lddt`: lDDT (global, per atom, per residue);
- :mod:`~pipeline.metrics.tm_score`: RNA TM-score, US-align ``TMscore8_search``;
- :mod:`~pipeline.metrics.gdt`: GDT-TS / GDT-HA with an LGA-like search;
- :mod:`~pipeline.metrics.chirality`: mirror-image check;
- :mod:`~pipeline.metrics.confidence`: pLDDT vs true lDDT (correlations, calibration);
- :mod:`~pipeline.metrics.structure`: the validation metric set and atom matching for
  external predictions.
"""

from __future__ import annotations

from pipeline.metrics.chirality import MIRROR_THRESHOLD, chirality, is_mirrored
from pipeline.metrics.confidence import (
    CalibrationTable,
    calibration_table,
    confidence_metrics,
    lddt_to_bins,
    pearson,
    plot_calibration,
    spearman,
    top_by_plddt,
)
from pipeline.metrics.gdt import (
    GDT_HA_CUTOFFS,
    GDT_TS_CUTOFFS,
    LGA_WINDOW_SIZES,
    GDTResult,
    gdt,
    gdt_ha,
    gdt_ts,
)
from pipeline.metrics.lddt import DEFAULT_THRESHOLDS, lddt, lddt_per_residue
from pipeline.metrics.structure import (
    VALIDATION_METRICS,
    AtomMatch,
    match_atoms,
    plddt_target,
    representative_atoms,
    residue_index_from_keys,
    score_batch,
    score_matched,
    score_predictions,
)
from pipeline.metrics.superpose import kabsch, rmsd, superimpose
from pipeline.metrics.tm_score import rna_d0, tm_fragment_lengths, tm_score

__all__ = [
    "DEFAULT_THRESHOLDS",
    "GDT_HA_CUTOFFS",
    "GDT_TS_CUTOFFS",
    "LGA_WINDOW_SIZES",
    "MIRROR_THRESHOLD",
    "VALIDATION_METRICS",
    "AtomMatch",
    "CalibrationTable",
    "GDTResult",
    "calibration_table",
    "chirality",
    "confidence_metrics",
    "gdt",
    "gdt_ha",
    "gdt_ts",
    "is_mirrored",
    "kabsch",
    "lddt",
    "lddt_per_residue",
    "lddt_to_bins",
    "match_atoms",
    "pearson",
    "plddt_target",
    "plot_calibration",
    "representative_atoms",
    "residue_index_from_keys",
    "rmsd",
    "rna_d0",
    "score_batch",
    "score_matched",
    "score_predictions",
    "spearman",
    "top_by_plddt",
    "superimpose",
    "tm_fragment_lengths",
    "tm_score",
]
