"""One markdown table from several --compare reports (and single runs' results.json): every method at every
sparsity, in-domain and out-of-domain columns side by side (the tables of docs/results.md and the README).

    python benchmarks/grid_table.py runs/a/compare.json runs/b/compare.json --in wiki-offline --out moby-dick
    python benchmarks/grid_table.py runs/a/compare.json="come+ α 0.1" ...        # a label for a report's rows
    python benchmarks/grid_table.py runs/a/compare.json runs/t/results.json=come+ # add a replay's task accuracies

Rows: each method of each report, per sparsity. A results.json (one run, e.g. `--apply-plan P --target-layers N
--tasks ...`) adds its measurements to the row of the same label (default: its method) with the same number of
layers; where two sources measured the same column, the later one wins. Columns: perplexity and ln(PPL / dense) on
the --in and --out texts, the accuracy of each task group (the offline suite averaged, moby_cloze alone) and the
pruning time. The dense row merges the dense evaluations of all sources the same way.
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import come_eval  # noqa: E402


def as_report(data: dict, label: str | None) -> tuple[dict, str | None]:
    """A compare.json as it is; a results.json as a report of one row (its sparsity found later by its depth)."""
    if "rows" in data:
        return data, label
    summary = data["summary"]
    row = {"method": label or summary["method"], "sparsity": None, "layers": summary["layers_after"],
           "prune_seconds": None, **{k: (data["pruned"] or {}).get(k) for k in ("ppl", "tasks")}}
    row["ppl"] = row["ppl"] or {}
    return {"dense": data["dense"], "rows": [row]}, None


def merged(old: dict | None, new: dict) -> dict:
    """`new`'s measured values over `old`'s (None means not measured)."""
    return {**(old or {}), **{k: v for k, v in new.items() if v is not None}}


def markdown(reports: list[dict], src_in: str, src_out: str, labels: list[str | None] | None = None) -> str:
    depth = {r["layers"]: r["sparsity"] for rep in reports for r in rep["rows"] if r["sparsity"] is not None}
    table: dict = {}
    dense: dict = {}
    for rep, label in zip(reports, labels or [None] * len(reports)):
        d = rep["dense"] or {}
        dense = merged(dense, {**{f"ppl:{s}": v["ppl"] for s, v in (d.get("ppl") or {}).items()},
                               **come_eval.task_groups(d)})
        for r in rep["rows"]:
            key = (label or r["method"], r["sparsity"] if r["sparsity"] is not None else depth[r["layers"]])
            table[key] = merged(table.get(key), {"layers": r["layers"], "seconds": r["prune_seconds"],
                                                 **{f"ppl:{s}": v["ppl"] for s, v in r["ppl"].items()},
                                                 **come_eval.task_groups(r)})
    groups = sorted({g for row in [dense, *table.values()] for g in row
                     if g not in ("layers", "seconds") and not g.startswith("ppl:")})

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    def ln(row, src):
        ppl, base = row.get(f"ppl:{src}"), dense.get(f"ppl:{src}")
        return math.log(ppl / base) if ppl and base else None
    head = ["method", "layers", f"PPL {src_in}", "ln", f"PPL {src_out}", "ln", *groups, "pruning s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for (method, s), row in [(("dense", None), {**dense, "layers": None, "seconds": None}),
                             *sorted(table.items(), key=lambda kv: kv[0][1])]:
        name = method if s is None else f"{method} (s={s})"
        lines.append("| " + " | ".join([name, fmt(row["layers"], "d"), fmt(row.get(f"ppl:{src_in}"), ".2f"),
                                         fmt(ln(row, src_in), ".2f"), fmt(row.get(f"ppl:{src_out}"), ".2f"),
                                         fmt(ln(row, src_out), ".2f"), *(fmt(row.get(g), ".3f") for g in groups),
                                         fmt(row["seconds"], ".0f")]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="compare.json or results.json files, each optionally =LABEL")
    ap.add_argument("--in", dest="src_in", default="wiki-offline", help="the in-domain perplexity text")
    ap.add_argument("--out", dest="src_out", default="moby-dick", help="the out-of-domain perplexity text")
    args = ap.parse_args()
    pairs = [as_report(json.loads(Path(path).read_text()), label or None)
             for path, _, label in (r.partition("=") for r in args.reports)]
    print(markdown([rep for rep, _ in pairs], args.src_in, args.src_out, [label for _, label in pairs]), end="")


if __name__ == "__main__":
    main()
