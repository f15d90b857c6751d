"""Structure metrics: identity, invariance, mirror images, masks, batching, and agreement with
biotite (an independent implementation) on random inputs."""

from __future__ import annotations

import importlib
import math
import sys

import biotite.structure as struc
import numpy as np
import pytest
import torch

from pipeline.metrics import (
    GDT_HA_CUTOFFS,
    chirality,
    gdt,
    gdt_ha,
    gdt_ts,
    is_mirrored,
    kabsch,
    lddt,
    lddt_per_residue,
    rmsd,
    rna_d0,
    score_batch,
    score_predictions,
    superimpose,
    tm_fragment_lengths,
    tm_score,
)
from pipeline.data.features import ATOM_NAMES, REPRESENTATIVE_ATOM
from pipeline.metrics._fused import fused, lddt_pair_sums


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def random_walk(batch: int, length: int, *, step: float = 6.0, seed: int = 0) -> torch.Tensor:
    """Chains with ~6 A steps between consecutive nucleotides (C3'-C3'-like), (B, L, 3)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(batch, length, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True) * step
    return d.cumsum(1)


def noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + sigma * torch.randn(x.shape, generator=g)


def random_rigid(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x`` under a random proper rotation and translation (one per structure)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(x.shape[0], 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]  # proper
    t = torch.randn(x.shape[0], 1, 3, generator=g, dtype=torch.float64) * 50
    return (x.double() @ q.transpose(-1, -2) + t).to(x.dtype)


def mirror(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor([-1.0, 1.0, 1.0], dtype=x.dtype)


def full_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:-1], dtype=torch.bool)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref = random_walk(3, 60, seed=1)
    model = noisy(ref, 2.0, seed=2)
    return model, ref, full_mask(ref)


# --------------------------------------------------------------------------- identity


def test_identity_scores_are_perfect(pair):
    _, ref, mask = pair
    scores = score_batch(ref, ref, mask)
    assert torch.allclose(scores["rmsd"], torch.zeros(3), atol=1e-4)
    assert torch.equal(scores["lddt"], torch.ones(3))
    assert torch.allclose(scores["gdt_ts"], torch.ones(3))
    assert torch.allclose(scores["tm_score"], torch.ones(3), atol=1e-6)
    assert torch.equal(scores["chirality"], torch.ones(3))
    assert torch.allclose(gdt_ha(ref, ref, mask), torch.ones(3))


# --------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_invariant_under_rigid_motions(pair, seed):
    model, ref, mask = pair
    before = score_batch(model, ref, mask)
    after = score_batch(random_rigid(model, seed), random_rigid(ref, seed + 100), mask)
    assert torch.allclose(before["rmsd"], after["rmsd"], atol=1e-4)
    assert torch.allclose(before["lddt"], after["lddt"], atol=1e-5)
    assert torch.allclose(before["tm_score"], after["tm_score"], atol=1e-5)
    # A threshold decision may flip on float noise: at most one residue at one cutoff.
    assert torch.allclose(before["gdt_ts"], after["gdt_ts"], atol=1 / (4 * 60) + 1e-6)
    assert torch.equal(before["chirality"], after["chirality"])


@pytest.mark.parametrize("seed", [0, 1])
def test_search_solvers_agree(pair, seed):
    """SVD (Kabsch) and quaternion (Horn) fits give the same search results."""
    model, ref, mask = pair
    model = random_rigid(model, seed)
    assert torch.allclose(
        tm_score(model, ref, mask, solver="svd"),
        tm_score(model, ref, mask, solver="quaternion"),
        atol=1e-6,
    )
    assert torch.equal(
        gdt(model, ref, mask, solver="svd").fractions,
        gdt(model, ref, mask, solver="quaternion").fractions,
    )
    # rmsd takes the residual from the singular values; fitting with either solver and
    # measuring gives the same, mirror images included (proper rotations only).
    mirror = model * torch.tensor([-1.0, 1.0, 1.0])
    for mobile in (model, mirror):
        for solver in ("svd", "quaternion"):
            fitted = superimpose(mobile.double(), ref.double(), mask, solver=solver)
            measured = rmsd(fitted, ref.double(), mask, superpose=False)
            assert torch.allclose(rmsd(mobile.double(), ref.double(), mask), measured, atol=1e-9)
    assert (rmsd(mirror, ref, mask) > 1.0).all()


@pytest.fixture
def fresh_fused_fit():
    """Recompile the fused quaternion fit before and after the test (it may change the
    module's step count, which the compiled code captures)."""
    from pipeline.metrics import _fused

    def reset():
        _fused.fused.cache_clear()
        torch._dynamo.reset()

    reset()
    yield
    reset()


@pytest.mark.parametrize("newton_steps", [16, 2])
def test_compiled_quaternion_fit_matches_the_svd(monkeypatch, fresh_fused_fit, newton_steps):
    """The fused quaternion fit (fixed Newton steps, then the eager loop for fits not yet
    converged) gives the SVD's rotation and translation: well-fitting and unrelated point
    sets, with the default step count and with too few steps, where the eager loop must
    finish most fits. That case tests the fallback's logic, not generated code: it compiles with
    the ``aot_eager`` backend (the graph as traced, run eagerly), which spares CI a second
    Inductor compilation of the unrolled Newton steps (about 20 s on two cores)."""
    import functools

    from pipeline.metrics import _fused, superpose

    if newton_steps != 16:
        monkeypatch.setattr(torch, "compile",
                            functools.partial(torch.compile, backend="aot_eager"))

    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 12, 3, generator=g, dtype=torch.float64) * 8
    noise = torch.randn(32, 12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(64, 12, 3, generator=g, dtype=torch.float64) * 8  # unrelated: 32..63
    y[:32] = random_rigid(x[:32], seed=6) + 0.3 * noise  # fits well: 0..31
    moments = torch.cat(
        [
            torch.full((64, 1), 12.0, dtype=torch.float64),
            x.sum(1),
            y.sum(1),
            (x.unsqueeze(-1) * y.unsqueeze(-2)).sum(1).flatten(1),
            (x * x).sum((1, 2)).unsqueeze(-1),
            (y * y).sum((1, 2)).unsqueeze(-1),
        ],
        -1,
    )
    monkeypatch.setattr(superpose, "_FUSED_NEWTON_STEPS", newton_steps)
    *_, converged = superpose.quaternion_fit_unchecked(moments)
    assert bool(converged.all()) == (newton_steps == 16)
    r_svd, t_svd = superpose._fit_from_moments(moments, solver="svd")
    r, t = superpose._fit_from_moments(moments, solver="quaternion", compiled=True)
    assert torch.allclose(r, r_svd, atol=1e-9, rtol=0)
    assert torch.allclose(t, t_svd, atol=1e-7, rtol=0)
    # Inside the searches (the GPU default solver, compiled), whose fits are checked once at
    # the end: with too few Newton steps the search is redone with eager fits.
    from pipeline.metrics import _search

    search, redone = _search.superposition_search, []

    def counting_search(*args, **kwargs):
        redone.append(not kwargs["compiled"])
        return search(*args, **kwargs)

    monkeypatch.setattr(_search, "superposition_search", counting_search)
    ref = random_walk(2, 40, seed=7)
    model, mask = noisy(ref, 2.0, seed=8), full_mask(ref)
    for metric in (lambda **kw: gdt(model, ref, mask, **kw).fractions,
                   lambda **kw: tm_score(model, ref, mask, **kw)):
        eager = metric(solver="svd")
        redone.clear()
        assert torch.allclose(metric(solver="quaternion", compiled=True), eager, atol=1e-6)
        assert redone == ([] if newton_steps == 16 else [True])


def test_kabsch_recovers_a_known_rigid_motion():
    x = random_walk(4, 30, seed=3).double()
    y = random_rigid(x, seed=4)
    r, t = kabsch(x, y)
    assert torch.allclose(torch.linalg.det(r), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(x @ r.transpose(-1, -2) + t.unsqueeze(-2), y, atol=1e-8)
    assert torch.allclose(superimpose(x, y), y, atol=1e-8)


# --------------------------------------------------------------------------- mirror images


def test_mirror_image_is_not_superimposable_and_is_flagged(pair):
    _, ref, mask = pair
    mirrored = mirror(ref)
    r, _ = kabsch(mirrored, ref)
    assert torch.allclose(torch.linalg.det(r.double()), torch.ones(3, dtype=torch.float64))
    assert (rmsd(mirrored, ref, mask) > 5.0).all()
    assert (tm_score(mirrored, ref, mask) < 0.9).all()
    # lDDT compares distances only: it cannot see the mirror (hence the chirality check).
    assert torch.allclose(lddt(mirrored, ref, mask)[0], torch.ones(3))
    assert (chirality(mirrored, ref, mask) == 0).all()
    assert is_mirrored(mirrored, ref, mask).all()
    assert not is_mirrored(ref, ref, mask).any()


def test_chirality_maps_agreement_to_its_complement_under_mirroring():
    ref = random_walk(8, 200, seed=5)
    model = noisy(ref, 3.0, seed=6)
    mask = full_mask(ref)
    a = chirality(model, ref, mask)
    a_mirror = chirality(mirror(model), ref, mask)
    assert torch.allclose(a + a_mirror, torch.ones(8), atol=1e-6)
    assert (a > 0.5).all() and not is_mirrored(model, ref, mask).any()
    assert is_mirrored(mirror(model), ref, mask).all()


# --------------------------------------------------------------------------- masks


def test_masked_atoms_can_move_arbitrarily(pair):
    model, ref, _ = pair
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(ref.shape[:-1], generator=g) > 0.2
    mask[:, :5] = True
    before = score_batch(model, ref, mask)
    garbage = 1e3 * torch.randn(model.shape, generator=g)
    moved_model = torch.where(mask.unsqueeze(-1), model, garbage)
    moved_ref = torch.where(mask.unsqueeze(-1), ref, torch.full_like(ref, math.nan))
    after = score_batch(moved_model, moved_ref, mask)
    for key in before:
        assert torch.isfinite(after[key]).all(), key
        assert torch.allclose(before[key], after[key], atol=1e-5), key


def test_masked_out_residues_equal_their_removal():
    """A mask with holes scores like the structure with those residues deleted."""
    ref = random_walk(1, 50, seed=8)
    model = noisy(ref, 1.5, seed=9)
    keep = torch.ones(1, 50, dtype=torch.bool)
    keep[0, [3, 17, 18, 40]] = False
    holes = score_batch(model, ref, keep)
    removed = score_batch(model[keep][None], ref[keep][None], torch.ones(1, 46, dtype=torch.bool))
    # lDDT and chirality see chain neighbours across a deleted residue: compare the others.
    for key in ("rmsd", "gdt_ts", "tm_score"):
        assert torch.allclose(holes[key], removed[key], atol=1e-6), key


def test_missing_residues_count_against_the_model_with_n_ref():
    ref = random_walk(1, 40, seed=10)
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[0, 30:] = False  # the model lacks 10 of 40 residues; the rest is perfect
    assert torch.allclose(tm_score(ref, ref, mask, n_ref=40), torch.tensor([0.75]), atol=1e-6)
    assert torch.allclose(gdt_ts(ref, ref, mask, n_ref=40), torch.tensor([0.75]))
    with pytest.raises(ValueError, match="n_ref"):
        tm_score(ref, ref, mask, n_ref=20)


# --------------------------------------------------------------------------- batching


def test_batch_equals_one_by_one():
    lengths = [20, 37, 55]
    refs = [random_walk(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    models = [noisy(r, 2.5, seed=30 + i) for i, r in enumerate(refs)]
    n_max = max(lengths)
    ref_b = torch.zeros(3, n_max, 3)
    model_b = torch.full((3, n_max, 3), 7.0)
    mask_b = torch.zeros(3, n_max, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ref_b[i, :n], model_b[i, :n], mask_b[i, :n] = refs[i], models[i], True
    batched = score_batch(model_b, ref_b, mask_b)
    for i, n in enumerate(lengths):
        single = score_batch(models[i][None], refs[i][None], torch.ones(1, n, dtype=torch.bool))
        for key in batched:
            assert torch.allclose(batched[key][i], single[key][0], atol=1e-6), (key, n)


def test_small_chunks_give_the_same_search_result(pair):
    model, ref, mask = pair
    assert torch.equal(
        gdt(model, ref, mask).fractions, gdt(model, ref, mask, chunk_elements=5000).fractions
    )
    assert torch.allclose(
        tm_score(model, ref, mask), tm_score(model, ref, mask, chunk_elements=5000), atol=1e-7
    )


@pytest.mark.parametrize(
    ("seed", "shortcut", "off"), [(3, "dedupe", False), (4, "dedupe", False), (5, "seed_group", 1)]
)
def test_search_shortcuts_change_no_search_result(monkeypatch, seed, shortcut, off):
    """The search's two shortcuts, stopping a trajectory once another one has the same subset
    and cutoff (``dedupe``) and fitting a seed once for all of GDT's cutoffs (``seed_group``):
    the GDT fractions and TM-scores are exactly those of the search without the shortcut
    (masked residues included), and the search does fewer trajectory-fits (not a no-op)."""
    import importlib

    from pipeline.metrics import _search

    ref = random_walk(3, 120, seed=seed)
    model = noisy(ref, 3.0, seed=seed + 10)
    mask = full_mask(ref)
    mask[0, 90:] = False
    mask[2, ::5] = False
    search = _search.superposition_search
    fit = _search._fit_from_moments
    results, work = {}, {}
    for on in (False, True):
        widths = []

        def counting_fit(moments, widths=widths, **kwargs):
            widths.append(moments.shape[1])
            return fit(moments, **kwargs)

        def without_shortcut(*args, **kwargs):
            return search(*args, **{**kwargs, shortcut: off})

        monkeypatch.setattr(_search, "_fit_from_moments", counting_fit)
        for name in ("gdt", "tm_score"):
            module = importlib.import_module(f"pipeline.metrics.{name}")
            monkeypatch.setattr(
                module, "superposition_search", search if on else without_shortcut
            )
        results[on] = (gdt(model, ref, mask).fractions, tm_score(model, ref, mask))
        work[on] = sum(widths)
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])
    assert work[True] < 0.95 * work[False], work


@pytest.mark.parametrize("compiled", [False, True])
def test_shared_seed_fits_with_cutoff_relaxation(compiled):
    """``seed_group`` with TM-score's cutoff relaxation (which needs the shared distances of
    every trajectory): TM-score's trajectories, each repeated with a second, tighter first
    cutoff, give the same best scores shared (``seed_group=2``) as fitted one by one."""
    import importlib

    from pipeline.metrics import _search

    tm_module = importlib.import_module("pipeline.metrics.tm_score")

    ref = random_walk(2, 70, seed=8)
    model = noisy(ref, 4.0, seed=9)
    mask = full_mask(ref)
    mask[1, 50:] = False
    x, y, valid, n_valid = _search.compact(model, ref, mask)
    start, width, ok = _search.window_seeds(
        n_valid.tolist(), tm_module.tm_fragment_lengths, None, x.device
    )
    d0 = tm_module.rna_d0(n_valid.double()).clamp(4.5, 8.0)
    pairs = lambda a: a.repeat_interleave(2, dim=1)  # noqa: E731
    n_traj = 2 * start.shape[1]
    cut_first = (d0.unsqueeze(1) - torch.tensor([1.0, 3.0], dtype=torch.float64)).repeat(
        1, n_traj // 2
    )
    cut_iter = (d0 + 1.0).unsqueeze(1).expand(-1, n_traj)
    args = (
        x, y, valid, pairs(start), pairs(width), pairs(ok), cut_first, cut_iter,
        tm_module._tm_sums, (1.0 / (d0 * d0)[:, None, None], 1.0 / n_valid.double()[:, None]),
    )
    kwargs = dict(n_fits=8, relax=True, stop_below_three=False, compiled=compiled)
    shared = _search.superposition_search(*args, **kwargs, seed_group=2)
    separate = _search.superposition_search(*args, **kwargs, seed_group=1)
    assert torch.allclose(shared, separate, atol=1e-12, rtol=0)
    assert (shared[:, 0] > 0.2).all() and (shared[:, 0] < 1).all()


def test_compiled_metric_set_equals_the_eager_one():
    """``compiled=True`` (fused kernels generated by torch.compile, C++ on the CPU) gives the
    eager results: masked residues, two batch shapes (the kernels are reused with dynamic
    shapes), small chunks (trajectory counts that change between fits)."""
    ref = random_walk(4, 60, seed=21)  # batch sizes of 4 and 2, not 3: a dimension equal to
    model = noisy(ref, 2.0, seed=22)  # the coordinates' 3 is specialised on (duck sizing)
    mask = full_mask(ref)
    mask[0, 45:] = False
    mask[1, ::7] = False
    model[1, ::7] = float("nan")  # masked-out points may hold anything
    budget = {"gdt_max_seeds": 48, "tm_max_seeds": 24}
    smaller = (model[1:3, :41], ref[1:3, :41], mask[1:3, :41], 3000)
    for x, y, m, chunk in ((model, ref, mask, None), smaller):
        eager = score_batch(x, y, m, chunk_elements=chunk, **budget)
        fused_ = score_batch(x, y, m, chunk_elements=chunk, compiled=True, **budget)
        for key, value in eager.items():
            assert torch.allclose(fused_[key], value, atol=1e-6, rtol=0), key
    assert (eager["rmsd"] > 0.5).all() and (eager["gdt_ts"] < 1).all()  # not a trivial case


def test_compiled_bookkeeping_changes_no_search_result(monkeypatch):
    """``COMPILED_BOOKKEEPING`` (the stop rules, repeats and host-read counts of each refit in
    generated kernels) gives the compiled searches' GDT fractions and TM-scores bit for bit:
    masked residues, small chunks (compaction); the generated bookkeeping is really what
    runs."""
    from pipeline.metrics import _search

    ref = random_walk(3, 80, seed=41)
    model = noisy(ref, 5.0, seed=42)
    mask = full_mask(ref)
    mask[0, 60:] = False
    mask[2, ::6] = False

    def results():
        out = []
        for chunk in (None, 4000):
            out.append(gdt(model, ref, mask, max_seeds=64, compiled=True,
                           chunk_elements=chunk).fractions)
            out.append(tm_score(model, ref, mask, compiled=True, chunk_elements=chunk))
        return out

    before = results()
    calls = []
    fused = _search.fused

    def recording(fn):
        calls.append(fn.__name__)
        return fused(fn)

    monkeypatch.setattr(_search, "fused", recording)
    monkeypatch.setattr(_search, "COMPILED_BOOKKEEPING", True)
    after = results()
    assert {"_bookkeeping", "_drop_repeats"} <= set(calls)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_graph_rows_ladder():
    """Compaction under ``GRAPHED_REFITS`` keeps rows from a short ladder: enough for every
    count, less than half more than needed, and few distinct sizes below a chunk."""
    from pipeline.metrics._search import graph_rows

    sizes = [graph_rows(n) for n in range(1, 2049)]
    assert all(s >= max(n, 3) for n, s in enumerate(sizes, start=1))
    assert all(2 * s < 3 * n for n, s in enumerate(sizes, start=1) if n > 3)
    assert sorted(set(sizes))[:8] == [3, 4, 6, 8, 12, 16, 24, 32]
    assert len(set(sizes)) == 20 and graph_rows(2048) == 2048


def graph_like_backend(calls: list, shapes: set):
    """A ``torch.compile`` backend that treats its outputs as CUDA graphs' memory: they are
    returned in tensors held by the backend and spoiled when the next call starts (as the
    graphs' shared memory pool may reuse them then), so a caller that keeps an output past
    that, or passes one back in without a copy, computes with garbage. It records its
    compilations (as ``None`` in ``calls``), its calls and the shapes of the first input (the
    subsets)."""
    held: dict = {}

    def spoil(t: torch.Tensor) -> None:
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.fill_(-7)

    def backend(gm, example_inputs):
        calls.append(None)

        def run(*args):
            for buffers in held.values():
                for buffer in buffers:
                    spoil(buffer)
            outs = gm(*args)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            shapes.add(tuple(tensors[0].shape))
            calls.append(1)
            key = tuple((tuple(o.shape), o.dtype) for o in outs)
            buffers = held.setdefault(key, [torch.empty_like(o) for o in outs])
            for buffer, out in zip(buffers, outs, strict=True):
                buffer.copy_(out)
            return type(outs)(buffers) if isinstance(outs, tuple) else list(buffers)

        return run

    return backend


def test_graphed_refits_change_no_search_result(monkeypatch):
    """``GRAPHED_REFITS``: every refit after the seed fit as one traced function with no host
    sync (``fullgraph``: a sync would be a tracing error), run through a backend whose outputs
    are overwritten at every call like a CUDA graph's. GDT fractions and TM-scores equal those
    of the search without it (quaternion fits, masked residues, compaction to the ladder's
    sizes, TM-score's cutoff relaxation in a graphed refit), and the traced refit really
    runs. On the GPU the same function runs as CUDA graphs (docs/benchmarks.md)."""
    from pipeline.metrics import _fused, _search
    from pipeline.metrics.superpose import _cofactor_tables, _fused_quaternion_fit

    # The pieces of the seed fit and of the ungraphed search run eagerly: this test is about
    # the graphed loop, not about generated kernels (tested above).
    monkeypatch.setattr(_search, "fused", lambda fn: fn)
    monkeypatch.setattr(_search, "quaternion_fit_unchecked",
                        lambda m: _fused_quaternion_fit(m, *_cofactor_tables(m)))
    ref = random_walk(3, 90, seed=51)
    model = noisy(ref, 4.0, seed=52)
    mask = full_mask(ref)
    mask[0, 70:] = False
    mask[2, ::6] = False
    tm_module = importlib.import_module("pipeline.metrics.tm_score")
    x, y, valid, n_valid = _search.compact(model, ref, mask)
    start, width, ok = _search.window_seeds(
        n_valid.tolist(), tm_module.tm_fragment_lengths, None, x.device
    )
    d0 = tm_module.rna_d0(n_valid.double()).clamp(4.5, 8.0)
    n_traj = start.shape[1]
    relaxing = (  # a tight refit cutoff: refits keep fewer than 3 residues and relax it
        x, y, valid, start, width, ok, (d0 + 1.0).unsqueeze(1).expand(-1, n_traj),
        torch.full_like(d0, 0.4).unsqueeze(1).expand(-1, n_traj), tm_module._tm_sums,
        (1.0 / (d0 * d0)[:, None, None], 1.0 / n_valid.double()[:, None]),
    )
    relaxed_at = []  # rows relaxed at each relaxation
    relax = _search._relax_where_needed

    def counting_relax(need, *args):
        relaxed_at.append(int(need.sum()))
        return relax(need, *args)

    monkeypatch.setattr(_search, "_relax_where_needed", counting_relax)

    def results():
        out = []
        for chunk in (None, 3000):
            kwargs = dict(compiled=True, solver="quaternion", chunk_elements=chunk)
            out.append(gdt(model, ref, mask, max_seeds=64, **kwargs).fractions)
            out.append(tm_score(model, ref, mask, **kwargs))
            out.append(_search.superposition_search(
                *relaxing, n_fits=6, relax=True, stop_below_three=False, **kwargs))
        return out

    before = results()
    relaxed_before = len(relaxed_at)
    calls, shapes = [], set()
    monkeypatch.setattr(_fused, "GRAPH_BACKEND", graph_like_backend(calls, shapes))
    monkeypatch.setattr(_search, "GRAPHED_REFITS", True)
    after = results()
    # The same relaxations, row for row; with the tight refit cutoff most follow refits
    # after the seed fit (k = 1..4 of the relaxing search), which the graphed function flagged.
    assert relaxed_before > 0 and relaxed_at[relaxed_before:] == relaxed_at[:relaxed_before]
    # Chunks start at their own size; compaction then keeps the ladder's sizes.
    ladder = {_search.graph_rows(n) for n in range(1, 4096)}
    assert calls and len({rows for _, rows, _ in shapes} & ladder) > 3
    assert calls.count(None) == 2  # one compilation per score function (GDT, TM-score)
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)
    assert (before[1] > 0.1).all() and (before[1] < 1).all()


def test_lddt_row_blocks_do_not_change_the_result(pair, monkeypatch):
    model, ref, mask = pair
    residue = torch.arange(60).div(3, rounding_mode="floor").expand(3, 60)
    whole = lddt(model, ref, mask, residue_index=residue)
    monkeypatch.setattr(importlib.import_module("pipeline.metrics.lddt"), "_BLOCK_ELEMENTS", 100)
    blocks = lddt(model, ref, mask, residue_index=residue)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])


