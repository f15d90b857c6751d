"""Evaluate a trained model (``evaluate --checkpoint`` / ``--run-id``).

For every validation target the full sampler draws ``n_samples`` structures from the sequence
alone (:func:`predict` receives only the feature keys; the native is used for scoring only).
The sample with the highest mean pLDDT is the prediction ("top"); the mean over all samples is
reported beside it. Per-target rows, aggregate ``val/*`` metrics (named as in training so runs
compare side by side), pLDDT calibration, plots and the predicted structures go to MLflow.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.config.loader import flatten, from_dict, merge, parse_set, to_dict
from pipeline.data import build_datasets
from pipeline.data.features import NUCLEOTIDES, REPRESENTATIVE_ATOM, features_only
from pipeline.errors import CheckpointError, PipelineError
from pipeline.io.structures import write_structure
from pipeline.metrics import (
    calibration_table,
    confidence_metrics,
    plddt_target,
    plot_calibration,
    score_predictions,
    top_by_plddt,
)
from pipeline.model import build_model
from pipeline.tracking import build_tracker
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.runtime import make_val_batches, run_name

log = logging.getLogger(__name__)

METRICS = ("lddt", "rmsd", "gdt_ts", "tm_score", "chirality")


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    batch: dict,
    *,
    n_samples: int,
    n_steps: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Sample structures for a batch from its features only (never its native coordinates)."""
    device = next(model.parameters()).device
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features_only(batch).items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    return model.sample(features, n_samples=n_samples, n_steps=n_steps, generator=generator)


def resolve_checkpoint(checkpoint: str | None, run_id: str | None) -> tuple[Path, str | None]:
    """A local checkpoint path; for ``run_id`` the run's best (else last) checkpoint artifact."""
    if checkpoint:
        return Path(checkpoint), None
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.mlflow_tracker import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    try:
        files = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    except MlflowException:
        raise PipelineError(f"--run-id {run_id}: no such MLflow run at {tracking_uri()}") from None
    names = sorted(Path(f).name for f in files if f.endswith(".pt"))
    if not names:
        raise CheckpointError(f"--run-id {run_id}: the run has no checkpoint artifact")
    name = "best.pt" if "best.pt" in names else names[-1]
    target = tempfile.mkdtemp(prefix="checkpoint-")
    local = {}
    for suffix in ("", ".sha256"):
        if f"checkpoints/{name}{suffix}" in files:
            local[suffix] = client.download_artifacts(run_id, f"checkpoints/{name}{suffix}", target)
    return Path(local[""]), run_id


def evaluate_model(
    *,
    checkpoint: str | None = None,
    run_id: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    n_samples: int | None = 5,
    sampler_steps: int | None = None,
    output: str | None = None,
) -> str:
    n_samples = 5 if n_samples is None else n_samples  # 0 is an error, not the default
    if n_samples < 1:
        raise PipelineError(f"--n-samples: expected an integer >= 1, got {n_samples}")
    if sampler_steps is not None and sampler_steps < 1:
        raise PipelineError(f"--sampler-steps: expected an integer >= 1, got {sampler_steps}")
    path, source_run = resolve_checkpoint(checkpoint, run_id)
    state = load_checkpoint(path)
    data = state["config"]
    for item in overrides:
        data = merge(data, parse_set(item))
    cfg = from_dict(data)
    if to_dict(cfg)["model"] != state["config"]["model"]:
        raise PipelineError("--set: model.* keys cannot change when evaluating a checkpoint")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    splits = build_datasets(cfg.data, seed=cfg.seed, cache_dir=None, cache="memory")
    batches = make_val_batches(splits.val, cfg.trainer.micro_batch_size, len(splits.val))

    rows, plddts, trues, masks = [], [], [], []
    out_dir = Path(output).parent if output else Path(cfg.output_dir) / "evaluation"
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        out = predict(model, batch, n_samples=n_samples, n_steps=sampler_steps, seed=cfg.seed)
        coords, plddt = out["coords"].float().cpu(), out["plddt"].float().cpu()
        per_sample = [score_predictions(coords[:, s], batch) for s in range(n_samples)]
        mask = batch["residue_mask"] & batch["atom_mask"][..., REPRESENTATIVE_ATOM]
        top, mean_plddt = top_by_plddt(plddt, mask)
        for b, name in enumerate(batch["names"]):
            row = {"target": name, "length": int(batch["lengths"][b]), "top_sample": int(top[b])}
            row["plddt"] = float(mean_plddt[b, top[b]])
            for key in METRICS:
                values = torch.stack([s[key][b] for s in per_sample])
                row[key] = float(values[top[b]])
                row[f"{key}_mean"] = float(values.mean())
            rows.append(row)
            _write_prediction(pred_dir / f"{name}.pdb", batch, b, coords[b, top[b]], plddt[b, top[b]])
        index = torch.arange(len(top))
        best_c3 = coords[index, top][..., REPRESENTATIVE_ATOM, :]
        ref_c3 = batch["coords"][..., REPRESENTATIVE_ATOM, :]
        true, defined = plddt_target(best_c3, ref_c3, mask)
        plddts.append(plddt[index, top].flatten())
        trues.append(true.flatten())
        masks.append(defined.flatten())
    plddt_all, true_all, mask_all = torch.cat(plddts), torch.cat(trues), torch.cat(masks)
    confidence = confidence_metrics(plddt_all[None], true_all[None], mask_all[None])
    calibration = calibration_table(plddt_all[None], true_all[None], mask_all[None])
    summary = _aggregate(rows, confidence)
    csv_path = Path(output) if output else out_dir / "targets.csv"
    _write_csv(csv_path, rows)
    _track(cfg, state, path, source_run, summary, csv_path, pred_dir, calibration, rows,
           n_samples=n_samples, sampler_steps=sampler_steps)
    lines = [f"evaluated {len(rows)} targets x {n_samples} samples from {path}"]
    lines += [f"  {k} = {v:.4f}" for k, v in summary.items()]
    lines.append(f"per-target CSV: {csv_path}")
    return "\n".join(lines)


