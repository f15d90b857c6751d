"""Trainer building blocks: schedules, Lion, checkpoints, health checks, batch splitting."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.monitor.health import HealthConfig, HealthMonitor, report_markdown
from pipeline.train.checkpoint import (
    CheckpointManager,
    find_latest,
    load_checkpoint,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    write_checkpoint,
)
from pipeline.train.optim import Lion, OptimConfig, build_optimizer, parameter_groups
from pipeline.train.schedule import SchedulerConfig, build_scheduler
from pipeline.train.trainer import split_batch


def _lrs(cfg: SchedulerConfig, total: int, per_epoch: int, lr: float = 1.0) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = build_scheduler(cfg, opt, total_steps=total, steps_per_epoch=per_epoch)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_at_every_step():
    cfg = SchedulerConfig(name="cosine", warmup_epochs=1.0, warmup_start_factor=0.1, min_lr_ratio=0.0)
    lrs = _lrs(cfg, total=12, per_epoch=4)
    # Linear warmup over 4 steps from 0.1, then cosine from 1 to 0 over the remaining 8.
    expected = [0.1 + 0.9 * i / 4 for i in range(4)]
    expected += [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_cosine_restarts_warm_up_once():
    cfg = SchedulerConfig(
        name="cosine_restarts", warmup_steps=2, warmup_start_factor=0.5, restart_epochs=1.0,
        min_lr_ratio=0.0,
    )
    lrs = _lrs(cfg, total=10, per_epoch=4)
    cycle = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert lrs == pytest.approx([0.5, 0.75] + cycle + cycle, abs=1e-9)


def test_constant_after_warmup():
    lrs = _lrs(SchedulerConfig(name="constant", warmup_steps=2, warmup_start_factor=0.5), 6, 3)
    assert lrs == pytest.approx([0.5, 0.75, 1, 1, 1, 1])


def test_schedule_resumes_identically():
    cfg = SchedulerConfig(name="cosine", warmup_steps=3)
    full = _lrs(cfg, 10, 5)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(cfg, opt, total_steps=10, steps_per_epoch=5)
    for _ in range(6):
        opt.step()
        sched.step()
    state = sched.state_dict()
    # The trainer's order: build optimizer and scheduler fresh, then load both states (the
    # scheduler's constructor resets the LR to the warmup start; the optimizer state fixes it).
    opt2 = torch.optim.SGD(model.parameters(), lr=1.0)
    sched2 = build_scheduler(cfg, opt2, total_steps=10, steps_per_epoch=5)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    resumed = []
    for _ in range(4):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(full[6:])


def test_lion_update_rule():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    m = torch.randn(5)
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    opt.state[p]["exp_avg"] = m.clone()
    g = torch.randn(5)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    expected = before * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
    assert torch.allclose(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.99 * m + 0.01 * g)


def test_no_weight_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = parameter_groups(model, 0.1)
    assert [p.ndim for p in groups[0]["params"]] == [2]
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0
    for name in ("adamw", "lion", "sgd"):
        opt = build_optimizer(OptimConfig(name=name), model)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_checkpoint_write_verify_load(tmp_path):
    path = tmp_path / "checkpoints" / "step-00000001.pt"
    write_checkpoint(path, {"format_version": 1, "w": torch.arange(4), "rng": rng_state()})
    assert verify_checkpoint(path) is None
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(4))


def test_corrupt_and_partial_checkpoints_are_detected(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    good = folder / "step-00000001.pt"
    write_checkpoint(good, {"format_version": 1, "step": 1})
    bad = folder / "step-00000002.pt"
    write_checkpoint(bad, {"format_version": 1, "step": 2})
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit... byte
    bad.write_bytes(bytes(data))
    partial = folder / "step-00000003.pt"
    partial.write_bytes(b"half a file")  # no checksum file: an interrupted write
    import os
    import time

    now = time.time()
    for i, p in enumerate((good, bad, partial)):
        os.utime(p, (now + i, now + i))
    assert verify_checkpoint(bad) == "checksum mismatch (corrupt or truncated)"
    assert find_latest(tmp_path) == good
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(bad)


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(path, verify=False)


def test_manager_keeps_last_k_and_writes_in_background(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    tensor = torch.zeros(3)
    for step in (1, 2, 3):
        manager.save({"t": tensor}, step)
        tensor += 1  # training goes on; the snapshot must not see this
    manager.wait()
    names = sorted(p.name for p in tmp_path.glob("step-*.pt"))
    assert names == ["step-00000002.pt", "step-00000003.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "step-00000003.pt")["t"], torch.full((3,), 2.0))


def _health(**overrides) -> HealthMonitor:
    return HealthMonitor(HealthConfig(window=10, **overrides), base_lr=1e-3, warmup_steps=2)


def test_health_flags_loss_spike_with_suggestion():
    h = _health()
    for step in range(1, 11):
        assert h.observe(step, loss=1.0, grad_norm=1.0, lr=1e-3) == []
    assert h.observe(11, loss=10.0, grad_norm=1.0, lr=1e-3) == ["loss_spike"]
    report = h.report()
    assert report["overall_status"] == "warning"
    assert report["checks"]["loss_spike"]["evidence"][0]["step"] == 11
    assert "lower optim.lr to ~0.0005" in report["checks"]["loss_spike"]["suggestion"]
    assert "loss_spike" in report_markdown(report)


def test_health_grad_explosion_uses_pre_clip_norm():
    h = _health(grad_explosion_norm=100.0)
    for step in range(1, 6):
        h.observe(step, loss=1.0, grad_norm=2.0, lr=1e-3)
    assert h.observe(6, loss=1.0, grad_norm=5000.0, lr=1e-3) == ["grad_explosion"]
    assert h.report()["checks"]["grad_explosion"]["status"] == "critical"


def test_health_vanishing_non_finite_and_lr():
    h = _health(grad_vanishing_norm=1e-6)
    assert h.observe(1, loss=1.0, grad_norm=1e-9, lr=1e-3) == []  # during warmup: fine
    assert h.observe(5, loss=1.0, grad_norm=1e-9, lr=1e-3) == ["grad_vanishing"]
    assert h.observe(6, loss=float("nan"), grad_norm=1.0, lr=1e-3) == ["non_finite"]
    assert h.observe(7, loss=1.0, grad_norm=1.0, lr=0.0) == ["lr"]
    assert h.overall_status == "critical"
    assert h.metrics()["health/status"] == 2.0


def test_health_stagnation():
    h = _health(stagnation_steps=20, stagnation_min_improvement=0.05)
    fired = [h.observe(s, loss=1.0 - 1e-4 * s, grad_norm=1.0, lr=1e-3) for s in range(1, 30)]
    assert any("stagnation" in f for f in fired)
    h2 = _health(stagnation_steps=20, stagnation_min_improvement=0.05)
    fired2 = [h2.observe(s, loss=1.0 / s, grad_norm=1.0, lr=1e-3) for s in range(1, 30)]
    assert not any("stagnation" in f for f in fired2)


def test_split_batch_trims_padding_and_keeps_every_structure():
    lengths = torch.tensor([5, 3, 2, 4])
    batch = {
        "aatype": torch.arange(20).reshape(4, 5),
        "residue_mask": torch.arange(5)[None] < lengths[:, None],
        "lengths": lengths,
        "names": ["a", "b", "c", "d"],
    }
    chunks = split_batch(batch, 2)
    assert [c["names"] for c in chunks] == [["a", "b"], ["c", "d"]]
    assert chunks[0]["aatype"].shape == (2, 5) and chunks[1]["aatype"].shape == (2, 4)
    assert torch.equal(chunks[1]["aatype"], batch["aatype"][2:, :4])
    assert split_batch(batch, 1) == [batch]


class _MeanSquareModel(torch.nn.Module):
    """Deterministic stand-in for Diffold: the loss is a mean over the structures of a batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, batch):
        x = batch["aatype"].float()  # (B, L, 4) features, zero-padded
        mask = batch["residue_mask"].float()
        per_residue = ((x @ self.w) ** 2).mean(-1)
        per_structure = (per_residue * mask).sum(-1) / mask.sum(-1)
        return {"loss": per_structure.mean(), "terms": {"mse": per_structure.mean().detach()}}


