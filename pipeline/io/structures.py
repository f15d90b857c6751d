"""Reading and writing RNA structures (PDB and mmCIF) through gemmi.

:func:`read_structure` turns a file into an :class:`AtomTable` (heavy atoms of the RNA chains
of the first model) and a :class:`ReadReport` saying what was left out and why.
:func:`table_to_sample` reduces a table to the per-nucleotide atoms of
:data:`pipeline.data.features.ATOM_NAMES` (the :class:`~pipeline.data.features.RNASample`
contract). :func:`write_structure` writes predicted coordinates back out, with pLDDT in the
B-factor column, in a form :func:`read_structure` reads again.

Coordinates are in Angstrom throughout.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

from pipeline.data.features import ATOM_NAMES, NUCLEOTIDES, RNASample
from pipeline.errors import DataError

#: Modified nucleotides gemmi's residue table does not know (or knows without a parent);
#: gemmi's table (``one_letter_code`` in lower case) covers most others.
MODIFIED_PARENT: dict[str, str] = {
    "PSU": "U", "5MC": "C", "1MA": "A", "2MG": "G", "M2G": "G", "7MG": "G", "OMC": "C",
    "OMG": "G", "H2U": "U", "4SU": "U", "5BU": "U", "5MU": "U", "OMU": "U", "1MG": "G",
    "6MZ": "A", "MA6": "A", "A2M": "A", "YG": "G", "YYG": "G", "G7M": "G", "UR3": "U",
    "PYO": "U", "CCC": "C", "GTP": "G", "GDP": "G", "ATP": "A", "CBV": "C", "5IU": "U",
    "RSQ": "C", "T6A": "A", "MIA": "A", "I6A": "A", "2MA": "A", "UMS": "U", "CM0": "C",
    "SSU": "U", "MNU": "U", "5CM": "C",
}
#: The glycosidic atom of a few modified nucleotides differs from their parent's (the C-glycoside
#: pseudouridine binds C1' through C5, which sits where uridine's N1 does).
GLYCOSIDIC_OVERRIDE: dict[str, str] = {"PSU": "C5"}
_WATER_NAMES = {"HOH", "WAT", "DOD", "H2O"}
_PURINES = {"A", "G"}


class StructureFileError(DataError):
    """A structure file that cannot be used, with a short machine-readable ``reason``.

    Reasons: ``missing``, ``not_a_file``, ``corrupt_gzip``, ``empty``, ``unparseable``,
    ``no_atoms``, ``no_rna_chain`` (and ``chains_too_short`` from the data layer).
    """

    def __init__(self, path: str | os.PathLike, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = str(path)
        self.reason = reason
        #: chains left out by kind, where the file was read far enough to know
        self.chains_skipped: dict[str, int] = {}


@dataclass
class AtomTable:
    """Heavy atoms of one structure, one row per atom, in file order.

    ``res_name`` holds the parent nucleotide (``A``, ``C``, ``G``, ``U``) of modified residues
    so that residues compare by name across files; ``orig_res_name`` keeps the name in the
    file (equal to ``res_name`` for standard residues).
    """

    chain: np.ndarray  # (N,) str
    res_num: np.ndarray  # (N,) int64
    icode: np.ndarray  # (N,) str, "" when absent
    res_name: np.ndarray  # (N,) str
    atom_name: np.ndarray  # (N,) str
    element: np.ndarray  # (N,) str
    coords: np.ndarray  # (N, 3) float64, Angstrom
    source: str = ""
    orig_res_name: np.ndarray | None = None  # (N,) str

    def __len__(self) -> int:
        return len(self.atom_name)

    def residue_keys(self) -> list[tuple[str, int, str]]:
        """Distinct ``(chain, res_num, icode)`` in file order."""
        keys = zip(self.chain.tolist(), self.res_num.tolist(), self.icode.tolist())
        return list(dict.fromkeys(keys))


@dataclass
class ReadReport:
    """What :func:`read_structure` kept and left out, with counts."""

    source: str
    fmt: str = ""  # "pdb" or "mmcif"
    n_models: int = 0
    n_chains: int = 0  # RNA chains kept
    n_residues: int = 0
    n_atoms: int = 0
    skipped_chains: Counter = field(default_factory=Counter)  # kind -> chains
    skipped_residues: Counter = field(default_factory=Counter)  # kind -> residues in kept chains
    modified_mapped: Counter = field(default_factory=Counter)  # "PSU->U" -> residues
    modified_skipped: Counter = field(default_factory=Counter)  # residue name -> residues
    altlocs_resolved: int = 0  # atoms dropped because another altloc was kept
    hydrogens_dropped: int = 0

    def as_dict(self) -> dict:
        """Plain-dict form for logging and JSON."""
        out = dict(self.__dict__)
        for key in ("skipped_chains", "skipped_residues", "modified_mapped", "modified_skipped"):
            out[key] = dict(out[key])
        return out


def residue_kind(name: str) -> tuple[str, str | None]:
    """Classify a residue name.

    Returns
    -------
    kind : one of ``"rna"``, ``"dna"``, ``"protein"``, ``"water"``, ``"ligand"``.
    parent : the parent nucleotide letter for RNA residues (``None`` when a nucleotide has no
        A/C/G/U parent, e.g. inosine), else ``None``.
    """
    name = name.strip().upper()
    if name in _WATER_NAMES:
        return "water", None
    if name in NUCLEOTIDES:
        return "rna", name
    if name in MODIFIED_PARENT:
        return "rna", MODIFIED_PARENT[name]
    info = gemmi.find_tabulated_residue(name)
    if info is None:
        return "ligand", None
    if info.is_water():
        return "water", None
    if info.kind == gemmi.ResidueKind.RNA:
        letter = info.one_letter_code.upper()
        return "rna", letter if letter in NUCLEOTIDES else None
    if info.kind == gemmi.ResidueKind.DNA:
        return "dna", None
    if info.is_amino_acid():
        return "protein", None
    return "ligand", None


def glycosidic_atom(orig_name: str, parent: str) -> str:
    """The atom bonded to C1' (``"N"`` of ``ATOM_NAMES``): N9 of purines, N1 of pyrimidines."""
    if orig_name in GLYCOSIDIC_OVERRIDE:
        return GLYCOSIDIC_OVERRIDE[orig_name]
    return "N9" if parent in _PURINES else "N1"