# --------------------------------------------------------------------------- biotite


def _atom_array(coords: np.ndarray, chain, res_id, res_name, atom_name) -> struc.AtomArray:
    atoms = struc.AtomArray(len(coords))
    atoms.coord = coords.astype(np.float32)
    atoms.chain_id = np.asarray(chain)
    atoms.res_id = np.asarray(res_id)
    atoms.res_name = np.asarray(res_name)
    atoms.atom_name = np.asarray(atom_name)
    atoms.element = np.full(len(coords), "C")
    return atoms


@pytest.fixture(params=["cdist", "broadcast", "compiled"])
def distance_path(request, monkeypatch):
    """lDDT's ways to its pair sums, all run here on the CPU: blocks of distances from cdist
    (the CPU's eager path) or from broadcast differences (CUDA's), and the fused kernel that
    ``compiled=True`` selects (generated by torch.compile; C++ on the CPU)."""
    module = sys.modules["pipeline.metrics.lddt"]
    if request.param == "broadcast":
        monkeypatch.setattr(module, "_distances", module._broadcast_distances)
    if request.param == "compiled":
        kernel = fused(lddt_pair_sums)
        monkeypatch.setattr(
            module,
            "_blocked_pair_sums",
            lambda mod, ref, residue_index, radius, thresholds, symmetric: kernel(
                mod, ref, residue_index, float(radius), tuple(thresholds), symmetric
            ),
        )
    return request.param