def _batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    mask = torch.arange(8)[None] < lengths[:, None]
    x = torch.randn(n, 8, 4, generator=g) * mask[..., None]
    return {"aatype": x, "residue_mask": mask, "lengths": lengths,
            "names": [f"s{i}" for i in range(n)]}


def _rows(batch: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def _window_grad(window: list[dict], split: int = 1) -> tuple[torch.Tensor, float]:
    from contextlib import nullcontext
    from types import SimpleNamespace

    from pipeline.train.faults import FaultInjector, FaultsConfig
    from pipeline.train.trainer import Trainer

    torch.manual_seed(1)
    model = _MeanSquareModel()
    fake = SimpleNamespace(
        split=split, ddp_model=model, faults=FaultInjector(FaultsConfig()), step=0,
        device=torch.device("cpu"), ctx=SimpleNamespace(autocast=nullcontext), scaler=None,
    )
    n = sum(len(b["names"]) for b in window)
    loss, terms = Trainer._forward_backward(fake, window, n)
    assert torch.allclose(terms["mse"], loss)
    return model.w.grad.clone(), float(loss)


def test_accumulation_equals_one_large_batch():
    """k micro-batches of size b give the update of one batch of k*b (also uneven, also split)."""
    full = _batch(8)
    reference, ref_loss = _window_grad([full])
    uneven = [_rows(full, slice(0, 1)), _rows(full, slice(1, 5)), _rows(full, slice(5, 8))]
    for window in (split_batch(full, 4), split_batch(full, 2), uneven):
        grad, loss = _window_grad(window)
        assert torch.allclose(grad, reference, atol=1e-6), len(window)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
    # After an OOM the same window runs with every micro-batch split in two: same update.
    grad, _ = _window_grad(split_batch(full, 2), split=2)
    assert torch.allclose(grad, reference, atol=1e-6)


@pytest.mark.parametrize("name", ["cosine", "cosine_restarts", "constant"])
def test_changed_lr_on_resume_scales_the_schedule_without_restarting_warmup(name):
    from pipeline.train.runtime import rescale_lr

    cfg = SchedulerConfig(name=name, warmup_steps=3, restart_epochs=1.0)
    full = _lrs(cfg, 12, 4)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = build_scheduler(cfg, opt, total_steps=12, steps_per_epoch=4)
    for _ in range(5):
        model(torch.ones(2)).sum().backward()
        opt.step()
        sched.step()
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    # Resume with a peak LR of 2.0 instead of 1.0, in the trainer's order.
    opt2 = torch.optim.AdamW(model.parameters(), lr=2.0)
    sched2 = build_scheduler(cfg, opt2, total_steps=12, steps_per_epoch=4)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    rescale_lr(opt2, sched2, 2.0)
    resumed = []
    for _ in range(7):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx([2 * lr for lr in full[5:]])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])


