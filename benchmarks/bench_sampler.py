"""Sampler steps vs structure quality for a trained checkpoint.

Validation (``trainer.val_sampler_steps``) and tuning studies sample with fewer steps than
the model's default to save time. This script shows what that costs: for each number of
steps it samples every validation structure of the checkpoint's own config (``--samples``
per structure, the top one by pLDDT, as validation does) and reports the mean C3' lDDT,
RMSD, GDT-TS and TM-score and the sampling time. ``--uncapped`` adds the sampler without the
cap on the Euler step's overshoot (:func:`pipeline.model.diffusion.euler_step_fraction`), to
show what the cap changes. Both variants draw the same noise (same seed).

Run from the repository root::

    python benchmarks/bench_sampler.py CHECKPOINT --steps 2 4 10 20 50 --uncapped \\
        --out bench/sampler.json

Writes JSON to ``--out`` and a markdown table beside it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from pipeline.config.loader import from_dict, merge, parse_set
from pipeline.data import build_datasets
from pipeline.data.features import REPRESENTATIVE_ATOM
from pipeline.evaluation.model_eval import predict
from pipeline.metrics import score_predictions, top_by_plddt
from pipeline.model import build_model
from pipeline.model import diffold as diffold_module
from pipeline.model.diffusion import af3_step_fraction, euler_step_fraction
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.runtime import make_val_batches

METRICS = ("lddt", "rmsd", "gdt_ts", "tm_score")


@contextlib.contextmanager
def step_rule(capped: bool):
    """Run the sampler with the capped (default) or the uncapped step fraction."""
    original = diffold_module.euler_step_fraction
    diffold_module.euler_step_fraction = euler_step_fraction if capped else af3_step_fraction
    try:
        yield
    finally:
        diffold_module.euler_step_fraction = original


@torch.no_grad()
def score(model, batches, *, n_steps: int, n_samples: int, seed: int, device) -> dict:
    """Mean metrics of the top-pLDDT sample over all structures, and the sampling time."""
    sums = dict.fromkeys(METRICS, 0.0)
    n_structures, seconds = 0, 0.0
    for batch in batches:
        start = time.perf_counter()
        out = predict(model, batch, n_samples=n_samples, n_steps=n_steps, seed=seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        coords, plddt = out["coords"].float().cpu(), out["plddt"].float().cpu()
        mask = batch["residue_mask"] & batch["atom_mask"][..., REPRESENTATIVE_ATOM]
        top, _ = top_by_plddt(plddt, mask)
        scores = score_predictions(coords[torch.arange(len(top)), top], batch)
        for key in METRICS:
            sums[key] += float(scores[key].sum())
        n_structures += len(top)
    return {**{k: v / n_structures for k, v in sums.items()}, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--steps", nargs="+", type=int, default=[4, 10, 20, 50])
    p.add_argument("--samples", type=int, default=1, help="samples per structure (top by pLDDT)")
    p.add_argument("--max-structures", type=int, default=32)
    p.add_argument("--uncapped", action="store_true", help="also run without the step cap")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data key of the checkpoint's config, e.g. data.n_val=32")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    state = load_checkpoint(args.checkpoint)
    data = state["config"]
    for item in args.set:
        if not item.startswith("data."):
            p.error(f"--set {item}: only data.* keys can change")
        data = merge(data, parse_set(item))
    cfg = from_dict(data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    splits = build_datasets(cfg.data, seed=cfg.seed, cache_dir=None, cache="memory")
    batches = make_val_batches(splits.val, cfg.trainer.micro_batch_size, args.max_structures)

    rows = []
    for n_steps in args.steps:
        for capped in (True, False) if args.uncapped else (True,):
            with step_rule(capped):
                result = score(model, batches, n_steps=n_steps, n_samples=args.samples,
                               seed=cfg.seed, device=device)
            rows.append({"steps": n_steps, "step_cap": capped, **result})
            print(json.dumps(rows[-1]), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(args.checkpoint), "step": state.get("step"),
            "structures": sum(len(b["names"]) for b in batches), "samples": args.samples,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| steps | step cap | lDDT | RMSD (A) | GDT-TS | TM-score | sampling (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {'yes' if r['step_cap'] else 'no'} | {r['lddt']:.3f} | "
                     f"{r['rmsd']:.2f} | {r['gdt_ts']:.3f} | {r['tm_score']:.3f} | "
                     f"{r['seconds']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
