"""A report on a directory (or list file) of structures before training on it.

:func:`check_path` parses every file the ``files`` source would use, with the same rules
(RNA chains, ``min_chain_length``), and counts what is usable and what is skipped and why;
:func:`format_report` renders the result as text for a terminal.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.data.config import DataConfig
from pipeline.data.datasets import discover_files, load_structure_file

#: Upper edges (nucleotides) of the length histogram bins; the last bin is open.
LENGTH_BINS = (25, 50, 100, 200, 500, 1000)
#: Example messages kept per skip reason.
N_EXAMPLES = 3


def _bin_label(index: int) -> str:
    lower = 0 if index == 0 else LENGTH_BINS[index - 1]
    if index == len(LENGTH_BINS):
        return f">={lower}"
    return f"{lower}-{LENGTH_BINS[index] - 1}"


def check_path(path: str | Path, cfg: DataConfig) -> dict:
    """Parse every structure file under ``path`` and report.

    Parameters
    ----------
    path : directory (recursive) or list file, as ``data.path``.
    cfg : the ``data`` section (``min_chain_length``, ``crop_length`` are used).

    Returns
    -------
    dict with ``path``, ``files`` (found), ``usable`` (files), ``chains``, ``residues``,
    ``skipped_files`` (reason -> files), ``skipped_chains`` (reason -> chains),
    ``examples`` (reason -> a few messages), ``modified_residues_mapped``,
    ``length_histogram`` (bin label -> structures), ``longer_than_crop``, ``crop_length``,
    ``min_length``/``max_length`` of usable structures.

    Raises
    ------
    DataError
        ``path`` does not exist.
    """
    from pipeline.io.structures import StructureFileError  # pipeline.io imports pipeline.data

    files, names = discover_files(path)
    skipped_files: Counter = Counter()
    skipped_chains: Counter = Counter()
    examples: dict[str, list[str]] = {}
    histogram = Counter()
    lengths: list[int] = []
    n_chains = 0
    n_modified = 0
    for file, name in zip(files, names):
        try:
            sample, info = load_structure_file(
                file, name=name, min_chain_length=cfg.min_chain_length
            )
        except StructureFileError as exc:
            skipped_files[exc.reason] += 1
            skipped_chains.update(exc.chains_skipped)
            examples.setdefault(exc.reason, [])
            if len(examples[exc.reason]) < N_EXAMPLES:
                examples[exc.reason].append(str(exc))
            continue
        skipped_chains.update(info["skipped_chains"])
        n_modified += info["modified_mapped"]
        n_chains += int(sample.chain_index.max()) + 1
        lengths.append(len(sample))
        histogram[_bin_label(sum(len(sample) >= edge for edge in LENGTH_BINS))] += 1
    ordered = {_bin_label(i): histogram.get(_bin_label(i), 0) for i in range(len(LENGTH_BINS) + 1)}
    return {
        "path": str(path),
        "files": len(files),
        "usable": len(lengths),
        "chains": n_chains,
        "residues": int(sum(lengths)),
        "skipped_files": dict(skipped_files),
        "skipped_chains": dict(skipped_chains),
        "examples": examples,
        "modified_residues_mapped": n_modified,
        "length_histogram": ordered,
        "longer_than_crop": sum(n > cfg.crop_length for n in lengths),
        "crop_length": cfg.crop_length,
        "min_length": min(lengths) if lengths else 0,
        "max_length": max(lengths) if lengths else 0,
    }


def format_report(report: dict) -> str:
    """Human-readable text of a :func:`check_path` report."""
    lines = [
        f"{report['path']}: {report['files']} structure files, {report['usable']} usable",
        f"  chains: {report['chains']}, residues: {report['residues']}"
        + (f" (lengths {report['min_length']}-{report['max_length']})" if report["usable"] else ""),
        f"  longer than the crop ({report['crop_length']}): {report['longer_than_crop']}"
        " (cropped, not dropped)",
    ]
    if report["modified_residues_mapped"]:
        n_mapped = report["modified_residues_mapped"]
        lines.append(f"  modified nucleotides mapped to their parent: {n_mapped}")
    lines.append("  length histogram:")
    peak = max(report["length_histogram"].values(), default=0) or 1
    for label, count in report["length_histogram"].items():
        bar = "#" * round(30 * count / peak)
        lines.append(f"    {label:>9} {count:6d} {bar}")
    if report["skipped_files"]:
        lines.append("  skipped files:")
        for reason, count in sorted(report["skipped_files"].items()):
            lines.append(f"    {reason}: {count}")
            for example in report["examples"].get(reason, []):
                lines.append(f"      e.g. {example}")
    if report["skipped_chains"]:
        lines.append("  skipped chains: " + ", ".join(
            f"{reason}: {count}" for reason, count in sorted(report["skipped_chains"].items())
        ))
    return "\n".join(lines)