@pytest.mark.parametrize("seed", [0, 1])
def test_lddt_matches_biotite_on_random_all_atom_input(seed, distance_path):
    rng = np.random.default_rng(seed)
    n_res, per_res = 40, 5
    # Residues along a walk, atoms scattered around each residue centre.
    centres = np.cumsum(rng.normal(size=(n_res, 3)) * 3.5, axis=0)
    ref = np.repeat(centres, per_res, axis=0) + rng.normal(size=(n_res * per_res, 3)) * 2.0
    model = ref + rng.normal(size=ref.shape) * 1.2
    chain = np.repeat(np.where(np.arange(n_res) < 25, "A", "B"), per_res)
    res_id = np.repeat(np.arange(n_res) % 25 + 1, per_res)
    res_name = np.repeat(rng.choice(["A", "C", "G", "U"], n_res), per_res)
    atom_name = np.tile(["P", "C4'", "C3'", "C1'", "N1"], n_res)
    atoms = _atom_array(ref, chain, res_id, res_name, atom_name)
    residue = torch.from_numpy(np.repeat(np.arange(n_res), per_res))[None]
    x = torch.from_numpy(model).float()[None]
    y = torch.from_numpy(ref).float()[None]
    m = torch.ones(1, len(ref), dtype=torch.bool)

    glob, per_atom = lddt(x, y, m, residue_index=residue)
    assert glob.item() == pytest.approx(struc.lddt(atoms, model), abs=1e-5)
    expected_atom = struc.lddt(atoms, model, aggregation="atom")
    assert np.allclose(per_atom[0].numpy(), expected_atom, atol=1e-5)
    per_res, defined = lddt_per_residue(x, y, m, residue)
    expected_res = struc.lddt(atoms, model, aggregation="residue")
    assert defined.all()
    assert np.allclose(per_res[0].numpy(), expected_res, atol=1e-5)

    # Atoms missing from the model: biotite takes NaN coordinates, we take a model mask.
    missing = rng.random(len(ref)) < 0.1
    model_nan = model.copy()
    model_nan[missing] = np.nan
    present = torch.from_numpy(~missing)[None]
    glob_missing, _ = lddt(x, y, m, model_mask=present, residue_index=residue)
    assert glob_missing.item() == pytest.approx(struc.lddt(atoms, model_nan), abs=1e-5)

    # Symmetric variant: contacts from both structures.
    subject = _atom_array(model, chain, res_id, res_name, atom_name)
    glob_sym, _ = lddt(x, y, m, residue_index=residue, symmetric=True)
    assert glob_sym.item() == pytest.approx(struc.lddt(atoms, subject, symmetric=True), abs=1e-5)


