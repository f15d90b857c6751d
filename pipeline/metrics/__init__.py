"""Structure-comparison metrics: pure, batched, masked torch functions (CPU and CUDA)."""

from pipeline.metrics.lddt import lddt
from pipeline.metrics.superpose import kabsch, superimpose

__all__ = ["kabsch", "lddt", "superimpose"]
