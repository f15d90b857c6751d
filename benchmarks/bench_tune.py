"""Tuning: what pruning buys, and what the prefetch factor does to throughput.

``study`` runs one Optuna study through the pipeline's own ``run_study`` on the synthetic set
with a seeded *random* sampler: its proposals do not depend on earlier results, so a study with
``--pruner median`` and one with ``--pruner none`` and the same seed evaluate the same parameter
sets in the same order, and differ only in the trials the pruner stops. Each study writes the
trials' values and wall times (one GPU, so wall time is GPU time) to ``OUT/study-<pruner>.json``.

``prefetch`` trains the same config with ``loader.prefetch_factor`` 1, 2, 4, 8 (interleaved,
``--repeats`` times) and reports the median step time, data wait and samples/s of each.

``report`` turns the JSON files into the markdown tables of docs/benchmarks.md.

    python benchmarks/bench_tune.py study --pruner none --n-trials 12 --out OUT
    python benchmarks/bench_tune.py study --pruner median --n-trials 12 --out OUT
    python benchmarks/bench_tune.py study --pruner none --n-trials 8 --work W --out OUT  # and
    python benchmarks/bench_tune.py study --pruner none --n-trials 8 --work W --out OUT  # again
    python benchmarks/bench_tune.py data --work W [--preset P --set ...]  # the set, made once
    python benchmarks/bench_tune.py prefetch --repeats 2 --out OUT
    python benchmarks/bench_tune.py replay --out OUT     # pruners on the recorded curves
    python benchmarks/bench_tune.py report --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

# Each trial (``--preset``, default small_model): 256 synthetic structures (crop 64) for 6
# epochs, validated after every epoch on 16 structures (sampler 20 steps).
TRIAL = [
    "data.n_train=256",
    "data.n_val=16",
    "trainer.epochs=6",
    "trainer.eval_every_epochs=1",
    "trainer.val_max_structures=16",
    "trainer.val_sampler_steps=20",
    "trainer.checkpoint_every_steps=100000",
    "tracking.system_metrics=false",
]
PRUNERS = ("median", "successive_halving", "hyperband")
SPACE = {
    "optim.lr": {"type": "float", "low": 2.0e-4, "high": 5.0e-3, "log": True},
    "scheduler.warmup_epochs": {"type": "float", "low": 0.0, "high": 3.0},
    "trainer.accumulation_steps": {"type": "categorical", "choices": [1, 2, 4, 8]},
    "loader.prefetch_factor": {"type": "int", "low": 1, "high": 8},
}


def _load_study(journal: Path, name: str):
    import optuna

    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def planned_parameters(settings: dict, seed: int, n: int) -> list[dict]:
    """The first ``n`` parameter sets a random sampler seeded with ``seed`` draws from the
    search space of the tune ``settings``."""
    import optuna

    from pipeline.config.loader import parse_section
    from pipeline.tune.study import TuneConfig, suggest

    # The keys in the tune file's order (yaml.safe_dump sorts them), as run_study reads them:
    # the draws are then those its seeded random sampler makes.
    space = dict(sorted(settings["search_space"].items()))
    tune = parse_section(TuneConfig, {**settings, "search_space": space})
    planner = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    plan = []
    for _ in range(n):
        trial = planner.ask()
        plan.append(suggest(trial, tune))
        planner.tell(trial, 0.0)
    return plan


def trial_config(args, work: Path):
    """The base config of every trial: ``balanced``, ``--preset``, TRIAL, then ``--set``."""
    from pipeline.config.loader import load_config

    return load_config(scenario="balanced", preset=args.preset,
                       overrides=[*TRIAL, f"output_dir={work}", f"seed={args.seed}", *args.set])


def prepare_data(args) -> None:
    """Generate the trials' synthetic set into ``--work``'s data cache, so that the first
    trial of a study does not pay for it (1,024 structures: about 2 minutes on one core)."""
    from pipeline.data.datasets import build_datasets
    from pipeline.train.runtime import data_cache_dir

    cfg = trial_config(args, Path(args.work).resolve())
    cache_dir = data_cache_dir(cfg)  # where the trials look (run_study shares the base's)
    started = time.monotonic()
    splits = build_datasets(cfg.data, seed=cfg.seed, cache_dir=cache_dir, cache=cfg.loader.cache)
    print(f"{len(splits.train)} training and {len(splits.val)} validation structures in "
          f"{cache_dir} ({time.monotonic() - started:.0f} s)")


def study(args) -> None:
    from pipeline.tune.study import run_study

    if args.no_forkserver_preload:  # the loader as it was before 2026-12-08, for an A/B
        import pipeline.data.loader as loader

        loader.preload_in_forkserver = lambda dataset: []

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tune_file = out / f"tune-{args.pruner}.yaml"
    settings = {
        "sampler": "random", "pruner": args.pruner, "n_startup_trials": args.startup,
        "median_warmup_reports": args.warmup_reports,
        "reduction_factor": args.reduction_factor, "search_space": SPACE,
    }
    if args.work:  # a study that later calls continue (the same --work)
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix=f"tune-{args.pruner}-"))
    # The trials' parameter sets are drawn up front and enqueued, so every study with this
    # seed runs the same sets in the same order, however its trials are split over calls.
    journal = work / "tune" / f"bench-{args.pruner}" / "optuna-journal.log"
    done = len(_load_study(journal, f"bench-{args.pruner}").trials) if journal.exists() else 0
    settings["enqueue"] = planned_parameters(settings, args.seed, done + args.n_trials)
    tune_file.write_text(yaml.safe_dump(settings))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    base = trial_config(args, work)
    started = time.monotonic()
    summary = run_study(base, tune_config=tune_file, n_trials=args.n_trials,
                        timeout=args.timeout, study_name=f"bench-{args.pruner}")
    total = time.monotonic() - started
    trials = _load_study(journal, f"bench-{args.pruner}").trials
    import mlflow

    client = mlflow.MlflowClient()

    def curve(t):
        """(samples seen, seconds since the trial started, val/lddt, val/loss) at each
        validation (the loss for replays of ``--prune-metric val/loss``)."""
        run_id = t.user_attrs.get("run_id")
        if run_id is None:
            return []
        start = t.datetime_start.timestamp()
        per_step = {m.step: m for m in client.get_metric_history(run_id, "val/lddt")}
        loss = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss")}
        samples = sorted(t.intermediate_values)
        return [[s, per_step[k].timestamp / 1000 - start, per_step[k].value, loss.get(k)]
                for s, k in zip(samples, sorted(per_step))]

    def startup(t):
        """The trial's start-up (the trainer's perf/setup_s, first_batch_s, first_step_s)."""
        run_id = t.user_attrs.get("run_id")
        if run_id is None:
            return None
        metrics = client.get_run(run_id).data.metrics
        return {k: metrics.get(f"perf/{k}") for k in ("setup_s", "first_batch_s", "first_step_s")}

    rows = [
        {
            "trial": t.number,
            "curve": curve(t),
            "startup": startup(t),
            "state": t.state.name,
            "value": t.value,
            "last_reported": t.intermediate_values.get(max(t.intermediate_values, default=-1)),
            "samples_seen": t.user_attrs.get("samples_seen"),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
            "params": t.params,
        }
        for t in trials
        if t.datetime_complete is not None  # not those a timeout left waiting
    ]
    result = {"pruner": args.pruner, "seed": args.seed, "n_trials": args.n_trials,
              "study_wall_s": total, "summary": summary, "trials": rows}
    (out / f"study-{args.pruner}.json").write_text(json.dumps(result, indent=1))
    if args.work:
        # What a later call needs is the journal, the MLflow database and the data cache;
        # the trials' checkpoints (hundreds of MB for base_model) would not travel.
        for path in work.rglob("*.pt"):
            path.unlink()
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=1))
    for row in rows:
        print(row)


def prefetch(args) -> None:
    from bench_data import measure_loading  # beside this script

    from pipeline.config.loader import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, list[dict]] = {}
    cache = Path(tempfile.mkdtemp(prefix="prefetch-cache-"))  # the synthetic set, made once
    for repeat in range(args.repeats):
        for factor in args.factors:
            work = Path(tempfile.mkdtemp(prefix=f"prefetch-{factor}-"))
            cfg = load_config(scenario="balanced", preset="small_model", overrides=[
                f"output_dir={work}", "tracking.enabled=false", "health.enabled=true",
                f"trainer.max_steps={args.steps}", "trainer.epochs=1000",
                "trainer.eval_every_epochs=1000", "trainer.checkpoint_every_steps=100000",
                "data.n_train=512", f"data.cache_dir={cache}", "monitor.window=100000",
                f"loader.prefetch_factor={factor}", *args.set,
            ])
            row = {"repeat": repeat, **measure_loading(cfg, warmup=args.warmup)}
            results.setdefault(factor, []).append(row)
            print(factor, row, flush=True)
    (out / "prefetch.json").write_text(json.dumps(results, indent=1))


def _pruner_factories(args) -> dict:
    """The pruners the replay compares, each a factory (Hyperband keeps per-study state).
    "no cut before report k + 1" is the tune command's own wrapper (``AfterReports``, as
    ``median_warmup_reports: k``)."""
    import optuna

    from pipeline.tune.study import AfterReports

    median = optuna.pruners.MedianPruner
    factories = {
        "none": optuna.pruners.NopPruner,
        "median": lambda: median(n_startup_trials=args.startup),
        **{f"median, no cut before report {k + 1}": (
            lambda k=k: AfterReports(median(n_startup_trials=args.startup), k))
           for k in (1, 2, 4, 6)},
        # Median that cuts only after `patience` reports without improvement: tolerates a dip
        # such as the best trial's at report 2 of the half study.
        **{f"patient median, patience {p}": (
            lambda p=p: optuna.pruners.PatientPruner(median(n_startup_trials=args.startup), p))
           for p in (1, 2)},
        "percentile-25": lambda: optuna.pruners.PercentilePruner(
            25.0, n_startup_trials=args.startup),
        "successive_halving-3": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=args.min_resource, reduction_factor=3),
        "successive_halving-4": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=args.min_resource, reduction_factor=4),
        "hyperband-3": lambda: optuna.pruners.HyperbandPruner(
            min_resource=args.min_resource, reduction_factor=3),
    }
    return factories


ORACLE = "oracle: knows the final values, cuts at report 1"


def _final_value_oracle(target: float):
    """A bound, not a pruner one could use: it knows each trial's final value (the user
    attribute ``final`` that :func:`replay_order` sets) and cuts at its first report every
    trial that ends below ``target``, with no startup trials. What it spends is the least any
    pruner that keeps the best could spend, given where the reports fall."""
    import optuna

    class FinalValueOracle(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return trial.user_attrs["final"] < target

    return FinalValueOracle()


def reported(entry: list, prune_metric: str = "val/lddt") -> float:
    """What a trial reports to the pruner at one recorded validation ``entry`` (samples,
    seconds, val/lddt[, val/loss]): val/lddt, or minus val/loss (``prune_metric: val/loss``,
    ``prune_direction: minimize`` in a study that maximises val/lddt)."""
    return entry[2] if prune_metric == "val/lddt" else -entry[3]


def replay_order(trials: list[dict], pruner, pruned_overhead: float | None,
                 target: float, prune_metric: str = "val/lddt") -> dict:
    """One pruned study replayed on ``trials`` in the given order: the trials it cuts, the
    best value it keeps, the GPU seconds it spends and when its best first reaches
    ``target``. The pruner sees ``prune_metric`` (:func:`reported`); the study's value is
    each trial's final val/lddt either way."""
    import optuna

    study = optuna.create_study(direction="maximize", pruner=pruner)
    spent, best, reached_at, pruned = 0.0, None, None, 0
    for r in trials:
        trial = study.ask()
        trial.set_user_attr("final", r["value"])  # read by the oracle only
        end_overhead = r["seconds"] - r["curve"][-1][1]
        if pruned_overhead is not None:
            end_overhead = pruned_overhead
        cost = r["seconds"]
        for entry in r["curve"]:
            samples, at = entry[0], entry[1]
            trial.report(reported(entry, prune_metric), samples)
            if trial.should_prune():
                cost = at + end_overhead
                break
        if cost < r["seconds"]:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            pruned += 1
        else:
            study.tell(trial, r["value"])
            best = r["value"] if best is None else max(best, r["value"])
        spent += cost
        if reached_at is None and best is not None and best >= target:
            reached_at = spent
    return {"pruned": pruned, "best": best, "gpu_s": spent, "reached_99pct_at_s": reached_at}