def _read_text(path: Path) -> str:
    """File contents as text, gunzipped when compressed (by magic bytes, not by suffix)."""
    if not path.exists():
        raise StructureFileError(path, "missing", "file not found")
    if not path.is_file():
        raise StructureFileError(path, "not_a_file", "not a regular file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as exc:
            detail = f"truncated or corrupt gzip data ({exc})"
            raise StructureFileError(path, "corrupt_gzip", detail) from None
    if not raw.strip():
        raise StructureFileError(path, "empty", "empty file")
    # Undecodable bytes become U+FFFD; a binary file then fails below as "no atoms" or as
    # unparseable instead of with a UnicodeDecodeError.
    return raw.decode("utf-8", errors="replace")


def _is_mmcif(text: str) -> bool:
    """mmCIF files open with a ``data_`` block header (after optional comment lines)."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return stripped.lower().startswith("data_")
    return False


def _parse(path: Path, text: str) -> tuple[gemmi.Structure, str]:
    fmt = "mmcif" if _is_mmcif(text) else "pdb"
    try:
        if fmt == "mmcif":
            doc = gemmi.cif.read_string(text)
            structure = gemmi.make_structure_from_block(doc[0])
        else:
            structure = gemmi.read_pdb_string(text)
    except (RuntimeError, ValueError, IndexError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        detail = f"truncated or unparseable {fmt} file ({reason})"
        raise StructureFileError(path, "unparseable", detail) from None
    return structure, fmt


def _chain_kind(kinds: list[str]) -> str:
    """The kind of a chain: its most common polymer kind, else water or ligand."""
    polymer = Counter(k for k in kinds if k in ("rna", "dna", "protein"))
    if polymer:
        return polymer.most_common(1)[0][0]
    return "water" if kinds and all(k == "water" for k in kinds) else "ligand"


def _resolve_altlocs(residue: gemmi.Residue) -> tuple[list[gemmi.Atom], int, int]:
    """Heavy atoms of a residue, one per name (highest occupancy, first on ties).

    Returns the atoms in file order, the number dropped as alternative locations and the
    number of hydrogens dropped.
    """
    best: dict[str, gemmi.Atom] = {}
    order: list[str] = []
    n_h = 0
    n_alt = 0
    for atom in residue:
        if atom.is_hydrogen():
            n_h += 1
            continue
        if atom.name not in best:
            best[atom.name] = atom
            order.append(atom.name)
            continue
        n_alt += 1
        if atom.occ > best[atom.name].occ:
            best[atom.name] = atom
    return [best[name] for name in order], n_alt, n_h


def read_structure(
    path: str | os.PathLike, *, rna_only: bool = True
) -> tuple[AtomTable, ReadReport]:
    """Read the heavy atoms of the first model of a PDB or mmCIF file (optionally gzipped).

    Parameters
    ----------
    path : file to read. The format is recognised from the contents (an mmCIF file starts
        with ``data_``), compression from the gzip magic bytes, so suffixes do not matter.
    rna_only : keep only RNA chains (default). Modified nucleotides are mapped to their
        parent (``PSU`` -> ``U``); nucleotides without an A/C/G/U parent, ligands and waters
        inside RNA chains are left out and counted. With ``False`` every chain and residue
        is kept (names unchanged) and no RNA chain is required.

    Returns
    -------
    table : :class:`AtomTable`, coordinates in Angstrom.
    report : :class:`ReadReport`.

    Raises
    ------
    StructureFileError
        (a :class:`~pipeline.errors.DataError`) one line naming the file and the reason:
        missing, empty, truncated/unparseable, no atoms, no RNA chain.
    """
    path = Path(path)
    text = _read_text(path)
    structure, fmt = _parse(path, text)
    report = ReadReport(source=str(path), fmt=fmt, n_models=len(structure))
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        detail = "no atoms found (not a PDB/mmCIF structure, or truncated)"
        raise StructureFileError(path, "no_atoms", detail)
    columns = ("chain", "num", "icode", "res", "orig", "atom", "el", "xyz")
    rows: dict[str, list] = {k: [] for k in columns}
    seen_residues: set[tuple[str, int, str]] = set()
    for chain in structure[0]:
        kinds = [residue_kind(r.name) for r in chain]
        chain_kind = _chain_kind([k for k, _ in kinds])
        if rna_only and chain_kind != "rna":
            report.skipped_chains[chain_kind] += 1
            continue
        n_res_before = len(seen_residues)
        for residue, (kind, parent) in zip(chain, kinds):
            name = residue.name.strip()
            if rna_only:
                if kind != "rna":
                    report.skipped_residues[kind] += 1
                    continue
                if parent is None:
                    report.modified_skipped[name] += 1
                    continue
                if name != parent:
                    report.modified_mapped[f"{name}->{parent}"] += 1
            icode = residue.seqid.icode.strip()
            key = (chain.name, residue.seqid.num, icode)
            if key in seen_residues:
                # A second residue under the same number is a residue-level alternative
                # conformation (microheterogeneity): the first one is kept.
                report.altlocs_resolved += len(residue)
                continue
            atoms, n_alt, n_h = _resolve_altlocs(residue)
            report.altlocs_resolved += n_alt
            report.hydrogens_dropped += n_h
            if not atoms:
                continue
            seen_residues.add(key)
            res_name = parent if rna_only else name
            for atom in atoms:
                rows["chain"].append(chain.name)
                rows["num"].append(residue.seqid.num)
                rows["icode"].append(icode)
                rows["res"].append(res_name)
                rows["orig"].append(name)
                rows["atom"].append(atom.name)
                rows["el"].append(atom.element.name)
                rows["xyz"].append((atom.pos.x, atom.pos.y, atom.pos.z))
        if len(seen_residues) > n_res_before:
            report.n_chains += 1
        elif rna_only:
            report.skipped_chains["rna_without_usable_residues"] += 1
    if not rows["atom"]:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped_chains.items()))
        detail = f"no RNA chain found ({skipped or 'no polymer chains'})"
        error = StructureFileError(path, "no_rna_chain", detail)
        error.chains_skipped = dict(report.skipped_chains)
        raise error
    table = AtomTable(
        chain=np.array(rows["chain"], dtype=str),
        res_num=np.array(rows["num"], dtype=np.int64),
        icode=np.array(rows["icode"], dtype=str),
        res_name=np.array(rows["res"], dtype=str),
        atom_name=np.array(rows["atom"], dtype=str),
        element=np.array(rows["el"], dtype=str),
        coords=np.array(rows["xyz"], dtype=np.float64).reshape(-1, 3),
        source=str(path),
        orig_res_name=np.array(rows["orig"], dtype=str),
    )
    report.n_residues = len(seen_residues)
    report.n_atoms = len(table)
    return table, report


def table_to_sample(table: AtomTable, name: str) -> RNASample:
    """Per-nucleotide atoms of ``ATOM_NAMES`` of an :class:`AtomTable`.

    Parameters
    ----------
    table : atoms of RNA chains (as returned by :func:`read_structure`).
    name : structure id stored in the sample.

    Returns
    -------
    RNASample
        ``coords`` (L, A, 3) float32 in Angstrom with zeros where ``atom_mask`` is False;
        ``sequence`` from the parent nucleotides (``N`` when unknown); ``chain_index`` counts
        chains in file order; ``residue_index`` is the residue number, shifted where insertion
        codes would repeat a number so that it increases strictly within a chain.
    """
    keys = table.residue_keys()
    index_of = {key: i for i, key in enumerate(keys)}
    n_res, n_atoms = len(keys), len(ATOM_NAMES)
    coords = np.zeros((n_res, n_atoms, 3), dtype=np.float32)
    mask = np.zeros((n_res, n_atoms), dtype=bool)
    letters = ["N"] * n_res
    orig = table.orig_res_name if table.orig_res_name is not None else table.res_name
    slot_of = {atom: a for a, atom in enumerate(ATOM_NAMES)}
    glyco_slot = ATOM_NAMES.index("N")
    for row in range(len(table)):
        i = index_of[(table.chain[row], int(table.res_num[row]), table.icode[row])]
        parent = str(table.res_name[row])
        letters[i] = parent if parent in NUCLEOTIDES else "N"
        atom = str(table.atom_name[row])
        if atom == glycosidic_atom(str(orig[row]), parent):
            slot = glyco_slot
        else:
            slot = slot_of.get(atom)
            if slot is None or slot == glyco_slot:
                continue
        coords[i, slot] = table.coords[row]
        mask[i, slot] = True
    chain_names = list(dict.fromkeys(k[0] for k in keys))
    chain_index = np.array([chain_names.index(k[0]) for k in keys], dtype=np.int64)
    numbers = np.array([k[1] for k in keys], dtype=np.int64)
    residue_index = _strictly_increasing(numbers, chain_index)
    return RNASample(
        name=name,
        sequence="".join(letters),
        coords=coords,
        atom_mask=mask,
        residue_index=residue_index,
        chain_index=chain_index,
    )


def _strictly_increasing(numbers: np.ndarray, chain_index: np.ndarray) -> np.ndarray:
    """Residue numbers, shifted so they increase within each chain (insertion codes repeat them)."""
    out = numbers.copy()
    for i in range(1, len(out)):
        if chain_index[i] == chain_index[i - 1] and out[i] <= out[i - 1]:
            out[i:][chain_index[i:] == chain_index[i]] += out[i - 1] + 1 - out[i]
    return out


def _atom_name_for(slot_name: str, letter: str) -> str:
    if slot_name != "N":
        return slot_name
    return "N9" if letter in _PURINES else "N1"


def write_structure(
    path: str | os.PathLike,
    sequence: str,
    coords: np.ndarray,
    *,
    atom_mask: np.ndarray | None = None,
    plddt: np.ndarray | None = None,
    chain_ids: list[str] | np.ndarray | None = None,
    residue_numbers: np.ndarray | None = None,
) -> Path:
    """Write per-nucleotide coordinates as PDB (``.pdb``, ``.ent``) or mmCIF (``.cif``, ``.mmcif``).

    A trailing ``.gz`` compresses. The file is written to a temporary name and renamed, so a
    reader never sees half a file.

    Parameters
    ----------
    path : output file; the suffix chooses the format.
    sequence : one letter per residue (``A``, ``C``, ``G``, ``U``; anything else is written
        as residue ``N``).
    coords : (L, A, 3) coordinates in Angstrom of :data:`ATOM_NAMES`; ``"N"`` is written as
        N9 for purines and N1 for pyrimidines.
    atom_mask : (L, A) bool; atoms with False are not written. Default: all.
    plddt : (L,) per-residue confidence written to the B-factor column (0-100 by
        convention). Default: 0.
    chain_ids : (L,) chain id per residue. Default: all ``"A"``.
    residue_numbers : (L,) residue numbers. Default: 1..L.

    Returns
    -------
    Path of the written file.
    """
    path = Path(path)
    coords = np.asarray(coords, dtype=np.float64)
    n_res = len(sequence)
    if coords.shape != (n_res, len(ATOM_NAMES), 3):
        raise ValueError(
            f"coords must have shape ({n_res}, {len(ATOM_NAMES)}, 3) for a sequence of length "
            f"{n_res}, but got {coords.shape}"
        )
    mask = np.ones(coords.shape[:2], dtype=bool)
    if atom_mask is not None:
        mask = np.asarray(atom_mask, dtype=bool)
    bfac = np.zeros(n_res) if plddt is None else np.asarray(plddt, dtype=np.float64).reshape(n_res)
    chains = ["A"] * n_res if chain_ids is None else [str(c) for c in chain_ids]
    numbers = np.arange(1, n_res + 1) if residue_numbers is None else np.asarray(residue_numbers)
    structure = _build_structure(sequence, coords, mask, bfac, chains, numbers)
    base = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(base).suffix.lower()
    if suffix in (".cif", ".mmcif"):
        text = structure.make_mmcif_document().as_string()
    elif suffix in (".pdb", ".ent"):
        text = structure.make_pdb_string()
    else:
        raise ValueError(f"cannot tell the format from the suffix of {path} (use .pdb or .cif)")
    data = text.encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    _atomic_write(path, data)
    return path


def _build_structure(
    sequence: str,
    coords: np.ndarray,
    mask: np.ndarray,
    bfac: np.ndarray,
    chains: list[str],
    numbers: np.ndarray,
) -> gemmi.Structure:
    structure = gemmi.Structure()
    structure.name = "diffold"
    model = gemmi.Model(1)
    chain_objs: dict[str, gemmi.Chain] = {}
    for i, letter in enumerate(sequence.upper()):
        res_name = letter if letter in NUCLEOTIDES else "N"
        residue = gemmi.Residue()
        residue.name = res_name
        residue.seqid = gemmi.SeqId(int(numbers[i]), " ")
        residue.entity_type = gemmi.EntityType.Polymer
        residue.het_flag = "A"
        for a, slot_name in enumerate(ATOM_NAMES):
            if not mask[i, a]:
                continue
            atom = gemmi.Atom()
            atom.name = _atom_name_for(slot_name, letter)
            atom.element = gemmi.Element(atom.name[0])
            atom.pos = gemmi.Position(*coords[i, a])
            atom.occ = 1.0
            atom.b_iso = float(bfac[i])
            residue.add_atom(atom)
        chain_objs.setdefault(chains[i], gemmi.Chain(chains[i])).add_residue(residue)
    for chain in chain_objs.values():
        model.add_chain(chain)
    structure.add_model(model)
    structure.setup_entities()
    structure.assign_serial_numbers()
    return structure


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
