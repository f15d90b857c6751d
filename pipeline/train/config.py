"""Trainer settings: length, batch, precision, clipping, validation, checkpoints, stopping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.fields import spec


@dataclass
class EarlyStoppingConfig:
    enabled: bool = spec(False, help="stop when the validation metric stops improving")
    metric: str = spec("val/lddt", help="validation metric to watch")
    mode: Literal["max", "min"] = spec("max", help="whether larger or smaller is better")
    patience: int = spec(5, ge=1, help="validations without improvement before stopping")
    min_delta: float = spec(0.0, ge=0, help="smallest change that counts as an improvement")


@dataclass
class TrainerConfig:
    epochs: int = spec(10, ge=1, help="passes over the training set")
    max_steps: int | None = spec(None, ge=1, help="stop after this many optimizer steps")
    time_limit_minutes: float | None = spec(
        None, gt=0, help="stop cleanly (validate, checkpoint) after this much training time"
    )
    micro_batch_size: int = spec(8, ge=1, help="structures per forward/backward pass")
    accumulation_steps: int = spec(1, ge=1, help="micro-batches per optimizer step")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = spec(
        "auto", help="auto = bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler"
    )
    grad_clip: float | None = spec(1.0, gt=0, help="clip the global grad norm (null: off)")
    device: Literal["auto", "cpu", "cuda"] = spec("auto", help="auto = CUDA when available")
    deterministic: bool = spec(False, help="deterministic algorithms (slower; exact resume)")
    eval_every_epochs: int = spec(1, ge=1, help="epochs between validations")
    val_max_structures: int = spec(32, ge=1, help="validation structures sampled per evaluation")
    val_samples: int = spec(1, ge=1, help="structures sampled per target; best pLDDT is scored")
    val_sampler_steps: int | None = spec(
        None,
        ge=1,
        help="sampler steps at validation (null: model.n_steps); fewer steps score lower "
        "(one checkpoint: lDDT 0.39 at 10, 0.50 at 20, 0.61 at 100; docs/benchmarks.md)",
    )
    checkpoint_every_steps: int | None = spec(
        None, ge=1, help="optimizer steps between checkpoints (besides the epoch-end ones)"
    )
    checkpoint_every_epochs: int = spec(
        1, ge=0,
        help="epochs between epoch-end checkpoints; 0: none at epoch ends (with 0, "
             "checkpoint_every_steps must be set)",
    )
    checkpoint_writer: Literal["auto", "thread", "process"] = spec(
        "auto",
        help="who serialises background checkpoints: a thread of the trainer (its torch.save "
             "holds the GIL, 12-17 ms of training-thread time per small_model write) or a "
             "writer process (no GIL time for the trainer); auto = process on CUDA, thread on "
             "the CPU",
    )
    keep_last: int = spec(2, ge=1, help="step checkpoints kept on disk")
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def validate(self) -> list[str]:
        errors = []
        if self.checkpoint_every_epochs == 0 and self.checkpoint_every_steps is None:
            errors.append(
                "trainer.checkpoint_every_epochs: 0 needs trainer.checkpoint_every_steps "
                "(otherwise nothing is saved before the run ends)"
            )
        if self.early_stopping.metric.split("/")[0] != "val":
            errors.append(
                "trainer.early_stopping.metric: expected a val/* metric, "
                f"got {self.early_stopping.metric!r}"
            )
        return errors
