"""Batched search over rigid superpositions seeded by contiguous fragments.

Shared engine of :func:`pipeline.metrics.tm_score` (US-align's ``TMscore8_search``) and
:func:`pipeline.metrics.gdt` (an LGA-like GDT search). Both follow one pattern: fit a
superposition on a seed (a window of consecutive residues), keep the residues that lie within
a cutoff, refit on them, repeat until the kept set stops changing, and score every
superposition visited. Done one seed at a time this is thousands of tiny 3x3 problems; here all
*trajectories* (seed x cutoff) of all structures advance together:

- the Kabsch moments of every current subset come from one batched matrix product
  ``subset_mask (B, T, N) @ [1, x, y, x y^T, |x|^2, |y|^2] (B, N, 18)``;
- one batched float64 solve of the (B, T) 3x3 problems gives all rotations (SVD on CPU,
  Horn's quaternion method on CUDA: see :mod:`pipeline.metrics.superpose`);
- squared distances under every superposition come from a second product
  ``(B, T, 15) @ (B, 15, N)`` (``|R x + t - y|^2`` expanded), so no (B, T, N, 3) tensor exists.

Coordinates are centred per structure and kept in float64, so the expansion loses nothing
that matters (|x|^2 ~ 1e4 A^2, float64 relative error 1e-16). Trajectories are processed in
chunks of at most ``chunk_elements`` (B x T x N) entries to bound memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.metrics._fused import (
    expansion_coefficients,
    fused,
    graphed,
    score_fits,
    squared_distances,
)
from pipeline.metrics.superpose import (
    _cofactor_tables,
    _fit_from_moments,
    _fused_quaternion_fit,
    quaternion_fit_unchecked,
)

#: Default bound on B x T x N entries per chunk (about 40 bytes each at the peak: float64
#: distances and their temporaries, boolean subsets): ``None`` picks 2**26 on CUDA (about
#: 3 GB; fewer, larger chunks mean fewer kernel launches) and 2**22 on CPU.
DEFAULT_CHUNK_ELEMENTS: int | None = None
#: Finished trajectories are dropped from a chunk once the active ones are at most this share of
#: it (rows of the largest active count of the batch): a gather of the boolean subsets, cheap
#: next to the refit it saves (64 x 500 nt of the metrics benchmark, trajectory-fits against
#: compacting at half: exhaustive TM-score 15,282 -> 13,138, GDT-TS with 512 seeds 18,757 ->
#: 15,031).
COMPACT_BELOW = 0.9
#: Compiled searches also compile their per-refit bookkeeping (:func:`_drop_repeats`,
#: :func:`_bookkeeping`): a few generated kernels instead of about forty eager launches per
#: refit, since on CUDA the compiled searches are bound by the host's launches. Off until its
#: speed is measured on the GPU (docs/benchmarks.md, "Compiling the bookkeeping"); the
#: results are the same either way (tests).
COMPILED_BOOKKEEPING = False
#: Compiled quaternion searches run every refit after the seed fit as one function compiled
#: with CUDA graphs (:func:`_refit`, :func:`pipeline.metrics._fused.graphed`): one graph
#: replay per refit instead of some sixty launches and three compiled calls, since on CUDA the
#: compiled searches are bound by the host (docs/benchmarks.md). Compaction then keeps
#: :func:`graph_rows` rows, so that few distinct shapes (graphs) recur. Off until measured
#: on the GPU (docs/benchmarks.md, "CUDA graphs for the refits").
GRAPHED_REFITS = False


def resolve_chunk_elements(chunk_elements: int | None, device: torch.device) -> int:
    """The chunk bound to use on ``device`` (see :data:`DEFAULT_CHUNK_ELEMENTS`)."""
    if chunk_elements is None:
        return 1 << 26 if device.type == "cuda" else 1 << 22
    if chunk_elements < 1:
        raise ValueError(
            f"chunk_elements must be at least 1, but got chunk_elements={chunk_elements}."
        )
    return int(chunk_elements)


def compact(
    model: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move valid residues to the front (order kept), centre each structure, float64.

    Returns ``x, y`` (B, N, 3) float64 (0 at invalid slots), ``valid`` (B, N) bool and
    ``n_valid`` (B,) int64. Seeds are windows of consecutive *valid* residues.
    """
    if model.shape != reference.shape or model.dim() != 3 or model.shape[-1] != 3:
        raise ValueError(
            "model and reference must have the same shape (B, N, 3), but got "
            f"{tuple(model.shape)} and {tuple(reference.shape)}."
        )
    if mask.shape != model.shape[:-1]:
        raise ValueError(
            f"mask must have shape {tuple(model.shape[:-1])}, but got {tuple(mask.shape)}."
        )
    mask = mask.to(device=model.device).bool()
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    idx = order.unsqueeze(-1).expand(-1, -1, 3)
    valid = torch.gather(mask, 1, order)
    x = torch.where(valid.unsqueeze(-1), torch.gather(model.double(), 1, idx), 0.0)
    y = torch.where(valid.unsqueeze(-1), torch.gather(reference.double(), 1, idx), 0.0)
    n_valid = valid.sum(-1)
    w = valid.unsqueeze(-1).double()
    denom = n_valid.clamp_min(1).double()[:, None, None]
    x = (x - (x * w).sum(1, keepdim=True) / denom) * w
    y = (y - (y * w).sum(1, keepdim=True) / denom) * w
    return x, y, valid, n_valid


