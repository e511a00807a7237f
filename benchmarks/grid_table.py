"""One markdown table from several --compare reports: every method at every sparsity, in-domain and out-of-domain
columns side by side (the tables of docs/results.md and the README are made with it).

    python benchmarks/grid_table.py runs/a/compare.json runs/b/compare.json --in wiki-offline --out moby-dick
    python benchmarks/grid_table.py runs/a/compare.json="come+ α 0.1" ...        # a label for a report's rows

Rows: each method of each report (a method in two reports: the later report wins; a label after "=" names the
rows of a report of one method), per sparsity. Columns: perplexity
and ln(PPL / dense) on the --in and --out texts, the accuracy of each task group (the offline suite averaged,
moby_cloze alone) and the pruning time. The dense row comes from the first report that has every column.
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import come_eval  # noqa: E402


def cells(report: dict, src_in: str, src_out: str, groups: list[str], label: str | None = None) -> dict:
    """{(method, sparsity): row} of one report, each row the table's values (None where not measured)."""
    dense = report["dense"] or {"ppl": {}}
    out = {}
    for r in report["rows"]:
        row = {"layers": r["layers"], "seconds": r["prune_seconds"]}
        for key, src in (("in", src_in), ("out", src_out)):
            ppl = r["ppl"].get(src, {}).get("ppl")
            base = dense["ppl"].get(src, {}).get("ppl")
            row[key] = ppl
            row[f"ln_{key}"] = math.log(ppl / base) if ppl and base else None
        row.update(come_eval.task_groups(r))
        out[label or r["method"], r["sparsity"]] = {**row, **{g: row.get(g) for g in groups}}
    return out


def markdown(reports: list[dict], src_in: str, src_out: str, labels: list[str | None] | None = None) -> str:
    groups = sorted({g for rep in reports for r in rep["rows"] for g in come_eval.task_groups(r)})
    table = {}
    for rep, label in zip(reports, labels or [None] * len(reports)):
        table.update(cells(rep, src_in, src_out, groups, label))
    dense = next(rep["dense"] for rep in reports if rep["dense"] and src_in in rep["dense"]["ppl"])
    head = ["method", "layers", f"PPL {src_in}", "ln", f"PPL {src_out}", "ln", *groups, "pruning s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    dense_groups = come_eval.task_groups(dense)
    lines.append("| dense | | " + " | ".join([f"{dense['ppl'][src_in]['ppl']:.2f}", "0",
                                                 f"{dense['ppl'].get(src_out, {}).get('ppl', float('nan')):.2f}", "0"]
                                                + [f"{dense_groups.get(g, float('nan')):.3f}" for g in groups])
                 + " | |")

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    for sparsity in sorted({s for _, s in table}):
        for (method, s), row in table.items():
            if s == sparsity:
                lines.append("| " + " | ".join([f"{method} (s={s})", str(row["layers"]), fmt(row["in"], ".2f"),
                                                 fmt(row["ln_in"], ".2f"), fmt(row["out"], ".2f"),
                                                 fmt(row["ln_out"], ".2f"), *(fmt(row[g], ".3f") for g in groups),
                                                 fmt(row["seconds"], ".0f")]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="compare.json files, each optionally =LABEL")
    ap.add_argument("--in", dest="src_in", default="wiki-offline", help="the in-domain perplexity text")
    ap.add_argument("--out", dest="src_out", default="moby-dick", help="the out-of-domain perplexity text")
    args = ap.parse_args()
    paths = [r.partition("=") for r in args.reports]
    reports = [json.loads(Path(path).read_text()) for path, _, _ in paths]
    print(markdown(reports, args.src_in, args.src_out, [label or None for _, _, label in paths]), end="")


if __name__ == "__main__":
    main()
