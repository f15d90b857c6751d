"""Datasets: the files source (discovery, skips, split), crops and the feature caches."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataConfig, build_datasets
from pipeline.data import datasets as ds
from pipeline.data.cache import DiskCache, content_hash, feature_key
from pipeline.data.crop import crop_contiguous, crop_sample, crop_spatial, residue_centres
from pipeline.data.features import ATOM_NAMES, RNASample
from pipeline.errors import ConfigError, DataError
from pipeline.io.structures import read_structure, table_to_sample

PROTEIN_PDB = "\n".join(
    f"ATOM  {k + 1:5d}  CA  ALA P{k + 1:4d}    {3.8 * k:8.3f}{0.0:8.3f}{0.0:8.3f}"
    "  1.00 20.00           C"
    for k in range(5)
) + "\nEND\n"


def _link(src: Path, dst: Path) -> Path:
    """A symbolic link to a shared structure (the shared files are never copied)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


def _dna_copy(native: Path, dst: Path) -> Path:
    """A native with every residue renamed to DNA (written into tmp_path)."""
    lines = []
    for line in native.read_text().splitlines():
        if line.startswith("ATOM"):
            line = line[:17] + f" D{line[19]}" + line[20:]
        lines.append(line)
    dst.write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture()
def mixed_dir(tmp_path: Path, rna_puzzles: Path) -> Path:
    """Three usable structures (one gzipped, in a subfolder) and five unusable files."""
    natives = rna_puzzles / "natives"
    root = tmp_path / "mixed"
    _link(natives / "1_solution_0_rpr.pdb", root / "a.pdb")
    _link(natives / "21_solution_2_rpr.pdb", root / "b.ent")
    (root / "nested" / "deeper").mkdir(parents=True)
    packed = gzip.compress((natives / "9_solution_0_rpr.pdb").read_bytes())
    (root / "nested" / "deeper" / "c.pdb.gz").write_bytes(packed)
    (root / "empty.pdb").write_bytes(b"")
    (root / "garbage.cif").write_text("this is not a structure\n")
    text = (natives / "3_solution_0_rpr.pdb").read_text()
    (root / "truncated.pdb").write_text(text[: text.index("ATOM    500") + 20])
    _dna_copy(natives / "21_solution_2_rpr.pdb", root / "dna.pdb")
    (root / "protein.cif.pdb").write_text(PROTEIN_PDB)
    (root / "notes.txt").write_text("not a structure file: ignored\n")
    (root / ".hidden").mkdir()
    _link(natives / "3_solution_0_rpr.pdb", root / ".hidden" / "h.pdb")  # hidden: ignored
    return root


def test_natives_split_by_sequence_clusters(rna_puzzles: Path):
    cfg = DataConfig(source="files", path=str(rna_puzzles / "natives"))
    splits = build_datasets(cfg, seed=0)
    stats = splits.stats
    assert stats["files_found"] == 18 and stats["structures_used"] == 18
    assert stats["residues"] == 1531 and stats["files_skipped"] == {}
    assert len(splits.train) + len(splits.val) == 18 and len(splits.val) >= 2
    train_names = {splits.train.source.entries[i].name for i in range(len(splits.train))}
    val_names = {splits.val.source.entries[i].name for i in range(len(splits.val))}
    assert not train_names & val_names
    # the bound and free forms of puzzle 14 share a sequence: they may not straddle the split
    pair = {"14_solution_bound_0_rpr", "14_solution_free_0_rpr"}
    assert pair <= train_names or pair <= val_names
    assert stats["n_clusters"] < 18
    # samples come out cropped and named
    sample = splits.train[0]
    assert len(sample) <= cfg.crop_length and sample.name in train_names


