"""Estimate the activation memory of one training step without a GPU.

The model runs forward and backward on fake tensors (``FakeTensorMode``: shapes and dtypes,
no data, no arithmetic), under bf16 autocast as on the GPU, while a dispatch mode adds up the
bytes of every tensor storage that is alive and keeps the peak. Parameters, gradients and
optimizer state are reported apart. What it cannot see: CUDA kernels' workspaces and the
allocator's fragmentation; and attention runs on SDPA's CPU path, which materialises the
(samples x heads x L x L) score tensors that CUDA's fused kernels avoid, so the estimate is
an upper bound there. Use it to see how memory scales with the crop and which tensors
dominate; the GPU benchmark (``bench_model.py``) measures the real peak.

    python benchmarks/estimate_memory.py --preset large_model --lengths 512 1024
"""

from __future__ import annotations

import argparse
import collections
import sys
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import preset_model_config, synthetic_batch  # noqa: E402

from pipeline.model import build_model  # noqa: E402

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, their peak, and the largest outputs by op."""

    def __init__(self, large_bytes: int) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.sizes: dict[int, int] = {}
        self.large_bytes = large_bytes
        self.large: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self.sizes:
                continue  # a view of a storage already counted
            nbytes = storage.nbytes()
            self.sizes[key] = nbytes
            self.live += nbytes
            weakref.finalize(storage, self._free, key)
            if nbytes >= self.large_bytes:
                self.large[(func.__name__, tuple(t.shape), str(t.dtype).removeprefix("torch."))] += 1
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


def estimate(preset: str, length: int, micro_batch: int, overrides: list[str]) -> dict:
    cfg = preset_model_config(preset, overrides)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        torch.manual_seed(0)
        model = build_model(cfg)
        batch = synthetic_batch(micro_batch, length, torch.device("cpu"))
        batch = {k: fake.from_tensor(v) if torch.is_tensor(v) else v for k, v in batch.items()}
        tracker = LiveBytes(large_bytes=length * length * 1024)
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch)["loss"]
            after_forward = tracker.live
            loss.backward()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "preset": preset, "length": length, "micro_batch": micro_batch,
        "activation_checkpointing": cfg.activation_checkpointing,
        "after_forward_gib": after_forward / GIB, "peak_gib": tracker.peak / GIB,
        # AdamW: parameters, gradients and two moments, float32.
        "params_grads_adam_gib": 4 * params / GIB,
        "largest": tracker.large.most_common(6),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="large_model")
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, e.g. --set activation_checkpointing=false")
    args = p.parse_args(argv)
    print("| preset | length | checkpointing | after forward (GiB) | peak activations (GiB) "
          "| + params, grads, AdamW (GiB) |")
    print("|---|---|---|---|---|---|")
    rows = [estimate(args.preset, n, args.micro_batch, args.set) for n in args.lengths]
    for r in rows:
        print(f"| {r['preset']} | {r['micro_batch']} x {r['length']} | "
              f"{'yes' if r['activation_checkpointing'] else 'no'} | {r['after_forward_gib']:.2f} "
              f"| {r['peak_gib']:.2f} | {r['peak_gib'] + r['params_grads_adam_gib']:.2f} |")
    for r in rows:
        print(f"\nlargest outputs at {r['length']} (count, op, shape, dtype):")
        for (op, shape, dtype), count in r["largest"]:
            print(f"  {count:4d}  {op}  {list(shape)}  {dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
