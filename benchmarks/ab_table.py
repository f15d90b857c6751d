"""The table of an interleaved A/B of ``bench_metrics.py --parts-only`` runs.

Each argument is a run's output directory, named ``<variant><round>`` (``off1``, ``graph2``,
...): the variant is the name without its trailing digits. Prints, per part, every round's
milliseconds and the median of each variant, and whether the variants' result checksums agree
(they must: the variants differ in speed, not in what they compute).

    python benchmarks/ab_table.py OUT/off1 OUT/book1 OUT/graph1 OUT/off2 ...
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def load(dirs: list[str]) -> dict[str, list[dict]]:
    """Variant -> its runs' ``device`` sections, in the order given."""
    runs: dict[str, list[dict]] = {}
    for d in dirs:
        variant = re.sub(r"\d+$", "", Path(d).name)
        data = json.loads((Path(d) / "bench_metrics.json").read_text())
        runs.setdefault(variant, []).append(data["device"])
    return runs


def table(runs: dict[str, list[dict]]) -> str:
    parts = list(next(iter(runs.values()))[0]["parts_s"])
    lines = ["| part | " + " | ".join(f"{v}: rounds (ms) | {v}: median" for v in runs) + " |",
             "|---|" + "---|---|" * len(runs)]
    mismatched = []
    for part in parts:
        cells = []
        for variant_runs in runs.values():
            ms = [1e3 * r["parts_s"][part] for r in variant_runs]
            cells += [" / ".join(f"{m:.1f}" for m in ms), f"{statistics.median(ms):.1f}"]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
        sums = {r["parts_checksum"][part] for rs in runs.values() for r in rs
                if "parts_checksum" in r}
        if len(sums) > 1 and max(sums) - min(sums) > 1e-6 * max(1.0, abs(max(sums))):
            mismatched.append(f"{part}: {sorted(sums)}")
    lines.append("")
    lines.append("checksums differ: " + "; ".join(mismatched) if mismatched
                 else "checksums agree across all runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    dirs = sys.argv[1:] if argv is None else argv
    if not dirs:
        raise SystemExit("usage: ab_table.py RUN_DIR [RUN_DIR ...]")
    text = table(load(dirs))
    print(text)
    return text


if __name__ == "__main__":
    main()
