"""Agreement with published and independently computed numbers on RNA-Puzzles puzzle 1.

The 14 models and the native are read with biotite (first model, no hydrogens, no HETATM),
atoms matched by (chain, residue number, insertion code, atom name) in native order, exactly as
``predictions/rp01/reference_metrics.md`` describes. References: ``reference_metrics.csv``
(biotite lDDT, US-align TM-score, LGA-like GDT-TS) and the published ``rmsds.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import biotite.structure as struc
import numpy as np
import pytest
import torch
from biotite.structure.io.pdb import PDBFile

from pipeline.metrics import (
    chirality,
    gdt,
    is_mirrored,
    lddt,
    match_atoms,
    plddt_target,
    residue_index_from_keys,
    rmsd,
    rna_d0,
    score_batch,
    score_matched,
    tm_score,
)

NATIVE = "1_solution_0_rpr.pdb"


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _read(path: Path) -> struc.AtomArray:
    atoms = PDBFile.read(str(path)).get_structure(model=1)
    return atoms[(atoms.element != "H") & ~atoms.hetero]


def _keys(atoms: struc.AtomArray) -> list[tuple]:
    return list(zip(atoms.chain_id, atoms.res_id, atoms.ins_code, atoms.atom_name))


class Rp01:
    def __init__(self, folder: Path):
        self.folder = folder
        with open(folder / "reference_metrics.csv", newline="") as fh:
            self.rows = list(csv.DictReader(fh))
        with open(folder / "rmsds.csv", newline="") as fh:
            self.published = {r["fn"]: float(r["rmsd_all"]) for r in csv.DictReader(fh)}
        self.native = _read(folder / NATIVE)
        self.models = {row["model"]: _read(folder / row["model"]) for row in self.rows}
        self.matches = {
            name: match_atoms(_keys(m), _keys(self.native)) for name, m in self.models.items()
        }
        nat = self.native
        self.residue_index = residue_index_from_keys(
            zip(nat.chain_id, nat.res_id, nat.ins_code, nat.res_name)
        )

    def column(self, name: str) -> np.ndarray:
        return np.array([float(row[name]) for row in self.rows])

    def c3_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(14, 46, 3) model and native C3' coordinates (matched) and the mask."""
        models, natives = [], []
        for row in self.rows:
            match = self.matches[row["model"]]
            c3 = self.native.atom_name[match.ref_index] == "C3'"
            models.append(self.models[row["model"]].coord[match.model_index[c3]])
            natives.append(self.native.coord[match.ref_index[c3]])
        x, y = torch.tensor(np.stack(models)), torch.tensor(np.stack(natives))
        return x, y, torch.ones(x.shape[:-1], dtype=torch.bool)


@pytest.fixture(scope="module")
def rp01(rna_puzzles: Path) -> Rp01:
    return Rp01(rna_puzzles / "predictions" / "rp01")


def test_reference_table_covers_the_14_models(rp01):
    assert len(rp01.rows) == 14
    assert all(row["native"] == NATIVE for row in rp01.rows)
    assert rp01.native.array_length() == 978


def test_atom_matching_reports_what_the_model_lacks(rp01):
    for row in rp01.rows:
        match = rp01.matches[row["model"]]
        assert match.n_matched == int(row["n_atoms"])
        assert np.all(np.diff(match.ref_index) > 0)  # native order
    odd = rp01.matches["1_santalucia_1_rpr.pdb"]
    missing = {
        (rp01.native.chain_id[i], int(rp01.native.res_id[i]), rp01.native.atom_name[i])
        for i in odd.missing
    }
    assert missing == {("A", 15, "N4"), ("A", 18, "O4"), ("B", 15, "N4"), ("B", 18, "O4")}
    assert len(odd.extra) == 4  # the model's own N4/O4 at those positions: reported, not scored


def test_all_atom_rmsd_and_lddt(rp01):
    dev_rmsd, dev_pub, dev_lddt = [], [], []
    for row in rp01.rows:
        match = rp01.matches[row["model"]]
        x = torch.tensor(rp01.models[row["model"]].coord[match.model_index])[None]
        y = torch.tensor(rp01.native.coord[match.ref_index])[None]
        mask = torch.ones(x.shape[:-1], dtype=torch.bool)
        res = torch.from_numpy(rp01.residue_index[match.ref_index])[None]
        r = rmsd(x, y, mask).item()
        dev_rmsd.append(r - float(row["rmsd_all"]))
        dev_pub.append(r - rp01.published[row["model"]])
        dev_lddt.append(lddt(x, y, mask, residue_index=res)[0].item() - float(row["lddt_all"]))
    assert np.max(np.abs(dev_rmsd)) < 0.01
    assert np.max(np.abs(dev_pub)) < 0.01
    assert np.max(np.abs(dev_lddt)) < 0.001


