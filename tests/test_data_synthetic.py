"""The synthetic generator: determinism, sequence -> pairs -> 3D, geometry against the natives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import synthetic as syn
from pipeline.data.features import ATOM_NAMES
from pipeline.data.geometry import geometry_summary, pairs_from_table
from pipeline.io.structures import read_structure, table_to_sample

#: Native statistics measured on the 18 RNA-Puzzles natives with the functions of
#: pipeline.data.geometry (the numbers docs/data.md quotes), in A: (mean, sd, p5, p95).
NATIVE_REFERENCE = {
    "c3_step": (5.803, 0.333, 5.343, 6.431),
    "p_step": (5.936, 0.478, 5.261, 6.814),
    "link": (2.625, 0.035, 2.594, 2.661),
    "c1_pair": (10.562, 0.377, 10.179, 10.916),
    "p_c4": (3.873, 0.113, 3.652, 3.950),
    "c4_c3": (1.520, 0.006, 1.510, 1.530),
    "c3_c1": (2.357, 0.017, 2.333, 2.388),
    "c1_n": (1.475, 0.012, 1.459, 1.493),
}
NATIVE_PAIRS = 395
NATIVE_CLASHES_PER_100 = 0.392
N_SYNTHETIC = 48


@pytest.fixture(scope="module")
def native_summary(rna_puzzles: Path) -> dict:
    samples, pairs = [], []
    for path in sorted((rna_puzzles / "natives").glob("*.pdb")):
        table, _ = read_structure(path)
        samples.append(table_to_sample(table, path.stem))
        pairs.append(pairs_from_table(table))
    return geometry_summary(samples, pairs)


@pytest.fixture(scope="module")
def synthetic_set() -> list[syn.SyntheticStructure]:
    return [syn.synthetic_structure(0, i) for i in range(N_SYNTHETIC)]


@pytest.fixture(scope="module")
def synthetic_summary(synthetic_set) -> dict:
    return geometry_summary([s.sample for s in synthetic_set], [s.pairs for s in synthetic_set])


def test_native_statistics_are_the_documented_ones(native_summary: dict):
    for key, (mean, sd, p5, p95) in NATIVE_REFERENCE.items():
        got = native_summary[key]
        assert got["mean"] == pytest.approx(mean, abs=0.002), key
        assert got["sd"] == pytest.approx(sd, abs=0.002), key
        assert got["p5"] == pytest.approx(p5, abs=0.002), key
        assert got["p95"] == pytest.approx(p95, abs=0.002), key
    assert native_summary["c1_pair"]["n"] == NATIVE_PAIRS
    clashes = native_summary["clashes_per_100_residues"]
    assert clashes == pytest.approx(NATIVE_CLASHES_PER_100, abs=0.002)


def test_synthetic_geometry_lies_within_the_native_ranges(synthetic_summary: dict):
    s = synthetic_summary
    ref = NATIVE_REFERENCE
    # backbone steps, also through loops: mean near the native one, spread inside the native 5-95 %
    assert abs(s["c3_step"]["mean"] - ref["c3_step"][0]) < 0.1
    assert s["c3_step"]["p5"] >= ref["c3_step"][2] - 0.1
    assert s["c3_step"]["p95"] <= ref["c3_step"][3]
    assert abs(s["p_step"]["mean"] - ref["p_step"][0]) < 0.15
    assert s["p_step"]["p5"] >= ref["p_step"][2] - 0.1 and s["p_step"]["p95"] <= ref["p_step"][3]
    assert abs(s["link"]["mean"] - ref["link"][0]) < 0.02 and s["link"]["p95"] < 2.75
    # Watson-Crick/G-U pairs at the native C1'-C1' distance
    assert abs(s["c1_pair"]["mean"] - ref["c1_pair"][0]) < 0.1
    assert ref["c1_pair"][2] <= s["c1_pair"]["p5"] and s["c1_pair"]["p95"] <= ref["c1_pair"][3]
    # nucleotides keep native bond geometry
    for key in ("p_c4", "c4_c3", "c3_c1", "c1_n"):
        assert abs(s[key]["mean"] - ref[key][0]) < 0.03, key
    # no clashes at all (the natives have a few, 0.4 per 100 residues)
    assert s["clashes_per_100_residues"] == 0.0
    assert s["min_nonbonded"] >= 3.0


def test_same_seed_same_structures_other_seed_other_structures():
    a = syn.generate_synthetic(3, seed=7, min_length=24, max_length=48)
    b = syn.generate_synthetic(3, seed=7, min_length=24, max_length=48)
    c = syn.generate_synthetic(3, seed=8, min_length=24, max_length=48)
    for x, y in zip(a, b):
        assert x.sequence == y.sequence and x.name == y.name
        assert np.array_equal(x.coords, y.coords)
    assert [x.sequence for x in a] != [x.sequence for x in c]
    # one structure does not depend on how many are drawn, and splits are separate streams
    alone = syn.synthetic_structure(7, 2, min_length=24, max_length=48).sample
    assert np.array_equal(alone.coords, a[2].coords)
    val = syn.generate_synthetic(3, seed=7, split="val", min_length=24, max_length=48)
    assert not {x.sequence for x in val} & {x.sequence for x in a}


def test_samples_follow_the_contract(synthetic_set):
    for s in synthetic_set:
        sample = s.sample
        n = len(sample)
        assert 24 <= n <= 64
        assert set(sample.sequence) <= set("ACGU")
        assert sample.coords.shape == (n, len(ATOM_NAMES), 3) and sample.coords.dtype == np.float32
        assert sample.atom_mask.all() and sample.atom_mask.dtype == bool
        assert np.array_equal(sample.residue_index, np.arange(1, n + 1))
        assert np.all(sample.chain_index == 0)
        assert np.allclose(sample.coords.reshape(-1, 3).mean(axis=0), 0.0, atol=1e-3)
        assert s.dot_bracket.count("(") == s.dot_bracket.count(")") == len(s.pairs)


@pytest.mark.parametrize("min_length, max_length", [(11, 20), (90, 120)])
def test_lengths_stay_within_the_bounds(min_length: int, max_length: int):
    for i in range(3):
        s = syn.synthetic_structure(1, i, min_length=min_length, max_length=max_length)
        assert min_length <= len(s.sample) <= max_length
        assert s.min_stem == syn.min_stem_bp(max_length)
        runs = syn.complementary_runs(s.sample.sequence, s.min_stem)
        assert {pair for run in runs for pair in run} == set(s.pairs)


def test_base_pairs_are_exactly_the_complementary_runs_of_the_sequence(synthetic_set):
    """The sequence determines the pairing: every run of >= min_stem stacked complementary pairs
    (G-U included) is a designed stem, and every designed pair lies in such a run."""
    for s in synthetic_set:
        runs = syn.complementary_runs(s.sample.sequence, s.min_stem)
        in_runs = {pair for run in runs for pair in run}
        assert in_runs == set(s.pairs), s.dot_bracket
        for i, j in s.pairs:
            pair = s.sample.sequence[i] + s.sample.sequence[j]
            assert pair in {"AU", "UA", "GC", "CG", "GU", "UG"}


def test_coordinates_are_a_function_of_the_secondary_structure(synthetic_set):
    """Rebuilding from the topology gives the same structure up to a rigid motion."""
    for s in synthetic_set[:6]:
        residues, pairs = syn._emit(s.topology)
        assert pairs == s.pairs
        rebuilt = syn._coordinates(residues).reshape(-1, 3)
        original = s.sample.coords.reshape(-1, 3).astype(np.float64)
        d_rebuilt = np.linalg.norm(rebuilt[:, None] - rebuilt[None], axis=-1)
        d_original = np.linalg.norm(original[:, None] - original[None], axis=-1)
        assert np.allclose(d_rebuilt, d_original, atol=1e-3)


def test_topologies_cover_hairpins_internal_loops_bulges_and_junctions(synthetic_set):
    arms = [s.topology.arm for s in synthetic_set]
    assert any(len(a.stems) == 1 and a.junction is None for a in arms)
    loops = [loop for a in arms for loop in a.loops]
    assert any(min(loop) == 0 for loop in loops)  # bulges
    assert any(min(loop) > 0 for loop in loops)  # internal loops
    assert any(a.junction is not None for a in arms)  # three-way junctions
    # paired C1'-C1' exactly at the A-form value in every stem
    c1 = ATOM_NAMES.index("C1'")
    for s in synthetic_set[:5]:
        i, j = np.array(s.pairs).T
        d = np.linalg.norm(s.sample.coords[i, c1] - s.sample.coords[j, c1], axis=-1)
        assert np.allclose(d, 10.554, atol=0.01)


def test_accidental_runs_are_rejected_by_the_design_check():
    # GGGG...CCCC pairs with itself in more than one register: the shifted run is foreign
    seq = [syn.NUCLEOTIDES.index(c) for c in "GGGGGAAAACCCCC"]
    partner = [-1] * len(seq)
    for i, j in zip(range(0, 4), range(13, 9, -1)):
        partner[i], partner[j] = j, i
    assert syn._violating_run(seq, partner, 4, min_run=4) is not None
    # the designed register alone is fine
    seq = [syn.NUCLEOTIDES.index(c) for c in "GGGAAAAAAACCUC"]
    partner = [-1] * len(seq)
    assert syn._violating_run(seq, partner, 0, min_run=4) is None


def test_invalid_lengths_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="max_length must be >= min_length"):
        syn.generate_structure(rng, min_length=30, max_length=20)
    with pytest.raises(ValueError, match="at least 11"):
        syn.generate_structure(rng, min_length=5, max_length=10)