def window_seeds(
    n_valid: Sequence[int],
    widths: Callable[[int], Sequence[int]],
    max_seeds: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed windows ``(start, width)`` per structure, padded to (B, S), and their validity.

    ``widths(n)`` lists the window widths for a structure of ``n`` valid residues; every start
    ``0 .. n - width`` is used unless the total exceeds ``max_seeds``, in which case the starts
    of every width are thinned to one every ``ceil(total / max_seeds)``, always keeping the last
    start (as US-align does with ``simplify_step``).
    """
    per_structure: list[tuple[np.ndarray, np.ndarray]] = []
    for n in n_valid:
        ws = [int(w) for w in widths(int(n)) if 1 <= int(w) <= n]
        total = sum(n - w + 1 for w in ws)
        step = 1
        if max_seeds is not None and total > max_seeds:
            step = math.ceil(total / max_seeds)
        starts, wid = [], []
        for w in ws:
            s = np.arange(0, n - w + 1, step, dtype=np.int64)
            if s[-1] != n - w:
                s = np.append(s, n - w)
            starts.append(s)
            wid.append(np.full(len(s), w, dtype=np.int64))
        if starts:
            per_structure.append((np.concatenate(starts), np.concatenate(wid)))
        else:
            per_structure.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
    n_seeds = max([len(s) for s, _ in per_structure] + [1])
    start = np.zeros((len(per_structure), n_seeds), dtype=np.int64)
    width = np.zeros_like(start)
    ok = np.zeros(start.shape, dtype=bool)
    for b, (s, w) in enumerate(per_structure):
        start[b, : len(s)] = s
        width[b, : len(w)] = w
        ok[b, : len(s)] = True
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return as_tensor(start), as_tensor(width), as_tensor(ok)


def resolve_solver(solver: str, device: torch.device) -> str:
    """``"auto"``: the quaternion solver on CUDA (no batched SVD), the SVD on CPU (LAPACK)."""
    if solver == "auto":
        return "quaternion" if device.type == "cuda" else "svd"
    if solver not in ("svd", "quaternion"):
        raise ValueError(
            f"solver must be 'auto', 'svd' or 'quaternion', but got solver={solver!r}."
        )
    return solver


def _relaxed_cutoff(d2: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """US-align ``score_fun8`` relaxation: raise the cutoff by 0.5 A steps until 3 are kept.

    ``d2`` (R, N) squared distances of the superpositions to relax (infinite at invalid
    residues), ``cut`` (R,) their cutoffs in A; returns the relaxed cutoffs.
    """
    d3 = d2.topk(3, dim=-1, largest=False).values[..., 2]
    d3_len = d3.clamp_min(0).sqrt()
    inc = torch.floor((d3_len - cut) / 0.5) + 1
    inc = inc.clamp_min(1)
    # Exact fix-up against the squared comparison US-align makes (d^2 < (cut + 0.5 inc)^2).
    inc = inc + (d3 >= (cut + 0.5 * inc) ** 2).to(inc.dtype)
    lower = (inc > 1) & (d3 < (cut + 0.5 * (inc - 1)) ** 2)
    inc = inc - lower.to(inc.dtype)
    return cut + 0.5 * inc


def _relax_where_needed(
    need: torch.Tensor,
    new: torch.Tensor,
    cut: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    features_t: torch.Tensor,
    base: torch.Tensor,
    valid: torch.Tensor,
    group: int,
) -> torch.Tensor:
    """``new`` (B, T, N) with the kept residues of the ``need`` (B, T) trajectories re-selected
    under their relaxed cutoffs (:func:`_relaxed_cutoff`). Their distances are formed again
    from the fits ``r``, ``t`` (whose rows are shared by ``group`` consecutive trajectories)
    and the search's ``features_t``, for those rows only: no (B, T, N) distances are kept for
    this rare case."""
    b_idx, t_idx = need.nonzero(as_tuple=True)
    r_rows, t_rows = r[b_idx, t_idx // group], t[b_idx, t_idx // group]
    products = torch.bmm(expansion_coefficients(r_rows, t_rows).unsqueeze(1), features_t[b_idx])
    d2 = squared_distances(products, t_rows.unsqueeze(1), base[b_idx], valid[b_idx]).squeeze(1)
    relaxed = _relaxed_cutoff(d2, cut[b_idx, t_idx])
    new = new.clone()
    new[b_idx, t_idx] = d2 < (relaxed * relaxed).unsqueeze(-1)
    return new


def _advance(
    active: torch.Tensor,
    subset: torch.Tensor,
    new: torch.Tensor,
    count: torch.Tensor,
    check_repeat: bool,
    stop_below_three: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trajectories still active after a fit and their next subsets: a trajectory stops
    when fewer than 3 residues pass (if ``stop_below_three``; it keeps its subset) or, if
    ``check_repeat`` (every fit but the seed fit), when the kept residues ``new`` are the
    ``subset`` it was fitted on."""
    if stop_below_three:
        small = count < 3
        active = active & ~small
        new = torch.where(small.unsqueeze(-1), subset, new)
    if check_repeat:
        active = active & ~(new == subset).all(-1)
    return active, torch.where(active.unsqueeze(-1), new, subset)


def _repeats(
    moments: torch.Tensor, cut: torch.Tensor, active: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(B, T) bool: active trajectories that repeat another active one of the same structure.

    Two trajectories repeat each other when their subsets' moments (B, T, 18) and their
    cutoffs (B, T) are equal: the next fit depends on the subset only through its moments, so
    from there on they fit, keep and score the same. Rows are sorted by a random linear key of
    moments and cutoff, and a row equal in all 19 values to its predecessor is a repeat (the
    first of each group stays). Equal rows have equal keys; unequal rows that share a key
    (probability ~0 in float64) are not merged, since all values are compared.
    """
    rows = torch.cat([moments, cut.unsqueeze(-1).to(moments.dtype)], -1)  # (B, T, 19)
    key = torch.where(active, rows @ weights, math.inf)
    order = key.argsort(dim=1)
    sorted_rows = torch.gather(rows, 1, order.unsqueeze(-1).expand_as(rows))
    sorted_active = torch.gather(active, 1, order)
    same = (sorted_rows[:, 1:] == sorted_rows[:, :-1]).all(-1)
    same = same & sorted_active[:, 1:] & sorted_active[:, :-1]
    repeat_sorted = torch.cat([torch.zeros_like(same[:, :1]), same], 1)
    return torch.zeros_like(active).scatter(1, order, repeat_sorted)


def _drop_repeats(
    moments: torch.Tensor, cut: torch.Tensor, active: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``active`` without the trajectories that repeat another (:func:`_repeats`)."""
    return active & ~_repeats(moments, cut, active, weights)


def _best_fitted(scores: torch.Tensor, fitted_ok: torch.Tensor) -> torch.Tensor:
    """(B, K) best of the scores (B, T, K) of the trajectories that exist (``fitted_ok``)."""
    return torch.where(fitted_ok.unsqueeze(-1), scores, -math.inf).amax(1)


def _bookkeeping(
    scores: torch.Tensor,
    fitted_ok: torch.Tensor,
    active: torch.Tensor,
    subset: torch.Tensor,
    new: torch.Tensor,
    count: torch.Tensor,
    n_valid: torch.Tensor,
    check_repeat: bool,
    stop_below_three: bool,
    relax: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a refit of :func:`superposition_search` leaves behind: the best score of each
    structure over the fitted trajectories (B, K), the trajectories whose cutoff needs relaxing
    (B, T, or ``None`` without ``relax``), the next ``active`` and ``subset``
    (:func:`_advance`) and, as one (2,) tensor for one host read, the largest active count of
    a structure and whether any cutoff needs relaxing."""
    scores = _best_fitted(scores, fitted_ok)
    need = None
    if relax:
        need = (count < 3) & (n_valid > 3).unsqueeze(-1) & active
    next_active, next_subset = _advance(active, subset, new, count, check_repeat,
                                        stop_below_three)
    flags = torch.stack([
        next_active.sum(-1).max(),
        need.any().long() if need is not None else torch.zeros_like(n_valid[0]),
    ])
    return scores, need, next_active, next_subset, flags


def graph_rows(n: int) -> int:
    """Rows a chunk keeps when it drops finished trajectories under :data:`GRAPHED_REFITS`:
    the smallest of 3, 4, 6, 8, 12, ... (powers of two and 1.5 times them) that holds ``n``.
    Every distinct shape is one more CUDA graph to record (and to hold in memory); with this
    ladder a chunk of 2,048 rows passes through at most 20 shapes, the same ones at every
    call, for less than half as many rows again as needed (the extra rows are finished
    trajectories, whose refit repeats a superposition already scored). It starts at 3: two
    rows would make the repeat check's shifted rows a single one, a shape that torch.compile
    specialises on (one more compilation)."""
    size = 3
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def _refit(
    subset: torch.Tensor,
    active: torch.Tensor,
    ok: torch.Tensor,
    cut: torch.Tensor,
    best: torch.Tensor,
    converged: torch.Tensor,
    moments: torch.Tensor,
    features_t: torch.Tensor,
    base: torch.Tensor,
    valid: torch.Tensor,
    n_valid: torch.Tensor,
    key_weights: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    score_fn: Callable[..., torch.Tensor],
    score_args: tuple,
    dedupe: bool,
    stop_below_three: bool,
    relax: bool,
) -> tuple[torch.Tensor, ...]:
    """One refit of :func:`superposition_search` after the seed fit, with quaternion fits and
    no host sync, written for :func:`pipeline.metrics._fused.graphed` (the state it reads and
    the constants of the search are named as there). Returns the new ``best`` and
    ``converged``, the (2,) flags the host reads (:func:`_bookkeeping`), the next ``active``
    and ``subset``, and what the rare cutoff relaxation needs: the trajectories that need it
    (all False without ``relax``), the ``active`` set after the repeat check, the kept
    residues ``new`` and the fits ``r``, ``t``."""
    m = torch.bmm(subset.double(), moments)
    if dedupe:
        active = _drop_repeats(m, cut, active, key_weights)
    r, t, _, fit_converged = _fused_quaternion_fit(m, *tables)
    products = torch.bmm(expansion_coefficients(r, t), features_t)
    scores, new, count = score_fits(products, t, base, valid, cut, score_fn, score_args)
    scores, need, next_active, next_subset, flags = _bookkeeping(
        scores, ok, active, subset, new, count, n_valid, True, stop_below_three, relax
    )
    if need is None:
        need = torch.zeros_like(active)
    return (torch.maximum(best, scores), converged & fit_converged.all(), flags, next_active,
            next_subset, need, active, new, r, t)


def superposition_search(
    x: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    start: torch.Tensor,
    width: torch.Tensor,
    traj_ok: torch.Tensor,
    cut_first: torch.Tensor,
    cut_iter: torch.Tensor,
    score_fn: Callable[..., torch.Tensor],
    score_args: tuple = (),
    *,
    n_fits: int,
    relax: bool,
    stop_below_three: bool,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    solver: str = "auto",
    compiled: bool = False,
    dedupe: bool = True,
    seed_group: int = 1,
) -> torch.Tensor:
    """Run all trajectories and return the best score of every structure, (B, K).

    Parameters
    ----------
    x, y, valid
        From :func:`compact`: centred float64 model / reference (B, N, 3) and validity (B, N).
    start, width, traj_ok
        (B, T) seed window of each trajectory (in compacted residue positions) and whether it
        exists for that structure.
    cut_first, cut_iter
        (B, T) cutoffs in A that select the residues kept after the seed fit and after every
        refit.
    score_fn, score_args
        ``score_fn(d2 (B, t, N), *score_args) -> (B, t, K)`` scores of the superpositions
        (higher is better); ``d2`` are squared distances in A^2, ``inf`` at invalid residues.
        A module-level function, so that a compiled step is reused across calls.
    n_fits
        Superpositions per trajectory at most (the seed fit included).
    relax
        Where fewer than 3 residues pass a cutoff (and more than 3 are valid), relax it by
        0.5 A steps (US-align ``score_fun8``).
    stop_below_three
        Stop a trajectory (keeping its last subset) when fewer than 3 residues pass.
    chunk_elements
        Chunks hold at most this many (B x T x N) entries (see :func:`resolve_chunk_elements`).
    solver
        3x3 rotation solver: ``"svd"``, ``"quaternion"`` or ``"auto"`` (see
        :func:`resolve_solver`).
    compiled
        Form the distances, scores and kept residues of every superposition in one kernel
        generated by ``torch.compile`` (:func:`pipeline.metrics._fused.score_fits`; the
        matrix products before it stay with cuBLAS). Quaternion fits are fused as well, with
        a fixed number of Newton steps and one convergence check at the end of the search
        (if some fit had not converged, the search is redone with eager fits); SVD fits stay
        eager.
    dedupe
        Stop a trajectory once its subset's moments and its cutoff equal those of another
        active trajectory of the same structure (:func:`_repeats`): from there on both would
        fit, keep and score exactly the same, so the best scores are unchanged. Many seeds
        converge onto the same subsets within a few refits.
    seed_group
        Trajectories come in consecutive groups of this many that share their seed window
        (``start``, ``width`` and ``traj_ok`` equal within a group) and differ only in their
        cutoffs, as GDT's one trajectory per cutoff and seed. The seed fit, its distances and
        its scores are then computed once per group, and each cutoff selects its subset from
        the shared distances. ``T`` must be a multiple of it.

    Notes
    -----
    A trajectory stops when a refit keeps exactly the subset it was fitted on (the check is
    skipped after the seed fit, as in US-align, because the cutoff may change there). Stopped
    trajectories are dropped from the chunk once they are at least a tenth of it
    (:data:`COMPACT_BELOW`). One host sync per refit reads how many go on (and whether a
    cutoff needs relaxing). With :data:`GRAPHED_REFITS`, compiled quaternion searches run each
    refit after the seed fit as one :func:`_refit` call (CUDA graphs on CUDA).
    """
    b, n, _ = x.shape
    dev = x.device
    g = int(seed_group)
    if g < 1 or start.shape[1] % g:
        raise ValueError(
            f"seed_group must be a positive divisor of the {start.shape[1]} trajectories, "
            f"but got seed_group={seed_group}."
        )
    solver = resolve_solver(solver, dev)
    ones = torch.ones(b, n, 1, dtype=torch.float64, device=dev)
    xy = (x.unsqueeze(-1) * y.unsqueeze(-2)).reshape(b, n, 9)  # x_i y_j
    yx = (y.unsqueeze(-1) * x.unsqueeze(-2)).reshape(b, n, 9)  # y_i x_j
    sq = torch.stack([(x * x).sum(-1), (y * y).sum(-1)], -1)
    moments = torch.cat([ones, x, y, xy, sq], -1) * valid.unsqueeze(-1)  # (B, N, 18)
    features_t = torch.cat([x, y, yx], -1).transpose(1, 2).contiguous()  # (B, 15, N)
    base = (x * x).sum(-1) + (y * y).sum(-1)  # (B, N)
    positions = torch.arange(n, device=dev)
    valid3 = valid.unsqueeze(1)
    # Fixed random weights that fold a trajectory's moments and cutoff into one sort key.
    key_weights = torch.rand(19, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    key_weights = (key_weights + 1.0).to(dev)
    n_valid = valid.sum(-1)

    n_traj = start.shape[1]
    chunk = max(1, resolve_chunk_elements(chunk_elements, dev) // max(1, b * n * g)) * g
    best: torch.Tensor | None = None
    # Compiled quaternion fits run a fixed number of Newton steps and are checked once, after
    # the search, instead of after every fit (a device sync each).
    unchecked_fits = compiled and solver == "quaternion"
    all_converged: torch.Tensor | None = None
    score = fused(score_fits) if compiled else score_fits
    compile_bookkeeping = compiled and COMPILED_BOOKKEEPING
    bookkeeping = fused(_bookkeeping) if compile_bookkeeping else _bookkeeping
    drop_repeats = fused(_drop_repeats) if compile_bookkeeping else _drop_repeats
    refit = graphed(_refit) if unchecked_fits and GRAPHED_REFITS else None
    tables = _cofactor_tables(moments) if refit is not None else None
    for lo in range(0, n_traj, chunk):
        sl = slice(lo, min(n_traj, lo + chunk))
        st, wd = start[:, sl], width[:, sl]
        # Copies, not views: a compiled refit is specialised on whether an input is a view.
        ok = traj_ok[:, sl].clone()
        c_iter = cut_iter[:, sl].clone(memory_format=torch.contiguous_format)
        c_first = cut_first[:, sl]
        subset = (
            (positions >= st.unsqueeze(-1))
            & (positions < (st + wd).unsqueeze(-1))
            & ok.unsqueeze(-1)
            & valid3
        )
        active = ok.clone()
        for k in range(n_fits):
            cut = c_first if k == 0 else c_iter
            # The seed fit of a group is shared: fit its first trajectory, apply all g cutoffs.
            shared = k == 0 and g > 1
            if refit is not None and k > 0:
                torch.compiler.cudagraph_mark_step_begin()
                best, all_converged, flags, next_active, next_subset, need, active, new, r, t = (
                    refit(subset, active, ok, c_iter, best, all_converged, moments,
                          features_t, base, valid, n_valid, key_weights, tables, score_fn,
                          score_args, dedupe, stop_below_three, relax and n > 3)
                )
                # Graph outputs are overwritten by the next replay: keep copies of the state.
                best, all_converged = best.clone(), all_converged.clone()
                next_active, next_subset = next_active.clone(), next_subset.clone()
                if k == n_fits - 1:
                    break
            else:
                fitted, fitted_ok = (subset[:, ::g], ok[:, ::g]) if shared else (subset, ok)
                if shared:
                    cut = cut.unflatten(1, (-1, g))
                m = torch.bmm(fitted.double(), moments)
                if dedupe and k > 0:
                    active = drop_repeats(m, c_iter, active, key_weights)
                if unchecked_fits:
                    r, t, _, converged = quaternion_fit_unchecked(m)
                    converged = converged.all()
                    all_converged = (converged if all_converged is None
                                     else all_converged & converged)
                else:
                    r, t = _fit_from_moments(m, solver=solver, compiled=compiled)
                products = torch.bmm(expansion_coefficients(r, t), features_t)
                # Invalid residues sit at infinity: no cutoff keeps them, no score counts them.
                scores, new, count = score(products, t, base, valid, cut.contiguous(),
                                           score_fn, score_args)
                if shared:
                    cut, new, count = cut.flatten(1), new.flatten(1, 2), count.flatten(1)
                if k == n_fits - 1:
                    scores = _best_fitted(scores, fitted_ok)
                    best = scores if best is None else torch.maximum(best, scores)
                    break
                scores, need, next_active, next_subset, flags = bookkeeping(
                    scores, fitted_ok, active, subset, new, count, n_valid, k > 0,
                    stop_below_three, relax and n > 3,
                )
                best = scores if best is None else torch.maximum(best, scores)
            # One host sync per refit: whether a cutoff needs relaxing (rare: only where a fit
            # keeps fewer than 3 residues) and how many trajectories go on.
            flags = flags.tolist()
            if flags[1]:
                new = _relax_where_needed(need, new, cut, r, t, features_t, base, valid,
                                          g if shared else 1)
                next_active, next_subset = _advance(active, subset, new, new.sum(-1), k > 0,
                                                    stop_below_three)
                flags[0] = int(next_active.sum(-1).max())
            active, subset = next_active, next_subset
            n_active = flags[0]
            if n_active == 0:
                break
            # Drop finished trajectories (their superposition is scored already): they finish
            # a few at every refit, and the rest need not drag them along. At least two stay,
            # so that compiled steps need no variant for a single one.
            n_keep = max(n_active, 2)
            if refit is not None:
                n_keep = graph_rows(n_keep)
            if n_active <= COMPACT_BELOW * active.shape[1] and n_keep < active.shape[1]:
                keep = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :n_keep]
                subset = torch.gather(subset, 1, keep.unsqueeze(-1).expand(-1, -1, n))
                active = torch.gather(active, 1, keep)
                ok = torch.gather(ok, 1, keep)
                c_iter = torch.gather(c_iter, 1, keep)
    if best is None:
        raise ValueError("superposition_search needs at least one trajectory (T >= 1).")
    if all_converged is not None and not bool(all_converged):
        # Some fit needed more Newton steps (none did on the benchmark structures): its
        # rotation, and the subsets that followed from it, may be off. Redo the search with
        # the eager fits, which iterate until converged.
        return superposition_search(
            x, y, valid, start, width, traj_ok, cut_first, cut_iter, score_fn, score_args,
            n_fits=n_fits, relax=relax, stop_below_three=stop_below_three,
            chunk_elements=chunk_elements, solver=solver, compiled=False, dedupe=dedupe,
            seed_group=seed_group,
        )
    return best


def reference_lengths(n_ref, n_valid: torch.Tensor) -> torch.Tensor:
    """(B,) float64 normalisation lengths: ``n_ref`` (scalar or per structure) or, when it
    is ``None``, the number of aligned residues. ``n_ref`` below that number is an error."""
    if n_ref is None:
        return n_valid.double()
    l_ref = torch.as_tensor(n_ref, dtype=torch.float64, device=n_valid.device)
    l_ref = l_ref.expand(n_valid.shape[0]).clone()
    if bool((l_ref < n_valid).any()):
        raise ValueError(
            f"n_ref must be at least the number of aligned residues {n_valid.tolist()}, "
            f"but got n_ref={l_ref.tolist()}."
        )
    return l_ref
