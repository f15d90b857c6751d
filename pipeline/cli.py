"""Command line: ``python -m pipeline {train,evaluate,tune,data}``.

Exit codes: 0 success; 2 bad input (one line ``error: ...`` on stderr naming the key or file);
1 an unexpected failure (with traceback) or a run stopped by repeated non-finite updates;
128+N when stopped by signal N (SIGTERM: 143, SIGINT: 130) after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import DiskFullError, PipelineError

log = logging.getLogger("pipeline")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error: ...`` line, exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise PipelineError(f"{self.prog}: {message}")

    def parse_args(self, args=None, namespace=None):
        # Unknown options are reported by the sub-command that received them.
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            prog = f"{self.prog} {parsed.command}" if getattr(parsed, "command", None) else self.prog
            raise PipelineError(f"{prog}: unrecognized arguments: {' '.join(extra)}")
        return parsed


def _blank_is_none(value: str | None) -> str | None:
    """MLproject passes unset parameters as empty strings."""
    return value if value not in (None, "", "none", "None") else None


def _optional(kind: type):
    """A converter that reads an empty string as "not given" and names the expected type."""

    def convert(value: str):
        if _blank_is_none(value) is None:
            return None
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {value!r}") from None

    convert.__name__ = kind.__name__
    return convert


def _add_config_args(p: argparse.ArgumentParser, *, scenario_default: str | None = None) -> None:
    p.add_argument("--config", type=_blank_is_none, help="YAML file with config overrides")
    p.add_argument(
        "--scenario",
        type=_blank_is_none,
        default=scenario_default,
        help="balanced | performance | safety | memory | debug",
    )
    p.add_argument("--preset", type=_blank_is_none, help="small_model | base_model | large_model")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set optim.lr=1e-3",
    )
    p.add_argument(
        "--overrides",
        dest="override_string",
        default="",
        help="several KEY=VALUE items in one string (MLproject's 'overrides' parameter)",
    )
    p.add_argument("--epochs", type=_blank_is_none, help="shorthand for --set trainer.epochs=N")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipeline", description="Diffold training pipeline")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument(
        "--resume",
        type=_blank_is_none,
        help="'auto' (newest valid checkpoint under output_dir) or a checkpoint path",
    )
    p.add_argument(
        "--run-id",
        type=_blank_is_none,
        help="continue this MLflow run from its newest checkpoint: local, else its uploaded one",
    )

    p = sub.add_parser("evaluate", help="score a trained model or external predictions")
    p.add_argument("--checkpoint", type=_blank_is_none, help="checkpoint file")
    p.add_argument("--run-id", type=_blank_is_none, help="MLflow run whose checkpoint to use")
    p.add_argument("--predictions", type=_blank_is_none, help="predicted structure file or dir")
    p.add_argument("--reference", type=_blank_is_none, help="native structure (with --predictions)")
    p.add_argument(
        "--atoms", default="all", choices=["all", "C3'", "C1'", "C4'", "P"], help="atom set"
    )
    p.add_argument("--output", type=_blank_is_none, help="CSV file of per-model/target results")
    p.add_argument(
        "--n-samples", type=_optional(int), default=5, help="structures sampled per target"
    )
    p.add_argument(
        "--sampler-steps", type=_optional(int), default=None,
        help="diffusion sampler steps (default: the model's model.n_steps)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--overrides", dest="override_string", default="")

    p = sub.add_parser("tune", help="search hyperparameters with Optuna")
    _add_config_args(p)
    p.add_argument("--n-trials", type=_optional(int), default=None, help="trials to run")
    p.add_argument("--timeout", type=_optional(float), default=None, help="stop after N seconds")
    p.add_argument("--storage", type=_blank_is_none, help="Optuna storage URL")
    p.add_argument("--study-name", type=_blank_is_none, help="study name (resumes if it exists)")
    p.add_argument("--tune-config", type=_blank_is_none, help="search-space file (configs/tune.yaml)")
    p.add_argument(
        "--n-workers", type=_optional(int), default=1,
        help="local worker processes (one per GPU when there are GPUs)",
    )
    p.add_argument(
        "--parent-run-id", type=_blank_is_none,
        help="join a study led elsewhere: add trials as children of this MLflow run",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --n-workers

    p = sub.add_parser("data", help="inspect a directory of structure files")
    p.add_argument("--check", required=True, metavar="PATH", help="directory or list file")

    p = sub.add_parser(
        "sync", help="send what a run could not send (an outage, tracking.offline) to MLflow"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (<output_dir>/runs/...)")
    for p in sub.choices.values():  # -q/-v also after the sub-command
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    items = list(args.overrides)
    try:
        items.extend(shlex.split(args.override_string or ""))
    except ValueError as exc:  # an unbalanced quote
        raise PipelineError(f"--overrides {args.override_string!r}: {exc}") from None
    epochs = getattr(args, "epochs", None)
    if epochs is not None:
        items.append(f"trainer.epochs={epochs}")
    return items


def _load(args: argparse.Namespace):
    from pipeline.config.loader import load_config

    return load_config(
        scenario=args.scenario,
        preset=args.preset,
        config_file=args.config,
        overrides=_overrides(args),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train.trainer import train

    config = _load(args)
    result = train(
        config,
        resume=args.resume,
        run_id=os.environ.get("MLFLOW_RUN_ID"),
        continue_run=args.run_id,
    )
    summary = " ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if "/" in k)
    print(
        f"run {result.run_id or '(untracked)'} {result.status}: step {result.step}, "
        f"health {result.health_status}; {summary}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation import evaluate_external, evaluate_model

    sources = [name for name in ("checkpoint", "run_id", "predictions") if getattr(args, name)]
    if len(sources) != 1:
        raise PipelineError(
            "evaluate: give exactly one of --checkpoint, --run-id, --predictions"
            + (f" (got {', '.join('--' + s.replace('_', '-') for s in sources)})" if sources else "")
        )
    if args.predictions:
        if not args.reference:
            raise PipelineError("evaluate: --reference is required with --predictions")
        table = evaluate_external(args.predictions, args.reference, atoms=args.atoms, output=args.output)
        print(table)
        return 0
    summary = evaluate_model(
        checkpoint=args.checkpoint,
        run_id=args.run_id,
        overrides=_overrides(args),
        n_samples=args.n_samples,
        sampler_steps=args.sampler_steps,
        output=args.output,
    )
    print(summary)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tune import run_study

    base = _load(args)
    summary = run_study(
        base,
        tune_config=args.tune_config,
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study_name,
        parent_run_id=args.parent_run_id or os.environ.get("MLFLOW_RUN_ID"),
        n_workers=args.n_workers if args.n_workers is not None else 1,
        join=args.parent_run_id is not None and not args.worker,
        worker=args.worker,
    )
    print(summary)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from pipeline.data import DataConfig
    from pipeline.data.inspect import check_path, format_report

    report = check_path(args.check, DataConfig(source="files", path=args.check))
    print(format_report(report))
    if not report["usable"]:  # the report is on stdout; the verdict is a bad-input exit
        reasons = "; ".join(f"{reason}: {n}" for reason, n in report["skipped_files"].items())
        raise PipelineError(
            f"data --check {args.check}: no usable structure file"
            + (f" ({reasons})" if reasons else " (no .pdb/.cif files found)")
        )
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from pipeline.tracking.mlflow_tracker import check_reachable, tracking_uri
    from pipeline.tracking.spool import sync

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise PipelineError(f"sync {run_dir}: no such run directory")
    check_reachable(tracking_uri())
    print(sync(run_dir, tracking_uri()))
    return 0


COMMANDS = {
    "train": cmd_train, "evaluate": cmd_evaluate, "tune": cmd_tune, "data": cmd_data,
    "sync": cmd_sync,
}


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.train.trainer import Interrupted, NonFiniteStop

    try:
        args = build_parser().parse_args(argv)
        level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
        if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for all
            level = max(level, logging.WARNING)
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
        # Its retry warnings during a tracking outage: the tracker reports the outage itself.
        logging.getLogger("urllib3.connectionpool").setLevel(max(level, logging.ERROR))
        return COMMANDS[args.command](args)
    except (NonFiniteStop, DiskFullError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {exc.filename or 'a file'}: no space left on device", file=sys.stderr)
        return 1
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
