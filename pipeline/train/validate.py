"""Validation from sampled structures: the model never sees the native coordinates.

For each validation structure the full sampler draws ``trainer.val_samples`` structures from
the sequence alone; the one with the highest mean pLDDT is scored against the native on C3'
atoms (design-brief conventions): ``val/lddt``, ``val/rmsd``, ``val/gdt_ts``, ``val/tm_score``,
``val/plddt_pearson`` (per residue), and ``val/loss`` (+ terms) from the training objective.
"""

from __future__ import annotations

import torch

from pipeline.config.schema import Config
from pipeline.data.features import REPRESENTATIVE_ATOM, features_only
from pipeline.metrics import pearson, plddt_target, score_batch, top_by_plddt

#: Seed windows of GDT-TS's superposition search per validation structure. Structures up to
#: ~60 nt have fewer, so their search is exhaustive anyway; a 500-nt one has ~5,000, and this
#: budget makes its search ~8x cheaper for a GDT-TS at most 0.006 lower (mean 0.002; 64 x 500
#: nt, docs/benchmarks.md). ``evaluate`` always searches exhaustively.
VAL_GDT_MAX_SEEDS = 512


class Validator:
    def __init__(self, cfg: Config, model: torch.nn.Module, batches: list[dict], device, autocast):
        self.cfg = cfg
        self.model = model
        self.batches = batches
        self.device = device
        self.autocast = autocast
        #: Per-residue (pLDDT 0-100, true lDDT fraction) of the last run, on the CPU: the
        #: run report's calibration plot.
        self.last_residues: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def run(self, epoch: int) -> dict[str, float]:
        """Validation metrics (means over structures). Training RNG streams are untouched."""
        if not self.batches:
            return {}
        was_training = self.model.training
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + 7919)  # same noise at every validation
            generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            sums: dict[str, float] = {}
            n_structures = 0
            plddt_all, lddt_all = [], []
            for batch in self.batches:
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                scores, plddt, per_residue, mask = self._score(batch, generator)
                with self.autocast():
                    out = self.model(batch)
                n = len(batch["names"])
                n_structures += n
                for key, values in scores.items():
                    sums[f"val/{key}"] = sums.get(f"val/{key}", 0.0) + float(values.sum())
                sums["val/loss"] = sums.get("val/loss", 0.0) + float(out["loss"]) * n
                for key, value in out["terms"].items():
                    sums[f"val/loss/{key}"] = sums.get(f"val/loss/{key}", 0.0) + float(value) * n
                plddt_all.append(plddt[mask])
                lddt_all.append(per_residue[mask])
        self.model.train(was_training)
        metrics = {k: v / n_structures for k, v in sums.items()}
        metrics["val/plddt_pearson"] = pearson(torch.cat(plddt_all), torch.cat(lddt_all))
        self.last_residues = (torch.cat(plddt_all).cpu(), torch.cat(lddt_all).cpu())
        return metrics

    def _score(self, batch: dict, generator: torch.Generator):
        with self.autocast():
            out = self.model.sample(
                features_only(batch),
                n_samples=self.cfg.trainer.val_samples,
                n_steps=self.cfg.trainer.val_sampler_steps,
                generator=generator,
            )
        coords, plddt = out["coords"].float(), out["plddt"].float()  # (B,S,L,A,3), (B,S,L)
        mask = batch["residue_mask"] & batch["atom_mask"][..., REPRESENTATIVE_ATOM]
        best, _ = top_by_plddt(plddt, mask)
        index = torch.arange(coords.shape[0], device=coords.device)
        pred = coords[index, best][..., REPRESENTATIVE_ATOM, :]
        ref = batch["coords"][..., REPRESENTATIVE_ATOM, :]
        scores = score_batch(pred, ref, mask, gdt_max_seeds=VAL_GDT_MAX_SEEDS)
        # The pLDDT head's target, over the residues where it is defined (as in evaluation).
        true_lddt, defined = plddt_target(pred, ref, mask)
        return scores, plddt[index, best], true_lddt, defined