def replay(args) -> None:
    """Pruners replayed on the recorded curves of an unpruned study.

    With the random sampler, a pruned study proposes the same parameter sets in the same
    order; a pruner's decision depends only on the intermediate values reported so far. So
    feeding each recorded curve, trial by trial, to a fresh Optuna study with the pruner gives
    the decisions the pruned study would take, and the recorded time of each validation gives
    what the trial would have cost (plus its measured end-of-trial overhead).

    The random sampler's draws are independent, so every order of the trials is as likely as
    the recorded one; ``--orders K`` also replays ``K`` random orders and summarises them
    (median and quartiles), so that the result does not hinge on where the best trial came.
    """
    import numpy as np
    import optuna

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = json.loads(Path(args.study or out / "study-none.json").read_text())
    trials = [r for r in result["trials"] if r["state"] == "COMPLETE" and r["curve"]]
    full_best = max(r["value"] for r in trials)
    full_time = sum(r["seconds"] for r in trials)
    # What a pruned trial costs after its last report: measured in the real pruned study when
    # there is one (a pruned trial draws no figures and logs no model), else --pruned-end-s
    # when given, else a finished trial's end of run (an overestimate).
    pruned_overhead, source = args.pruned_end_s, "--pruned-end-s"
    if (out / "study-median.json").exists():
        real = json.loads((out / "study-median.json").read_text())["trials"]
        ends = [r["seconds"] - r["curve"][-1][1] for r in real if r["state"] == "PRUNED"]
        if ends:
            pruned_overhead, source = statistics.median(ends), "the real pruned study"
    if pruned_overhead is None:
        source = "a finished trial's end of run"
    print(f"end of a pruned trial: {pruned_overhead} s ({source})")
    has_loss = all(len(e) > 3 and e[3] is not None for r in trials for e in r["curve"])
    if args.prune_metric == "val/loss" and not has_loss:
        print("error: --prune-metric val/loss: the recorded study has no val/loss curves "
              "(studies recorded before 2026-12-08 kept val/lddt only)", file=sys.stderr)
        raise SystemExit(2)
    agreement = {metric: rank_agreement(trials, metric)
                 for metric in (("val/lddt", "val/loss") if has_loss else ("val/lddt",))}
    target = 0.99 * full_best
    factories = _pruner_factories(args) | {ORACLE: lambda: _final_value_oracle(target)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = {}
    for name, make in factories.items():
        row = replay_order(trials, make(), pruned_overhead, target, args.prune_metric)
        row["time_share"] = row["gpu_s"] / full_time
        rows[name] = row
        print(name, row)
    if args.orders:
        rng = np.random.default_rng(args.orders_seed)
        orders = [rng.permutation(len(trials)) for _ in range(args.orders)]
        for name, make in factories.items():
            runs = [replay_order([trials[i] for i in order], make(), pruned_overhead, target,
                                 args.prune_metric)
                    for order in orders]
            rows[name]["orders"] = summarise_orders(runs, full_time)
            print(name, "over", args.orders, "orders:", rows[name]["orders"])
    rows["rank_agreement"] = agreement
    (out / "replay.json").write_text(json.dumps(rows, indent=1))


def summarise_orders(runs: list[dict], full_time: float) -> dict:
    """Quartiles over the replayed orders of the GPU share and of the time until the best is
    within 1% (share of the unpruned study's total), and how often the best was kept."""
    import numpy as np

    def quartiles(values):
        return [float(v) for v in np.percentile(values, [25, 50, 75])]

    kept = [r for r in runs if r["reached_99pct_at_s"] is not None]
    return {
        "n": len(runs),
        "best_kept_share": len(kept) / len(runs),
        "time_share_q": quartiles([r["gpu_s"] / full_time for r in runs]),
        # Orders that lose the best never reach it: they count as 100% (never within budget).
        "reached_share_q": quartiles([
            (r["reached_99pct_at_s"] / full_time) if r["reached_99pct_at_s"] is not None
            else 1.0 for r in runs
        ]),
    }


def rank_agreement(trials: list[dict], prune_metric: str = "val/lddt") -> list[float]:
    """Spearman correlation, over the trials, of the value reported at each report
    (:func:`reported`) with the final val/lddt: how well an early cut can rank the trials at
    that point."""
    import numpy as np

    def ranks(values):
        return np.argsort(np.argsort(values)).astype(float)

    finals = ranks([r["value"] for r in trials])
    n_reports = min(len(r["curve"]) for r in trials)
    rhos = []
    for k in range(n_reports):
        at_k = ranks([reported(r["curve"][k], prune_metric) for r in trials])
        rhos.append(float(np.corrcoef(at_k, finals)[0, 1]))
    print(f"rank agreement of {prune_metric} with the final val/lddt, by report:",
          " ".join(f"{k + 1}:{rho:+.2f}" for k, rho in enumerate(rhos)))
    return rhos


def report(args) -> None:
    out = Path(args.out)
    studies = {p: json.loads((out / f"study-{p}.json").read_text())
               for p in ("none", *PRUNERS) if (out / f"study-{p}.json").exists()}
    for name, result in studies.items():
        print(f"\n### pruner {name}: {result['study_wall_s']:.0f} s for the study\n")
        print("| trial | state | val/lddt | samples seen | seconds | start: setup / first batch "
              "/ first step (s) | lr | warmup ep | accum | prefetch |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in result["trials"]:
            p = r["params"]
            value = r["value"] if r["value"] is not None else r["last_reported"]
            start = r.get("startup") or {}  # kept from 2026-12-08 on
            start = " / ".join("-" if start.get(k) is None else f"{start[k]:.2f}"
                               for k in ("setup_s", "first_batch_s", "first_step_s"))
            print(f"| {r['trial']} | {r['state']} | {value:.4f} | {r['samples_seen']} | "
                  f"{r['seconds']:.1f} | {start} | {p['optim.lr']:.2e} | "
                  f"{p['scheduler.warmup_epochs']:.2f} | "
                  f"{p['trainer.accumulation_steps']} | {p['loader.prefetch_factor']} |")
    def best_and_time(result):
        done = [r for r in result["trials"] if r["state"] == "COMPLETE"]
        return max(r["value"] for r in done), sum(r["seconds"] for r in result["trials"])

    for name in PRUNERS:
        if "none" not in studies or name not in studies:
            continue
        (b_full, t_full), (b_pruned, t_pruned) = (best_and_time(studies["none"]),
                                                  best_and_time(studies[name]))
        n = min(len(studies["none"]["trials"]), len(studies[name]["trials"]))
        print(f"\n{name}: best without pruning {b_full:.4f} in {t_full:.0f} s of trials; with "
              f"pruning {b_pruned:.4f} in {t_pruned:.0f} s: "
              f"{100 * (b_full - b_pruned) / b_full:.2f}% below, "
              f"{100 * t_pruned / t_full:.0f}% of the time (trials: {n} compared)")
    if (out / "prefetch.json").exists():
        results = json.loads((out / "prefetch.json").read_text())
        print("\n| prefetch factor | median step (ms) | median data wait (ms) | data wait share | samples/s |")
        print("|---|---|---|---|---|")
        for factor, rows in results.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "repeat"}
            print(f"| {factor} | {med['median_step_ms']:.1f} | {med['median_data_wait_ms']:.2f} | "
                  f"{100 * med['data_wait_share']:.1f}% | {med['samples_per_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("study")
    p.add_argument("--pruner", choices=["none", "median", "successive_halving", "hyperband"],
                   default="median")
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--n-trials", type=int, default=12)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds after which no new trial starts")
    p.add_argument("--startup", type=int, default=3, help="trials before pruning starts")
    p.add_argument("--warmup-reports", type=int, default=2,
                   help="median: reports a trial makes before it may be cut")
    p.add_argument("--preset", default="small_model", help="model preset of every trial")
    p.add_argument("--work", default=None,
                   help="keep the study (store, MLflow database, data cache) in this folder, so "
                   "that a later call with the same folder adds trials to it; default: a "
                   "temporary folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--no-forkserver-preload", action="store_true",
                   help="for an A/B: loader workers import torch and the pipeline afresh in "
                        "every trial (pipeline.data.loader.preload_in_forkserver off)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("data")
    p.add_argument("--preset", default="small_model")
    p.add_argument("--work", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("prefetch")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", required=True)
    p = sub.add_parser("replay")
    p.add_argument("--startup", type=int, default=3, help="median: trials before pruning")
    p.add_argument("--min-resource", type=int, default=256,
                   help="hyperband: samples before the first cut (one epoch)")
    p.add_argument("--pruned-end-s", type=float, default=None,
                   help="seconds a pruned trial takes after its last report, when OUT holds "
                        "no real pruned study (default: each trial's own end of run)")
    p.add_argument("--prune-metric", choices=["val/lddt", "val/loss"], default="val/lddt",
                   help="what the replayed pruners compare at each report (val/loss: minus the "
                        "validation loss, as prune_metric: val/loss does in the tune command)")
    p.add_argument("--orders", type=int, default=0,
                   help="also replay this many random orders of the trials and summarise them")
    p.add_argument("--orders-seed", type=int, default=0)
    p.add_argument("--study", default=None,
                   help="the unpruned study's JSON (default OUT/study-none.json), e.g. "
                        "benchmarks/recorded/tune-base-model-2026-12-07.json")
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    commands = {"study": study, "data": prepare_data, "prefetch": prefetch, "replay": replay,
                "report": report}
    commands[args.command](args)


if __name__ == "__main__":
    main()