def test_cluster_split_is_seeded_and_keeps_clusters_together():
    sequences = ["ACGUACGUACGUAAGG", "ACGUACGUACGUAAGC", "GGGGCCCCAAAAUUUU", "UUAACCGGUUAACCGG"]
    clusters = ds.cluster_sequences(sequences, 0.8)
    assert clusters[0] == clusters[1] and len(set(clusters)) == 3
    assert ds.kmer_identity("ACGUACGUAC", "ACGUACGUAC") == 1.0
    assert ds.kmer_identity("ACGUACGUACGUAAGG", "CCCCCCCCCCCCCC") == 0.0
    train, val = ds.split_indices([0, 0, 1, 2, 3, 4, 5, 6, 7, 8], 0.3, seed=1)
    assert sorted(train + val) == list(range(10)) and len(val) >= 3
    assert (0 in val) == (1 in val)
    assert ds.split_indices([0, 0, 1, 2, 3, 4, 5, 6, 7, 8], 0.3, seed=1) == (train, val)
    assert ds.split_indices([0, 0, 0], 0.5, seed=0) == ([0, 1, 2], [])  # one cluster: all train


def test_unusable_files_are_skipped_counted_and_logged(mixed_dir: Path, caplog):
    cfg = DataConfig(source="files", path=str(mixed_dir), val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.datasets"):
        splits = build_datasets(cfg, seed=0)
    stats = splits.stats
    assert stats["files_found"] == 8  # .txt and the hidden folder are not structure files
    assert stats["structures_used"] == 3
    assert stats["files_skipped"] == {
        "empty": 1, "no_atoms": 1, "unparseable": 1, "no_rna_chain": 2
    }
    assert len(splits.train) == 3 and len(splits.val) == 0
    names = {e.name for e in splits.train.source.entries}
    assert names == {"a", "b", "nested/deeper/c"}
    logged = caplog.text
    for bad in ("empty.pdb", "garbage.cif", "truncated.pdb", "dna.pdb", "protein.cif.pdb"):
        assert bad in logged


def test_no_usable_chain_is_one_data_error_naming_the_path_and_reasons(tmp_path: Path):
    (tmp_path / "x.pdb").write_bytes(b"")
    (tmp_path / "y.cif").write_text("junk\n")
    (tmp_path / "z.pdb").write_text(PROTEIN_PDB)
    cfg = DataConfig(source="files", path=str(tmp_path))
    with pytest.raises(DataError) as info:
        build_datasets(cfg, seed=0)
    message = str(info.value)
    assert message.startswith(f"data.path: no usable RNA chains in {tmp_path} (3 files:")
    assert "empty: 1" in message and "no_atoms: 1" in message and "no_rna_chain: 1" in message


def test_missing_path_empty_dir_and_missing_setting(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(DataConfig(source="files", path=str(tmp_path / "nope")), seed=0)
    with pytest.raises(DataError, match="no structure files"):
        build_datasets(DataConfig(source="files", path=str(tmp_path)), seed=0)
    with pytest.raises(ConfigError, match="data.path: required when data.source is 'files'"):
        build_datasets(DataConfig(source="files"), seed=0)
    with pytest.raises(ConfigError, match="needs a cache directory"):
        build_datasets(DataConfig(n_train=1, n_val=1), seed=0, cache="disk")


def test_list_file_and_min_chain_length(tmp_path: Path, rna_puzzles: Path):
    natives = rna_puzzles / "natives"
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    _link(natives / "15_solution_0_rpr.pdb", tmp_path / "lists" / "p15.pdb")
    listing.write_text(
        "# puzzle 1 (two chains of 23) and puzzle 15 (48 + 20)\n"
        f"{natives / '1_solution_0_rpr.pdb'}\n"
        "p15.pdb\n\n"
        "missing.pdb\n"
    )
    cfg = DataConfig(source="files", path=str(listing), min_chain_length=24, val_fraction=0.0)
    splits = build_datasets(cfg, seed=0)
    assert splits.stats["files_found"] == 3
    assert splits.stats["files_skipped"] == {"chains_too_short": 1, "missing": 1}
    assert splits.stats["chains_skipped"] == {"too_short": 3}  # both of puzzle 1, B of puzzle 15
    (entry,) = splits.train.source.entries
    assert entry.name == "p15" and entry.length == 48
    sample = splits.train.source.get(0)
    assert np.all(sample.chain_index == 0)


def _native_sample(rna_puzzles: Path, name: str = "4_solution_0_rpr.pdb") -> RNASample:
    table, _ = read_structure(rna_puzzles / "natives" / name)
    return table_to_sample(table, name)


def test_contiguous_crop(rna_puzzles: Path):
    sample = _native_sample(rna_puzzles)  # 126 nucleotides
    sample.atom_mask[10, 0] = False  # a missing atom must stay missing in the crop
    crop = crop_contiguous(sample, 40, np.random.default_rng(3))
    start = int(np.nonzero(sample.residue_index == crop.residue_index[0])[0][0])
    window = slice(start, start + 40)
    assert len(crop) == 40 and crop.sequence == sample.sequence[window]
    assert np.array_equal(crop.coords, sample.coords[window])
    assert np.array_equal(crop.atom_mask, sample.atom_mask[window])
    assert np.all(np.diff(crop.residue_index) == 1)
    assert crop_contiguous(sample, 200, np.random.default_rng(0)) is sample  # short: unchanged


def test_spatial_crop_keeps_the_nearest_residues(rna_puzzles: Path):
    sample = _native_sample(rna_puzzles)
    sample.atom_mask[5] = False  # a residue without atoms is never chosen before located ones
    crop = crop_spatial(sample, 30, np.random.default_rng(11))
    chosen = np.nonzero(np.isin(sample.residue_index, crop.residue_index))[0]
    assert len(crop) == 30 and np.all(np.diff(chosen) > 0) and 5 not in chosen
    assert np.array_equal(crop.atom_mask, sample.atom_mask[chosen])
    # replay the centre draw: every kept residue is at least as close as every dropped one
    centres = residue_centres(sample)
    located = np.nonzero(np.isfinite(centres[:, 0]))[0]
    centre = centres[located[int(np.random.default_rng(11).integers(0, len(located)))]]
    dist = np.linalg.norm(centres - centre, axis=-1)
    dropped = np.setdiff1d(located, chosen)
    assert dist[chosen].max() <= dist[dropped].min()
    # C3' is the residue position when present
    assert np.allclose(centres[0], sample.coords[0, ATOM_NAMES.index("C3'")])


def test_crops_depend_on_seed_epoch_and_index_only(rna_puzzles: Path):
    cfg = DataConfig(
        source="files", path=str(rna_puzzles / "natives"), crop_length=30, crop_mode="spatial"
    )
    splits = build_datasets(cfg, seed=5)
    train, val = splits.train, splits.val
    first = train[(0, 0)]
    assert np.array_equal(first.residue_index, train[(0, 0)].residue_index)
    epochs = {tuple(train[(0, e)].residue_index) for e in range(6)}
    assert len(epochs) > 1  # a new crop each epoch
    train.set_epoch(3)
    assert np.array_equal(train[0].residue_index, train[(0, 3)].residue_index)
    again = build_datasets(cfg, seed=5).train
    assert np.array_equal(again[(0, 0)].residue_index, first.residue_index)
    # validation: the same window every time, whatever the epoch
    val.set_epoch(7)
    windows = {tuple(val[i].residue_index) for i in range(len(val))}
    val.set_epoch(0)
    assert windows == {tuple(val[i].residue_index) for i in range(len(val))}
    assert all(len(val[i]) <= 30 for i in range(len(val)))
    with pytest.raises(ValueError, match="crop mode"):
        crop_sample(first, 10, "diagonal", np.random.default_rng(0))


def test_disk_cache_hits_and_is_invalidated_by_settings_and_content(
    tmp_path: Path, rna_puzzles: Path, caplog
):
    natives = rna_puzzles / "natives"
    data = tmp_path / "data"
    for name in ("1_solution_0_rpr.pdb", "21_solution_2_rpr.pdb", "9_solution_0_rpr.pdb"):
        _link(natives / name, data / name)
    cache = tmp_path / "cache"
    cfg = DataConfig(source="files", path=str(data))
    first = build_datasets(cfg, seed=0, cache_dir=cache, cache="disk")
    assert first.stats["disk_cache_hits"] == 0
    assert len(sorted(cache.rglob("*.npz"))) == 3
    second = build_datasets(cfg, seed=0, cache_dir=cache, cache="disk")
    assert second.stats["disk_cache_hits"] == 3
    a, b = first.train.source.get(0), second.train.source.get(0)
    assert a.sequence == b.sequence and np.array_equal(a.coords, b.coords)
    # a setting that changes the features gives new keys: nothing stale is read
    changed = DataConfig(source="files", path=str(data), min_chain_length=30)
    third = build_datasets(changed, seed=0, cache_dir=cache, cache="disk")
    assert third.stats["disk_cache_hits"] == 0
    assert third.stats["files_skipped"] == {"chains_too_short": 1}  # puzzle 1: two chains of 23
    assert len(sorted(cache.rglob("*.npz"))) == 5
    # a changed file misses, the others still hit
    (data / "9_solution_0_rpr.pdb").unlink()
    changed_text = (natives / "9_solution_0_rpr.pdb").read_text() + "REMARK changed\n"
    (data / "9_solution_0_rpr.pdb").write_text(changed_text)
    fourth = build_datasets(cfg, seed=0, cache_dir=cache, cache="disk")
    assert fourth.stats["disk_cache_hits"] == 2
    # settings that only change the crop reuse the parsed features
    cropped = DataConfig(source="files", path=str(data), crop_length=20, crop_mode="spatial")
    recropped = build_datasets(cropped, seed=0, cache_dir=cache, cache="disk")
    assert recropped.stats["disk_cache_hits"] == 3
    # a corrupt entry is reported and rebuilt
    settings = {"min_chain_length": 8, "rna_only": True}
    used = feature_key(content_hash(data / "21_solution_2_rpr.pdb"), settings)
    DiskCache(cache / "features").path_for(used).write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.cache"):
        fifth = build_datasets(cfg, seed=0, cache_dir=cache, cache="disk")
    assert fifth.stats["disk_cache_hits"] == 2 and "unreadable" in caplog.text


def test_memory_cache_parses_once_and_none_every_time(rna_puzzles: Path, monkeypatch):
    calls = []
    real = ds.load_structure_file

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ds, "load_structure_file", counting)
    path = str(rna_puzzles / "natives")
    memory = build_datasets(DataConfig(source="files", path=path), seed=0, cache="memory")
    n_scan = len(calls)
    assert n_scan == 18
    for _ in range(3):
        memory.train[0]
    assert len(calls) == n_scan  # served from the in-memory LRU
    none = build_datasets(DataConfig(source="files", path=path), seed=0, cache="none")
    before = len(calls)
    for _ in range(3):
        none.train[0]
    assert len(calls) == before + 3


def test_synthetic_source_and_its_disk_cache(tmp_path: Path, monkeypatch):
    cfg = DataConfig(n_train=6, n_val=3, min_length=20, max_length=30, crop_length=24)
    splits = build_datasets(cfg, seed=2, cache_dir=tmp_path, cache="disk")
    assert splits.stats["n_train"] == 6 and splits.stats["n_val"] == 3
    assert 20 <= splits.stats["length_min"] <= splits.stats["length_max"] <= 30
    assert all(len(splits.train[i]) <= 24 for i in range(6))
    assert splits.train.lengths == [min(n, 24) for n in splits.train.source.lengths]

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(ds, "generate_synthetic", fail)
    again = build_datasets(cfg, seed=2, cache_dir=tmp_path, cache="disk")
    for i in range(6):
        assert np.array_equal(again.train.source.get(i).coords, splits.train.source.get(i).coords)
    with pytest.raises(AssertionError, match="regenerated"):  # another seed is another key
        build_datasets(cfg, seed=3, cache_dir=tmp_path, cache="disk")


def test_generated_synthetic_set_is_kept_on_disk_unless_cache_is_none(tmp_path: Path, monkeypatch):
    cfg = DataConfig(n_train=4, n_val=2, min_length=20, max_length=30, crop_length=24)
    first = build_datasets(cfg, seed=5, cache_dir=tmp_path / "m", cache="memory")
    calls = []
    real = ds.generate_synthetic

    def counting(*args, **kwargs):
        calls.append(kwargs.get("split"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ds, "generate_synthetic", counting)
    again = build_datasets(cfg, seed=5, cache_dir=tmp_path / "m", cache="memory")
    assert calls == []  # both splits came from <cache_dir>/features
    for i in range(4):
        assert np.array_equal(again.train.source.get(i).coords, first.train.source.get(i).coords)
    build_datasets(cfg, seed=5, cache_dir=tmp_path / "n", cache="none")
    build_datasets(cfg, seed=5, cache_dir=tmp_path / "n", cache="none")
    assert calls == ["train", "val", "train", "val"]  # 'none' keeps nothing
    assert not (tmp_path / "n").exists()
