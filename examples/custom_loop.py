"""Your own training loop with the pipeline's parts (``pipeline.api``).

The model here is not Diffold but a model of your own: a small network that predicts the
C3'-C3' distance matrix of an RNA from its sequence. The pipeline provides the rest: the
config (from a scenario), the synthetic RNA data, the optimizer and LR schedule, prefetching
to the device, per-step health checks and timing, MLflow tracking and the health report.

Run it from any directory (seconds on a CPU: the ``debug`` scenario trains 24 steps)::

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python examples/custom_loop.py
    mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///mlflow.db

Without ``MLFLOW_TRACKING_URI`` the run goes to ``sqlite:///mlflow.db`` in the working
directory.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.api import (
    build_monitor,
    build_optimizer_and_scheduler,
    config_from_scenario,
    prefetch_to_device,
    start_mlflow_run,
)
from pipeline.data import build_datasets, collate
from pipeline.data.features import NUCLEOTIDES, REPRESENTATIVE_ATOM
from pipeline.monitor.grads import grad_norms_by_group

#: Distances are predicted in units of 10 A, so that the loss starts near 1.
DISTANCE_SCALE = 10.0


class DistanceModel(nn.Module):
    """Sequence -> C3'-C3' distances (B, L, L) in units of ``DISTANCE_SCALE``.

    Per-residue features from two 1-D convolutions; pair features from their product and an
    embedding of the sequence separation. The top-level modules (``embed``, ``encoder``,
    ``separation``, ``pair``) are the groups whose gradient norms the monitor reports.
    """

    def __init__(self, width: int = 32, max_separation: int = 32):
        super().__init__()
        self.max_separation = max_separation
        self.embed = nn.Embedding(len(NUCLEOTIDES) + 1, width)  # + unknown nucleotide
        self.encoder = nn.Sequential(
            nn.Conv1d(width, width, kernel_size=5, padding=2),
            nn.GELU(),
            nn.Conv1d(width, width, kernel_size=5, padding=2),
        )
        self.separation = nn.Embedding(2 * max_separation + 1, width)
        self.pair = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.embed(batch["aatype"]) * batch["residue_mask"][..., None]
        h = self.encoder(h.transpose(1, 2)).transpose(1, 2)  # (B, L, width)
        index = batch["residue_index"]
        separation = (index[:, None, :] - index[:, :, None]).clamp(
            -self.max_separation, self.max_separation
        )
        offset = self.separation(separation + self.max_separation)  # (B, L, L, width)
        pair = h[:, :, None, :] * h[:, None, :, :] + offset
        distance = nn.functional.softplus(self.pair(pair).squeeze(-1))
        return 0.5 * (distance + distance.transpose(1, 2))  # distances are symmetric


def distance_loss(predicted: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean squared error over the pairs whose two C3' atoms are both resolved."""
    c3 = batch["coords"][:, :, REPRESENTATIVE_ATOM]  # (B, L, 3), A
    present = batch["atom_mask"][:, :, REPRESENTATIVE_ATOM] & batch["residue_mask"]
    pairs = (present[:, :, None] & present[:, None, :]).float()
    target = torch.cdist(c3, c3) / DISTANCE_SCALE
    return ((predicted - target) ** 2 * pairs).sum() / pairs.sum().clamp(min=1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # --- Config: a scenario plus overrides, validated as `python -m pipeline train` does
    # (a misspelled key is an error that names it). The debug scenario: 64 small synthetic
    # structures, 3 epochs, metrics at every step.
    config = config_from_scenario(
        "debug",
        overrides={"optim.lr": 1e-3, "tracking.run_name": "custom-loop-example"},
    )
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # --- Data: the pipeline's synthetic RNA structures, batched by your own DataLoader.
    data = build_datasets(config.data, seed=config.seed)
    loader = DataLoader(
        data.train,
        batch_size=config.trainer.micro_batch_size,
        shuffle=True,
        collate_fn=collate,  # pads to the longest structure; see pipeline.data.features
        pin_memory=device.type == "cuda",  # lets the prefetcher's copies overlap compute
        generator=torch.Generator().manual_seed(config.seed),
    )
    steps_per_epoch = len(loader)  # one optimizer step per batch: no accumulation here
    total_steps = config.trainer.epochs * steps_per_epoch

    # --- Model, optimizer and LR schedule (optim.* and scheduler.* of the config).
    model = DistanceModel().to(device)
    optimizer, scheduler = build_optimizer_and_scheduler(
        model, config.optim, config.scheduler,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
    )

    # --- Tracking and monitoring. The run is closed in `finally`, FAILED unless we get to
    # the end: closing also sends the metrics still buffered.
    tracker = start_mlflow_run(config, tags={"model": "DistanceModel"})
    monitor = build_monitor(
        config, steps_per_epoch=steps_per_epoch, total_steps=total_steps, tracker=tracker,
        device=device,
    )
    clip = config.trainer.grad_clip or math.inf
    status = "FAILED"
    try:
        step = 0
        for epoch in range(config.trainer.epochs):
            batches = prefetch_to_device(loader, device, depth=config.loader.prefetch_factor)
            for batch in batches:
                step += 1
                # Forward and backward.
                loss = distance_loss(model(batch), batch)
                loss.backward()
                # Per-group gradient norms (before clipping) on logged steps only: they let
                # the health checks name the part of the model whose gradients misbehave.
                groups = grad_norms_by_group(model) if monitor.should_log(step) else None
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)  # pre-clip norm
                # Check before the update: the monitor reads loss and norms in one host sync,
                # logs train/*, perf/* and health/* metrics, and returns warnings with advice.
                warnings = monitor.log_step(
                    step,
                    loss=loss,
                    grad_norm=grad_norm,
                    lr=optimizer.param_groups[0]["lr"],
                    batch_size=len(batch["names"]),
                    data_wait_s=batches.last_wait_s,
                    group_norms=groups,
                    metrics={"train/epoch": epoch + 1},
                )
                # A non-finite loss or gradient would poison the weights: skip that update.
                if not any(w.check == "non_finite" for w in warnings):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()  # once per optimizer step
        # --- The health report (health/report.{json,md}, plots/health.png in the run).
        report, markdown = monitor.log_report()
        print(markdown)
        status = "FINISHED"
    finally:
        tracker.close(status)
    print(f"{step} steps; health {report['overall_status']}; MLflow run {tracker.run_id}")


if __name__ == "__main__":
    main()