def test_missing_atoms_count_as_not_preserved(rp01):
    """The ``note`` of 1_santalucia_1: lDDT 0.688193 with the 4 unmatched native atoms kept."""
    name = "1_santalucia_1_rpr.pdb"
    out = score_matched(
        rp01.models[name].coord, rp01.native.coord, rp01.matches[name],
        residue_index=rp01.residue_index,
    )
    assert out["n_compared"] == 974 and out["n_reference"] == 978
    assert out["lddt"] == pytest.approx(0.688193, abs=1e-4)
    row = next(r for r in rp01.rows if r["model"] == name)
    assert out["rmsd"] == pytest.approx(float(row["rmsd_all"]), abs=0.01)
    assert np.isnan(out["gdt_ts"]) and np.isnan(out["tm_score"])  # several atoms per residue


def test_c3_metrics_reproduce_the_reference_table(rp01):
    x, y, mask = rp01.c3_batch()
    assert x.shape == (14, 46, 3)
    scores = score_batch(x, y, mask)
    assert np.max(np.abs(scores["rmsd"].double().numpy() - rp01.column("rmsd_c3"))) < 0.01
    assert np.max(np.abs(scores["lddt"].double().numpy() - rp01.column("lddt_c3"))) < 0.001
    assert np.max(np.abs(scores["tm_score"].double().numpy() - rp01.column("tm_c3"))) < 0.005
    assert np.max(np.abs(scores["gdt_ts"].double().numpy() - rp01.column("gdt_ts_c3"))) < 0.01
    assert rna_d0(46) == pytest.approx(rp01.column("tm_d0")[0], abs=0.005)
    # The models are right-handed; their mirror images are flagged.
    assert not is_mirrored(x, y, mask).any()
    assert is_mirrored(x * torch.tensor([1.0, -1.0, 1.0]), y, mask).all()
    assert (chirality(x, y, mask) > 0.8).all()


def test_quaternion_solver_reproduces_the_reference_table(rp01):
    """The GPU default (Horn's quaternion fits) gives the same numbers, here on the CPU."""
    x, y, mask = rp01.c3_batch()
    tm = tm_score(x, y, mask, solver="quaternion").double().numpy()
    g = gdt(x, y, mask, solver="quaternion")
    assert np.max(np.abs(tm - rp01.column("tm_c3"))) < 0.005
    assert np.max(np.abs(g.score.double().numpy() - rp01.column("gdt_ts_c3"))) < 0.01
    for k, name in enumerate(("gdt_c3_d1", "gdt_c3_d2", "gdt_c3_d4", "gdt_c3_d8")):
        assert np.max(np.abs(g.fractions[:, k].double().numpy() - rp01.column(name))) < 0.01


def test_score_matched_on_c3_atoms(rp01):
    """The external-prediction path on C3' atoms gives the same four numbers."""
    c3 = rp01.native.atom_name == "C3'"
    native_c3 = rp01.native[c3]
    for row in rp01.rows[:3]:
        model = rp01.models[row["model"]]
        model_c3 = model[model.atom_name == "C3'"]
        match = match_atoms(_keys(model_c3), _keys(native_c3))
        out = score_matched(model_c3.coord, native_c3.coord, match)
        assert out["n_compared"] == 46
        assert out["rmsd"] == pytest.approx(float(row["rmsd_c3"]), abs=0.01)
        assert out["lddt"] == pytest.approx(float(row["lddt_c3"]), abs=0.001)
        assert out["tm_score"] == pytest.approx(float(row["tm_c3"]), abs=0.005)
        assert out["gdt_ts"] == pytest.approx(float(row["gdt_ts_c3"]), abs=0.01)


def test_plddt_target_is_biotite_per_residue_lddt_on_c3(rp01):
    x, y, mask = rp01.c3_batch()
    target, defined = plddt_target(x, y, mask)
    native_c3 = rp01.native[rp01.native.atom_name == "C3'"]
    for b in (0, 7, 13):
        expected = struc.lddt(native_c3, x[b].numpy(), aggregation="residue")
        assert defined[b].all()
        assert np.allclose(target[b].numpy(), expected, atol=1e-5)