def _write_prediction(path: Path, batch: dict, b: int, coords, plddt) -> None:
    n = int(batch["lengths"][b])
    sequence = "".join(
        NUCLEOTIDES[i] if i < len(NUCLEOTIDES) else "N" for i in batch["aatype"][b, :n].tolist()
    )
    chain_ids = [chr(ord("A") + int(c)) for c in batch["chain_index"][b, :n].tolist()]
    write_structure(
        path,
        sequence,
        coords[:n].numpy(),
        plddt=plddt[:n].numpy(),
        chain_ids=chain_ids,
        residue_numbers=batch["residue_index"][b, :n].numpy(),
    )


def _aggregate(rows: list[dict], confidence: dict) -> dict[str, float]:
    out = {}
    for key in METRICS:
        out[f"val/{key}"] = float(np.mean([r[key] for r in rows]))
        out[f"val/{key}_mean_samples"] = float(np.mean([r[f"{key}_mean"] for r in rows]))
    out["val/plddt_pearson"] = confidence["pearson"]
    out["val/plddt_spearman"] = confidence["spearman"]
    out["val/plddt_mae"] = confidence["mae"]
    out["val/plddt_pearson_structure"] = confidence["pearson_structure"]
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _track(cfg, state, path, source_run, summary, csv_path, pred_dir, calibration, rows, *,
           n_samples, sampler_steps):
    tracker = build_tracker(
        cfg.tracking,
        run_name=f"evaluate-{run_name(cfg)}",
        run_id=os.environ.get("MLFLOW_RUN_ID"),
        tags={"role": "evaluate", "source_run_id": source_run or state.get("run_id"),
              "checkpoint_step": state["step"], "scenario": cfg.scenario, "preset": cfg.preset},
    )
    status = "FAILED"
    try:
        tracker.log_params({**flatten(to_dict(cfg)), "evaluate.n_samples": n_samples,
                            "evaluate.sampler_steps": sampler_steps or cfg.model.n_steps,
                            "evaluate.checkpoint": str(path)})
        tracker.log_metrics(summary, step=state["step"])
        tracker.log_artifact(csv_path, "predictions")
        for pdb in sorted(pred_dir.glob("*.pdb")):
            tracker.log_artifact(pdb, "predictions/structures")
        tracker.log_figure(plot_calibration(calibration), "plots/plddt_calibration.png")
        tracker.log_figure(_distribution_figure(rows), "plots/metric_distributions.png")
        status = "FINISHED"
    finally:
        tracker.close(status)


def _distribution_figure(rows: list[dict]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(METRICS[:4]) + 4, 3.2))
    FigureCanvasAgg(fig)
    for i, key in enumerate(METRICS[:4]):
        ax = fig.add_subplot(1, 5, i + 1)
        ax.hist([r[key] for r in rows], bins=20, color="C0")
        ax.set_title(f"{key} (top by pLDDT)")
    ax = fig.add_subplot(1, 5, 5)
    ax.scatter([r["plddt"] for r in rows], [100 * r["lddt"] for r in rows], s=10)
    ax.set_xlabel("mean pLDDT")
    ax.set_ylabel("lDDT x100")
    ax.set_title("pLDDT vs lDDT per target")
    fig.tight_layout()
    return fig