def test_lddt_one_atom_per_residue_matches_biotite_in_a_batch(distance_path):
    ref = random_walk(4, 80, seed=11)
    model = noisy(ref, 1.0, seed=12)
    mask = full_mask(ref)
    ours, per_atom = lddt(model, ref, mask)
    for b in range(4):
        atoms = _atom_array(ref[b].numpy(), ["A"] * 80, np.arange(1, 81), ["G"] * 80, ["C3'"] * 80)
        assert ours[b].item() == pytest.approx(struc.lddt(atoms, model[b].numpy()), abs=1e-5)
        expected = struc.lddt(atoms, model[b].numpy(), aggregation="residue")
        assert np.allclose(per_atom[b].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rmsd_matches_biotite_superimpose(seed, compiled):
    ref = random_walk(2, 70, seed=40 + seed) + 30.0
    model = random_rigid(noisy(ref, 3.0, seed=50 + seed), seed)
    ours = rmsd(model, ref, full_mask(ref), compiled=compiled)
    for b in range(2):
        fixed = _atom_array(ref[b].numpy(), ["A"] * 70, np.arange(70), ["G"] * 70, ["C3'"] * 70)
        mobile = fixed.copy()
        mobile.coord = model[b].numpy()
        fitted, _ = struc.superimpose(fixed, mobile)
        assert ours[b].item() == pytest.approx(struc.rmsd(fixed, fitted), abs=1e-4)
    no_fit = rmsd(model, ref, full_mask(ref), superpose=False)
    expected = np.sqrt(((model - ref) ** 2).sum(-1).mean(-1).numpy())
    assert np.allclose(no_fit.numpy(), expected, rtol=1e-5)


def test_rmsd_keeps_its_precision_far_from_the_origin_and_with_garbage_in_masked_points():
    """rmsd sums raw moments (after an origin shift): a structure 5000 A from the origin, or
    one whose masked-out points hold NaN and huge values, gives the RMSD of the plain case."""
    ref = random_walk(3, 60, seed=7).double()
    model = random_rigid(noisy(ref, 1.0, seed=8).double(), 2)
    mask = torch.rand(3, 60, generator=torch.Generator().manual_seed(3)) > 0.2
    expected = rmsd(model, ref, mask)
    shift = torch.tensor([5000.0, -3000.0, 4000.0], dtype=torch.float64)
    assert torch.allclose(rmsd(model + shift, ref - shift, mask), expected, atol=1e-7)
    garbage_model, garbage_ref = model.clone(), ref.clone()
    garbage_model[~mask] = float("nan")
    garbage_ref[~mask] = 1e8
    assert torch.allclose(rmsd(garbage_model, garbage_ref, mask), expected, atol=1e-9)
    same = rmsd(ref + shift, ref + shift, mask)  # identical: 0, not the noise of a cancellation
    assert (same < 1e-5).all()


# --------------------------------------------------------------------------- TM-score, GDT


def test_rna_d0_follows_the_published_scale():
    # Gong et al. 2019 / US-align: fixed values below 30 nt, 0.6 sqrt(L - 0.5) - 2.5 above.
    assert [rna_d0(n) for n in (5, 11, 12, 15, 16, 19, 20, 23, 24, 29)] == [
        0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6, 0.7, 0.7,
    ]
    for n in (30, 46, 100, 500):
        assert rna_d0(n) == pytest.approx(0.6 * math.sqrt(n - 0.5) - 2.5)
    lengths = torch.tensor([5, 11, 12, 20, 29, 30, 46, 500])
    assert torch.allclose(
        rna_d0(lengths), torch.tensor([rna_d0(int(n)) for n in lengths], dtype=torch.float64)
    )
    assert tm_fragment_lengths(46) == [46, 23, 11, 5, 4]


def test_search_beats_a_single_global_fit():
    """Every count of the search is at least that of the one fit on all residues."""
    ref = random_walk(3, 80, seed=60)
    model = ref.clone()
    model[:, 40:] = noisy(model[:, 40:] + torch.tensor([6.0, 0.0, 0.0]), 0.5, seed=61)
    mask = full_mask(ref)
    fitted = superimpose(model.double(), ref.double())
    d = (fitted - ref.double()).norm(dim=-1)
    one_fit = torch.stack([(d < c).double().mean(-1) for c in (1, 2, 4, 8)], -1)
    result = gdt(model, ref, mask)
    assert (result.fractions.double() >= one_fit - 1e-6).all()
    # Half the chain is exact, the other half shifted by 6 A: the search finds the exact half.
    assert (result.fractions[:, 0] >= 0.5).all()
    assert (result.fractions[:, 0] > one_fit[:, 0] + 0.1).all()
    # A smaller search budget can only lose.
    cheap = gdt(model, ref, mask, max_seeds=8, max_iter=3)
    assert (cheap.fractions <= result.fractions + 1e-6).all()
    assert result.cutoffs == (1.0, 2.0, 4.0, 8.0)
    assert gdt(model, ref, mask, cutoffs=GDT_HA_CUTOFFS).cutoffs == GDT_HA_CUTOFFS


def test_invalid_arguments_are_rejected(pair):
    model, ref, mask = pair
    with pytest.raises(ValueError, match="max_seeds"):
        gdt(model, ref, mask, max_seeds=0)
    with pytest.raises(ValueError, match="cutoffs"):
        gdt(model, ref, mask, cutoffs=())
    with pytest.raises(ValueError, match="solver"):
        tm_score(model, ref, mask, solver="lapack")
    with pytest.raises(ValueError, match="shape"):
        rmsd(model[:, :10], ref, mask)
    with pytest.raises(ValueError, match="mask"):
        tm_score(model, ref, mask[:, :10])
    with pytest.raises(ValueError, match="radius"):
        lddt(model, ref, mask, radius=1e5)  # absent atoms are moved 1e6 A away
    with pytest.raises(ValueError, match="solver"):
        kabsch(model, ref, mask, solver="lu")


# --------------------------------------------------------------------------- batch helpers


def test_score_predictions_uses_the_representative_atom():
    ref = random_walk(2, 30, seed=70)
    n_atoms = len(ATOM_NAMES)
    coords = ref.unsqueeze(2).repeat(1, 1, n_atoms, 1) + torch.randn(2, 30, n_atoms, 3)
    coords[:, :, REPRESENTATIVE_ATOM] = ref
    atom_mask = torch.ones(2, 30, n_atoms, dtype=torch.bool)
    residue_mask = torch.ones(2, 30, dtype=torch.bool)
    residue_mask[1, 25:] = False
    batch = {"coords": coords, "atom_mask": atom_mask, "residue_mask": residue_mask}
    pred = coords.clone()
    pred[:, :, REPRESENTATIVE_ATOM] = noisy(ref, 1.0, seed=71)
    scores = score_predictions(pred, batch)
    expected = score_batch(pred[:, :, REPRESENTATIVE_ATOM], ref, residue_mask)
    for key in expected:
        assert torch.equal(scores[key], expected[key]), key
