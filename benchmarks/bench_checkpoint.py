"""Checkpoint stall on the GPU: what a save costs the training thread, and the whole run.

1. ``HostSnapshot`` correctness on CUDA: copies enqueued, then the tensors are changed in
   place on the same stream; the snapshot must hold the values from before the change.
2. Stall of one snapshot of a model + AdamW state: synchronous per-tensor copies to pageable
   memory (the previous implementation) vs ``HostSnapshot.take`` (asynchronous copies into
   reused pinned buffers), interleaved, right after an enqueued training step.
3. Whole runs of the trainer (tracking on, checkpoints uploaded as artifacts): a checkpoint
   every ``--every`` steps and at epoch ends vs at epoch ends only, interleaved;
   the difference in training wall time is the full cost of saving (stall, writer thread,
   uploads), beside the stall the trainer logs itself (``perf/checkpoint_stall_ms``).
4. The writer thread's GIL time (``--gil-only``, runs on the CPU too): ``torch.save`` pickles
   every tensor of the state in Python, holding the GIL. Timed: the write alone
   (``write_checkpoint``: serialise, fsync, checksum), and ``--gil-ops`` tiny torch ops on the
   main thread alone and beside a write, for each switch interval in ``--switch-intervals``
   (Python's default is 5 ms). The difference is what the training thread loses to one write.
   Then the same through ``CheckpointManager`` with each ``--writers`` (``thread``: the write
   above in a background thread; ``process``: serialised by the writer process), interleaved:
   the ``save()`` call (the snapshot, a stall either way), the tiny ops beside the write that
   follows it, and save-to-written alone.

    python benchmarks/bench_checkpoint.py --preset base_model --steps 200 --every 50 --out OUT
    python benchmarks/bench_checkpoint.py --gil-only --preset small_model --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _sync_snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _sync_snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_sync_snapshot(v) for v in value)
    return value


def correctness() -> dict:
    from pipeline.train.checkpoint import HostSnapshot

    snap = HostSnapshot()
    results = []
    for round_ in range(3):  # the second and third rounds reuse the pinned buffers
        x = {"a": torch.randn(4096, 4096, device="cuda"), "b": [torch.arange(10, device="cuda")]}
        expected = _sync_snapshot(x)
        state = snap.take(x)
        x["a"].mul_(-3.0)  # enqueued after the copies on the same stream
        x["b"][0].add_(7)
        snap.ready()
        results.append(torch.equal(state["a"], expected["a"]) and torch.equal(state["b"][0],
                                                                             expected["b"][0]))
    return {"snapshot_matches_values_at_save": results}


def stall(args) -> dict:
    from pipeline.config.loader import load_config
    from pipeline.train import runtime
    from pipeline.train.checkpoint import HostSnapshot

    cfg = load_config(scenario="balanced", preset=args.preset, overrides=[
        "output_dir=/tmp/bench-ck-stall", "tracking.enabled=false", "model.compile=false",
        "trainer.micro_batch_size=16", "data.n_train=256", "data.crop_length=64",
    ])
    ctx = runtime.setup(cfg)
    parts = runtime.build_components(cfg, ctx)
    model, opt = parts.model, parts.optimizer
    batches = []
    parts.train_loader.set_epoch(0)
    for batch in parts.train_loader:
        batches.append(batch)
        if len(batches) == 4:
            break

    def step(i):
        with ctx.autocast():
            loss = model(batches[i % len(batches)])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    snap = HostSnapshot()
    times = {"sync_pageable_ms": [], "async_pinned_ms": [], "async_ready_ms": []}
    for i in range(args.stall_repeats):
        for variant in ("sync_pageable_ms", "async_pinned_ms"):
            step(i)  # a step is queued on the GPU when the save starts, as in training
            start = time.perf_counter()
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            if variant == "sync_pageable_ms":
                _sync_snapshot(state)
            else:
                snap.take(state)
            times[variant].append(1000 * (time.perf_counter() - start))
            if variant == "async_pinned_ms":
                start = time.perf_counter()
                snap.ready()
                times["async_ready_ms"].append(1000 * (time.perf_counter() - start))
            torch.cuda.synchronize()
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    n_bytes += sum(
        v.numel() * v.element_size()
        for s in opt.state_dict()["state"].values() for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    runtime.teardown(ctx)
    return {
        "state_mb": n_bytes / 2**20,
        "median": {k: statistics.median(v[1:]) for k, v in times.items()},
        "all": times,
    }


def whole_runs(args) -> list[dict]:
    import mlflow

    from pipeline.config.loader import load_config
    from pipeline.train.trainer import train

    rows = []
    cache = Path(tempfile.mkdtemp(prefix="bench-ck-cache-"))  # the synthetic set, made once
    for repeat in range(args.repeats):
        for every in (args.every, None):
            work = Path(tempfile.mkdtemp(prefix="bench-ck-"))
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
            cfg = load_config(scenario="balanced", preset=args.preset, overrides=[
                f"output_dir={work}", "model.compile=false", "trainer.micro_batch_size=16",
                "data.n_train=1024", f"data.cache_dir={cache}", "data.crop_length=64",
                f"trainer.max_steps={args.steps}",
                "trainer.eval_every_epochs=1000", "tracking.log_every_steps=1",
                f"trainer.checkpoint_every_steps={every or 1_000_000}",
            ])
            result = train(cfg)
            client = mlflow.MlflowClient()
            hist = {
                key: [m.value for m in client.get_metric_history(result.run_id, key)]
                for key in ("perf/step_time_ms", "perf/checkpoint_stall_ms",
                            "perf/train_wall_s")
            }
            step_ms = hist["perf/step_time_ms"][20:]
            # Saves during training: every N steps and at epoch ends (64 steps); the final
            # blocking save (at a step that is neither) is not a stall of training.
            stalls = hist["perf/checkpoint_stall_ms"][:-1]
            row = {
                "repeat": repeat,
                "checkpoint_every": every,
                "saves_during_training": len(stalls),
                "stall_ms_median": statistics.median(stalls) if stalls else 0.0,
                "stall_ms_max": max(stalls) if stalls else 0.0,
                "stall_ms_total": sum(stalls),
                "median_step_ms": statistics.median(step_ms),
                "sum_step_ms": sum(hist["perf/step_time_ms"]),
                "train_wall_s": hist["perf/train_wall_s"][-1],
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def _tiny_ops(n: int) -> float:
    x = torch.zeros(8)
    start = time.perf_counter()
    for _ in range(n):
        x = x + 1
    return time.perf_counter() - start


def gil_cost(args) -> dict:
    from pipeline.config.loader import load_config
    from pipeline.model import build_model
    from pipeline.train.checkpoint import write_checkpoint

    model = build_model(load_config(scenario="balanced", preset=args.preset, overrides=[]).model)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    tensors = len(state["model"]) + sum(
        torch.is_tensor(v) for s in state["optimizer"]["state"].values() for v in s.values())
    directory = Path(tempfile.mkdtemp(prefix="ckpt-gil-"))
    write_ms = []
    for i in range(args.repeats):
        start = time.perf_counter()
        write_checkpoint(directory / f"alone-{i}.pt", state)
        write_ms.append(1000 * (time.perf_counter() - start))
    result = {"preset": args.preset, "tensors": tensors, "ops": args.gil_ops,
              "write_alone_ms": write_ms, "by_switch_interval": {}}
    default = sys.getswitchinterval()
    try:
        for interval in args.switch_intervals:
            sys.setswitchinterval(interval)
            alone = [1000 * _tiny_ops(args.gil_ops) for _ in range(args.repeats)]
            beside = []
            for i in range(args.repeats):
                writer = threading.Thread(
                    target=write_checkpoint, args=(directory / f"beside-{i}.pt", state))
                writer.start()
                beside.append(1000 * _tiny_ops(args.gil_ops))
                writer.join()
            result["by_switch_interval"][f"{1000 * interval:g} ms"] = {
                "ops_alone_ms": alone, "ops_beside_a_write_ms": beside}
    finally:
        sys.setswitchinterval(default)
    result["by_writer"] = writer_cost(args, state, directory)
    return result


def writer_cost(args, state: dict, directory: Path) -> dict:
    """Per ``CheckpointManager`` writer: save() stall, tiny ops beside the write, whole write."""
    from pipeline.train.checkpoint import CheckpointManager

    managers = {w: CheckpointManager(directory / w, writer=w) for w in args.writers}
    rows = {w: {"save_call_ms": [], "ops_alone_ms": [], "ops_beside_a_write_ms": [],
                "save_to_written_ms": []} for w in args.writers}
    try:
        for manager in managers.values():  # the writer process's imports, the buffers
            manager.save(state, 0)
            manager.wait()
        for i in range(args.repeats):
            for writer, manager in managers.items():
                row = rows[writer]
                row["ops_alone_ms"].append(1000 * _tiny_ops(args.gil_ops))
                start = time.perf_counter()
                manager.save(state, 2 * i + 1)
                row["save_call_ms"].append(1000 * (time.perf_counter() - start))
                row["ops_beside_a_write_ms"].append(1000 * _tiny_ops(args.gil_ops))
                manager.wait()
                start = time.perf_counter()
                manager.save(state, 2 * i + 2)
                manager.wait()
                row["save_to_written_ms"].append(1000 * (time.perf_counter() - start))
    finally:
        for manager in managers.values():
            manager.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base_model")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stall-repeats", type=int, default=11)
    parser.add_argument("--skip-runs", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--gil-only", action="store_true",
                        help="only part 4, the writer thread's GIL time (CPU or GPU)")
    parser.add_argument("--gil-ops", type=int, default=2000)
    parser.add_argument("--switch-intervals", type=float, nargs="+",
                        default=[0.005, 0.001, 0.0002])
    parser.add_argument("--writers", nargs="+", default=["thread", "process"],
                        choices=["thread", "process"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gil_only:
        result = gil_cost(args)
        (out / "checkpoint_gil.json").write_text(json.dumps(result, indent=1))
        med = statistics.median
        print(f"{result['preset']}: {result['tensors']} tensors; write alone: median "
              f"{med(result['write_alone_ms']):.1f} ms")
        for interval, r in result["by_switch_interval"].items():
            print(f"switch interval {interval}: {args.gil_ops} tiny ops alone "
                  f"{med(r['ops_alone_ms']):.1f} ms, beside a write "
                  f"{med(r['ops_beside_a_write_ms']):.1f} ms (median of {args.repeats})")
        for writer, r in result["by_writer"].items():
            print(f"CheckpointManager(writer={writer!r}): save() {med(r['save_call_ms']):.1f} ms;"
                  f" tiny ops alone {med(r['ops_alone_ms']):.1f} ms, beside the write "
                  f"{med(r['ops_beside_a_write_ms']):.1f} ms; save to written "
                  f"{med(r['save_to_written_ms']):.1f} ms (median of {args.repeats})")
        return
    result = {"correctness": correctness()}
    print(result, flush=True)
    result["stall"] = stall(args)
    print({k: v for k, v in result["stall"].items() if k != "all"}, flush=True)
    if not args.skip_runs:
        result["runs"] = whole_runs(args)
    (out / "checkpoint.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