# Validations after every 2nd step. The first falls in the 3-step warmup and is not counted
# (were it counted, its 0.9 would make every later value a non-improvement).
PLATEAU_METRICS = [0.9, 0.1, 0.2, 0.2, 0.2001, 0.15, 0.3, 0.1, 0.1, 0.1]
PLATEAU_CFG = SchedulerConfig(
    name="plateau", warmup_steps=3, warmup_start_factor=0.25, min_lr_ratio=0.0,
    plateau_factor=0.5, plateau_patience=2, plateau_threshold=1e-3,
)


def _plateau_lrs(
    cfg: SchedulerConfig, *, stop_after: int | None = None, new_lr: float | None = None,
    tmp_path=None,
) -> list[float]:
    """LR of each of 22 optimizer steps, validating (``PLATEAU_METRICS``) after every 2nd.

    With ``stop_after``, optimizer and scheduler go through a checkpoint file after that many
    steps and are rebuilt as the trainer does on resume (with ``new_lr``: a changed optim.lr).
    """
    from pipeline.train.runtime import rescale_lr

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(cfg, opt, total_steps=22, steps_per_epoch=2, mode="max")
    metrics = list(PLATEAU_METRICS)
    lrs = []
    for step in range(1, 23):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if step % 2 == 0 and metrics:  # the 11th validation would only move step 23
            sched.observe(metrics.pop(0))
        if step == stop_after:
            path = tmp_path / "step.pt"
            write_checkpoint(path, {"format_version": 1, "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict()})
            state = load_checkpoint(path)  # weights_only=True
            opt = torch.optim.SGD(model.parameters(), lr=new_lr or 1.0)
            sched = build_scheduler(cfg, opt, total_steps=22, steps_per_epoch=2, mode="max")
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if new_lr is not None:
                rescale_lr(opt, sched, new_lr / 1.0)
    return lrs


def test_plateau_warms_up_then_reduces_exactly_when_patience_runs_out():
    lrs = _plateau_lrs(PLATEAU_CFG)
    # Warmup 0.25 -> 1 over 3 steps. Counted validations (after steps 4, 6, ...): 0.1 best,
    # 0.2 better, then 0.2, 0.2001 (< 0.1% better) and 0.15: the third without improvement
    # (patience 2) halves the LR from step 13 on; 0.3 is a new best, then three times 0.1:
    # halved again from step 21 on.
    expected = [0.25, 0.5, 0.75] + [1.0] * 9 + [0.5] * 8 + [0.25] * 2
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_plateau_floor_is_min_lr_ratio():
    lrs = _plateau_lrs(SchedulerConfig(**{**PLATEAU_CFG.__dict__, "min_lr_ratio": 0.4}))
    assert lrs[-2:] == pytest.approx([0.4, 0.4])  # 0.5 * 0.5 would be 0.25


def test_plateau_resumes_identically_mid_streak(tmp_path):
    """Stopped after step 10: two validations without improvement are pending."""
    full = _plateau_lrs(PLATEAU_CFG)
    assert _plateau_lrs(PLATEAU_CFG, stop_after=10, tmp_path=tmp_path) == pytest.approx(
        full, abs=1e-12
    )
    # Stopped during the warmup, too: the warmup continues where it was, once.
    assert _plateau_lrs(PLATEAU_CFG, stop_after=1, tmp_path=tmp_path) == pytest.approx(
        full, abs=1e-12
    )


def test_plateau_rescaled_on_resume_with_a_new_lr(tmp_path):
    cfg = SchedulerConfig(**{**PLATEAU_CFG.__dict__, "min_lr_ratio": 0.3})
    full = _plateau_lrs(cfg)
    resumed = _plateau_lrs(cfg, stop_after=14, new_lr=2.0, tmp_path=tmp_path)
    assert resumed[:14] == pytest.approx(full[:14])
    # Same position (one reduction done, no second warmup), doubled; the floor doubles too:
    # 2 x 0.3 = 0.6 instead of 2 x 0.25.
    assert full[14:] == pytest.approx([0.5] * 6 + [0.3] * 2)
    assert resumed[14:] == pytest.approx([1.0] * 6 + [0.6] * 2)


def test_find_latest_of_one_run(tmp_path):
    """`train --run-id` continues from that run's newest local checkpoint, not another's."""
    import os
    import time

    older = tmp_path / "runs" / "a" / "checkpoints" / "step-00000004.pt"
    newer = tmp_path / "runs" / "b" / "checkpoints" / "step-00000002.pt"
    write_checkpoint(older, {"format_version": 1, "run_id": "run-a"})
    write_checkpoint(newer, {"format_version": 1, "run_id": "run-b"})
    now = time.time()
    os.utime(older, (now - 10, now - 10))
    assert find_latest(tmp_path) == newer
    assert find_latest(tmp_path, run_id="run-a") == older
    assert find_latest(tmp_path, run_id="run-c") is None


class _NoisyNativeModel(torch.nn.Module):
    """Stands in for Diffold in validation: "samples" the native plus fixed noise (3 A)
    (validation never passes the native to ``sample``, so it reads it from the batch the
    test keeps), with pLDDT 50 everywhere."""

    def __init__(self, coords: torch.Tensor):
        super().__init__()
        self.coords = coords

    def sample(self, features, n_samples, n_steps, generator):
        noise = torch.randn(self.coords.shape, generator=torch.Generator().manual_seed(3))
        coords = (self.coords + 3.0 * noise).unsqueeze(1).expand(-1, n_samples, -1, -1, -1)
        return {"coords": coords, "plddt": torch.full(coords.shape[:3], 50.0)}

    def forward(self, batch):
        return {"loss": torch.zeros(()), "terms": {}}


def test_validation_searches_gdt_with_its_seed_budget():
    """Validation scores GDT-TS with the 512-seed budget (``VAL_GDT_MAX_SEEDS``): on a
    structure long enough for the budget to bind, ``val/gdt_ts`` is the budgeted search's
    value, and the other metrics are the functions' own."""
    from contextlib import nullcontext

    from pipeline.config.loader import load_config
    from pipeline.data.features import REPRESENTATIVE_ATOM
    from pipeline.data.loader import collate
    from pipeline.data.synthetic import generate_synthetic
    from pipeline.metrics import gdt, lddt
    from pipeline.metrics._search import window_seeds
    from pipeline.metrics.gdt import LGA_WINDOW_SIZES, _lga_widths
    from pipeline.train.validate import VAL_GDT_MAX_SEEDS, Validator

    batch = collate(generate_synthetic(1, seed=0, min_length=150, max_length=160))
    n = int(batch["residue_mask"].sum())
    exhaustive_seeds = window_seeds([n], _lga_widths(LGA_WINDOW_SIZES), None, torch.device("cpu"))
    assert exhaustive_seeds[2].sum() > VAL_GDT_MAX_SEEDS  # the budget binds here
    model = _NoisyNativeModel(batch["coords"])
    cfg = load_config(scenario="debug", overrides=["trainer.val_samples=1"])
    metrics = Validator(cfg, model, [batch], torch.device("cpu"), nullcontext).run(epoch=0)

    pred = model.sample(None, 1, 1, None)["coords"][:, 0, :, REPRESENTATIVE_ATOM]
    ref = batch["coords"][:, :, REPRESENTATIVE_ATOM]
    mask = batch["residue_mask"] & batch["atom_mask"][..., REPRESENTATIVE_ATOM]
    budgeted = gdt(pred, ref, mask, max_seeds=VAL_GDT_MAX_SEEDS).score
    assert float(budgeted) != float(gdt(pred, ref, mask).score)  # the budget shows here
    assert metrics["val/gdt_ts"] == pytest.approx(float(budgeted), abs=1e-6)
    assert metrics["val/lddt"] == pytest.approx(float(lddt(pred, ref, mask)[0]), abs=1e-6)
