"""The pruner replay of the tuning benchmark (benchmarks/bench_tune.py) charges and keeps
what a real pruned study would, on curves whose outcome is worked out by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"optim.lr": 1e-3, "scheduler.warmup_epochs": 0.0,
          "trainer.accumulation_steps": 1, "loader.prefetch_factor": 2}


def _trial(number: int, values: list[float]) -> dict:
    """A finished trial reporting ``values`` every 1,024 samples, 10 s apart, ending 5 s
    after its last report."""
    curve = [[1024 * (k + 1), 10.0 * (k + 1), v] for k, v in enumerate(values)]
    return {"trial": number, "curve": curve, "state": "COMPLETE", "value": values[-1],
            "last_reported": values[-1], "samples_seen": 1024 * len(values),
            "seconds": curve[-1][1] + 5.0, "params": PARAMS}


def _four_trials() -> list[dict]:
    """Trials 0 and 1 start the study; trial 2 stays low; trial 3 leads throughout and ends
    best (0.8). Each costs 35 s: three reports 10 s apart, then 5 s of end of run."""
    return [_trial(0, [0.5, 0.6, 0.7]), _trial(1, [0.4, 0.5, 0.6]),
            _trial(2, [0.1, 0.1, 0.1]), _trial(3, [0.6, 0.7, 0.8])]


def _write_study(out: Path, trials: list[dict]) -> None:
    """``trials`` as the unpruned study's JSON that the replay reads from ``out``."""
    study = {"pruner": "none", "seed": 0, "n_trials": len(trials),
             "study_wall_s": sum(t["seconds"] for t in trials), "summary": "", "trials": trials}
    (out / "study-none.json").write_text(json.dumps(study))


def _replay(out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_tune.py"), "replay",
           "--out", str(out), "--startup", "2", "--min-resource", "1024", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "replay.json").read_text())


@pytest.mark.parametrize("pruned_end_s", [None, 0.3])
def test_replay_charges_a_pruned_trial_up_to_its_cut(tmp_path, pruned_end_s):
    # Trials 0 and 1 start the study (2 startup trials); trial 2 reports 0.1 at 1,024
    # samples, below the median (0.45) of the finished trials there, and is cut at its first
    # report; trial 3 leads throughout and is kept.
    _write_study(tmp_path, _four_trials())
    extra = [] if pruned_end_s is None else ["--pruned-end-s", str(pruned_end_s)]
    rows = _replay(tmp_path, *extra)

    assert rows["none"] == pytest.approx({"pruned": 0, "best": 0.8, "gpu_s": 140.0,
                                          "time_share": 1.0, "reached_99pct_at_s": 140.0})
    # The cut trial costs its first report (10 s) plus the end of a pruned trial: its own
    # end of run (5 s) unless --pruned-end-s says otherwise.
    end = 5.0 if pruned_end_s is None else pruned_end_s
    spent = 35.0 + 35.0 + (10.0 + end) + 35.0
    assert rows["median"] == pytest.approx({"pruned": 1, "best": 0.8, "gpu_s": spent,
                                            "time_share": spent / 140.0,
                                            "reached_99pct_at_s": spent})


def test_replay_over_orders_summarises_where_the_best_comes(tmp_path):
    # Two trials of equal cost (35 s): without pruning the best (trial 0) is reached after
    # 35 s (half the study) when it comes first, and only at the end (70 s) when it comes
    # second; over many random orders both happen, and every order keeps the best and
    # spends all 70 s.
    _write_study(tmp_path, [_trial(0, [0.5, 0.6, 0.7]), _trial(1, [0.4, 0.4, 0.4])])
    rows = _replay(tmp_path, "--orders", "40")

    orders = rows["none"]["orders"]
    assert orders["n"] == 40
    assert orders["best_kept_share"] == 1.0
    assert orders["time_share_q"] == pytest.approx([1.0, 1.0, 1.0])
    assert orders["reached_share_q"][0] == pytest.approx(0.5)
    assert orders["reached_share_q"][2] == pytest.approx(1.0)
    # The recorded order (best first) is reported as before, beside the summary.
    assert rows["none"]["reached_99pct_at_s"] == pytest.approx(35.0)


