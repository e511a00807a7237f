"""How far post-training recovers on text domains it never trained or selected on: leave-one-domain-out.

    python benchmarks/domain_recovery.py --plan START/come_plan.json --out runs/lodo \
        --recipes mix=calib+austen self=calib+self broad=calib+austen+OTHERS --select-samples 128 \
        --final-samples 1024

The calibration domain (wiki-offline) is always trained on; each other evaluation domain h (moby-dick and the
repository's domains: shakespeare, kjv, python-docs) is held out in turn. A recipe is a `--train-data` mix; OTHERS
stands for the training parts of the repository's domains other than h (Moby Dick has no training part), so such a
recipe trains once per h, a recipe without it once for all.

1. Selection: every recipe is trained from the same start (`--apply-plan PLAN --post-train best --train-data MIX
   --train-samples S`) and scored on the selection parts of every domain (benchmarks/heldout_text.py's texts).
2. Choice, for each h: among the runs whose training text excludes h, the one whose worst share of the log gap
   closed over the selection parts of the domains other than h is largest (the calibration domain included).
3. Report, with --final-samples: each h's chosen recipe trained at that size, scored on the test parts; the share of
   h's log gap it closes, with the mean and the worst over h.

Each run is a come.py command (printed, with its log next to its results.json under --out); --parallel runs share the
cores (one thread each). A finished run is read, not rerun. `lodo.json` and `lodo.md` hold the tables.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import come_eval  # noqa: E402

CALIB = "wiki-offline"
HELD_OUT = ("moby-dick", *come_eval.DOMAINS)


def selection_files(out: Path) -> dict[str, str]:
    """domain -> its selection text as a file (wiki-offline: the 160 rows no run reads; the others: their parts)."""
    files = {}
    for domain in (CALIB, *HELD_OUT):
        path = out / f"select-{domain}.txt"
        if not path.is_file():
            rows = come_eval.shuffled_rows(CALIB, 10)[-160:] if domain == CALIB else \
                come_eval.book_rows("train") if domain == "moby-dick" else come_eval.domain_rows(domain, "select")
            path.write_text("\n\n".join(rows))
        files[domain] = str(path)
    return files


def runs_of(recipes: dict[str, str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(run name, --train-data and any further flags, held-out domains it serves): one run per h for an OTHERS
    recipe."""
    runs = []
    for name, mix in recipes.items():
        if "OTHERS" not in mix:
            runs.append((name, mix, HELD_OUT))
            continue
        for h in HELD_OUT:
            others = "+".join(d for d in come_eval.DOMAINS if d != h)
            runs.append((f"{name}-without-{h}", mix.replace("OTHERS", others), (h,)))
    return runs