def test_replay_waits_the_named_number_of_reports(tmp_path):
    # The curves of the first test: trial 2 is below the median at every report. A pruner
    # with "no cut before report k" cuts it at report k exactly (10 s per report, then the
    # 0.3 s end of a pruned trial), as the tune command's median_warmup_reports: k - 1 does.
    _write_study(tmp_path, _four_trials())
    rows = _replay(tmp_path, "--pruned-end-s", "0.3")

    for k in (2, 3):
        row = rows[f"median, no cut before report {k}"]
        assert row["pruned"] == 1
        assert row["gpu_s"] == pytest.approx(35.0 + 35.0 + (10.0 * k + 0.3) + 35.0)


def test_oracle_bound_cuts_every_trial_that_ends_below_the_best_at_its_first_report(tmp_path):
    # Same curves: the best ends at 0.8, so the oracle keeps trial 3 alone (the others end
    # at 0.7, 0.6 and 0.1, below 99% of it), whatever their early values, and needs no
    # startup trials: each of them costs its first report (10 s) and the 0.3 s end.
    _write_study(tmp_path, _four_trials())
    rows = _replay(tmp_path, "--pruned-end-s", "0.3", "--orders", "20")

    oracle = rows["oracle: knows the final values, cuts at report 1"]
    spent = 3 * 10.3 + 35.0
    assert oracle["pruned"] == 3
    assert oracle["best"] == pytest.approx(0.8)
    assert oracle["gpu_s"] == pytest.approx(spent)
    assert oracle["reached_99pct_at_s"] == pytest.approx(spent)
    # In every order it keeps the best and spends the same.
    assert oracle["orders"]["best_kept_share"] == 1.0
    assert oracle["orders"]["time_share_q"] == pytest.approx([spent / 140.0] * 3)


def test_replay_can_prune_on_the_validation_loss(tmp_path):
    # Trial 3 ends best (0.8) but its val/lddt starts lowest (0.05), so a median pruner on
    # val/lddt cuts it at the first report; its val/loss is the lowest from the first report
    # on, so the same pruner on val/loss (minus the loss, the study maximising) keeps it and
    # cuts trial 2 (highest loss) instead.
    trials = [_trial(0, [0.5, 0.6, 0.7]), _trial(1, [0.4, 0.5, 0.6]),
              _trial(2, [0.3, 0.3, 0.3]), _trial(3, [0.05, 0.5, 0.8])]
    losses = {0: [1.0, 0.9, 0.8], 1: [1.1, 1.0, 0.9], 2: [1.5, 1.5, 1.5], 3: [0.9, 0.7, 0.5]}
    for t in trials:
        for entry, loss in zip(t["curve"], losses[t["trial"]], strict=True):
            entry.append(loss)
    _write_study(tmp_path, trials)

    on_lddt = _replay(tmp_path, "--pruned-end-s", "0.3")["median"]
    assert on_lddt["pruned"] == 2 and on_lddt["best"] == pytest.approx(0.7)  # lost trial 3
    on_loss = _replay(tmp_path, "--pruned-end-s", "0.3", "--prune-metric", "val/loss")
    assert on_loss["median"]["pruned"] == 1 and on_loss["median"]["best"] == pytest.approx(0.8)
    assert on_loss["median"]["gpu_s"] == pytest.approx(35.0 + 35.0 + 10.3 + 35.0)


def test_replay_on_the_loss_needs_recorded_losses(tmp_path):
    _write_study(tmp_path, _four_trials())  # val/lddt only, as studies recorded before
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_tune.py"), "replay", "--out",
         str(tmp_path), "--prune-metric", "val/loss"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: --prune-metric val/loss" in proc.stderr, proc.stderr
    assert "has no val/loss curves" in proc.stderr, proc.stderr