def run_all(jobs: list[tuple[str, list[str]]], out: Path, parallel: int) -> dict[str, dict]:
    """Run come.py for each (name, args) not finished yet, `parallel` at a time; name -> results.json."""
    waiting, running, env = list(jobs), {}, {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while waiting or running:
        while waiting and len(running) < parallel:
            name, args = waiting.pop(0)
            if (out / name / "results.json").is_file():
                continue
            cmd = [sys.executable, str(ROOT / "come.py"), *args, "--save", str(out / name), "--overwrite"]
            print(" ".join(cmd[1:]), flush=True)
            log = open(out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                print(f"{name}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
        time.sleep(2)
    return {name: json.loads((out / name / "results.json").read_text()) for name, _ in jobs
            if (out / name / "results.json").is_file()}


def closed(result: dict, source: str) -> dict:
    """PPL before and after training, and the share of the start's log gap to the dense model closed."""
    ppl = {k: result[k]["ppl"][source]["ppl"] for k in ("dense", "pruned", "post_trained")}
    gap = math.log(ppl["pruned"] / ppl["dense"])
    return {**ppl, "closed": 1 - math.log(ppl["post_trained"] / ppl["dense"]) / gap}


def choose(table: dict[str, dict[str, dict]], runs) -> dict[str, str]:
    """held-out domain h -> the run, among those whose training excludes h, with the largest worst share closed on
    the selection parts of the domains other than h (h's own selection part is never read)."""
    choice = {}
    for h in HELD_OUT:
        scored = {name: min(r["closed"] for d, r in table[name].items() if d != h) for name, _, hs in runs
                  if h in hs and name in table}
        if scored:
            choice[h] = max(scored, key=scored.get)
    return choice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, help="the start: a come_plan.json")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--recipes", nargs="+", required=True, help="NAME=MIX [FLAGS], MIX a --train-data mix (OTHERS: "
                    "see above), FLAGS more come.py flags of that recipe, e.g. 'cuts=calib+austen --no-train-all'")
    ap.add_argument("--select-samples", type=int, default=128, help="training rows of the selection runs")
    ap.add_argument("--final-samples", type=int, help="training rows of the final runs (default: no final runs)")
    ap.add_argument("--eval-windows", type=int, default=4, help="selection: windows of 2048 tokens a text (default 4)")
    ap.add_argument("--final-windows", type=int, default=8, help="final runs: windows of 2048 tokens a test part")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--extra", default="", help="more come.py flags for every run, e.g. '--lr 1e-4'")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = dict(r.split("=", 1) for r in args.recipes)
    files = selection_files(args.out)
    runs = runs_of(recipes)
    common = ["--apply-plan", args.plan, "--post-train", "best", *args.extra.split()]
    sel = run_all([(f"select-{name}", [*common, "--train-data", *mix.split(), "--train-samples",
                                       str(args.select_samples),
                                       "--eval-windows", str(args.eval_windows), "--eval-ppl", *files.values()])
                   for name, mix, _ in runs], args.out, args.parallel)
    table = {name: {d: closed(sel[f"select-{name}"], files[d]) for d in files} for name, _, _ in runs
             if f"select-{name}" in sel}
    choice = choose(table, runs)
    report = {"recipes": recipes, "selection": table, "choice": choice, "selection_samples": args.select_samples}
    lines = ["| run | " + " | ".join(files) + " | worst |", "|---|" + "---|" * (len(files) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{r[d]['post_trained']:.2f} ({100 * r[d]['closed']:.1f} %)" for d in files)
              + f" | {100 * min(v['closed'] for v in r.values()):.1f} % |" for name, r in table.items()]
    lines += ["", "| held out | chosen (worst share closed on the other domains' selection parts) |", "|---|---|"]
    lines += [f"| {h} | {name} |" for h, name in choice.items()]
    if args.final_samples:
        mixes = {name: mix for name, mix, _ in runs}
        final = run_all([(f"final-{name}", [*common, "--train-data", *mixes[name].split(), "--train-samples",
                                            str(args.final_samples), "--eval-windows", str(args.final_windows),
                                            "--eval-ppl", CALIB, *HELD_OUT])
                         for name in dict.fromkeys(choice.values())], args.out, args.parallel)
        report["final"] = {h: {"run": name, **{d: closed(final[f"final-{name}"], d) for d in (CALIB, *HELD_OUT)}}
                           for h, name in choice.items() if f"final-{name}" in final}
        shares = [report["final"][h][h]["closed"] for h in report["final"]]
        lines += ["", "| held out | run | test PPL: start -> after | share of the log gap closed | in domain "
                  f"({CALIB}) closed |", "|---|---|---|---|---|"]
        lines += [f"| {h} | {r['run']} | {r[h]['pruned']:.2f} -> {r[h]['post_trained']:.2f} | "
                  f"{100 * r[h]['closed']:.1f} % | {100 * r[CALIB]['closed']:.1f} % |"
                  for h, r in report["final"].items()]
        if shares:
            lines += ["", f"mean {100 * sum(shares) / len(shares):.1f} %, worst {100 * min(shares):.1f} %"]
    (args.out / "lodo.json").write_text(json.dumps(report, indent=1))
    (args.out / "lodo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
