"""Does the paper setting run on this GPU? Every phase of come.py on a random full-size Llama-2-7b, in bfloat16,
under a 40 GiB budget (an A100-40GB), with the planned and the measured memory side by side.

    python benchmarks/gpu_acceptance.py                      # writes gpu_acceptance/{acceptance.md,acceptance.json}
    python benchmarks/gpu_acceptance.py --budget-gib 24      # another budget; --out DIR, --keep to keep the model
    python benchmarks/gpu_acceptance.py --deadline-s 480     # start no phase after 8 minutes (the table says which)
    python benchmarks/gpu_acceptance.py --parallel 1         # one phase at a time (default: up to 4 side by side)

Needs a CUDA GPU with at least the budget free, torch, transformers and accelerate (no hub, no network, no pip,
no datasets or lm-eval): the model is built from come's built-in Llama-2-7b config with random weights (the merge
decisions mean nothing; memory and time are real), the tokenizer is the repository's byte-level one and the text
is data/moby_dick.txt. On a GPU larger than the budget, torch.cuda.set_per_process_memory_fraction enforces it
and --gpu-gib tells the plan, so a run that would not fit an A100-40GB fails here as it would there.

Phases (each one come.py process): prune with the hidden-state cache on the GPU, in host memory and on disk;
come+; one CoMe-P step; CoMe-mp and CoMe-sp (training state offloaded to the host) and --post-train best on the
pruned plan; the speed of the pruned model against the dense one (--latency, SLEB's protocol); and a prune with 8
decoder layers offloaded (--offload-layers 8, forced) and the cache in host memory under a 16 GiB budget.
The memory cap applies to the run's device; come.py releases the allocator's cache between phases, so each phase's
peak reserved memory is its own and is judged against that phase's plan. Phases run side by side (`schedule`): a
phase starts once the phases it replays have finished and its own dry-run plan fits, with those of the running
phases, in the free GPU, host and disk (each process is capped at its budget all the same); the table says which
phases ran beside which, since wall times then share the machine. For each: planned GPU and host
GiB, measured peak reserved and allocated GPU memory and peak host RSS, wall time. Exit status 1 when a measured
peak exceeds its plan or a phase fails.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# one phase = one come.py process: (name, come.py arguments, GPU budget in GiB or None for the run's budget)
CALIB_WINDOWS, CALIB_SEQLEN, TRAIN_WINDOWS, TRAIN_SEQLEN = 16, 2048, 8, 512

# Run come.py's CLI in this process with the GPU budget enforced, then report this process's peak RSS.
LAUNCHER = """
import json, resource, runpy, sys
import torch
budget, out, device = float(sys.argv[1]), sys.argv[2], torch.device(sys.argv[3])
if torch.cuda.is_available() and budget > 0:        # the cap applies to the run's device, not to GPU 0
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / total), index)
sys.argv = sys.argv[4:]                 # come.py's path, then its arguments
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(out, "w") as f:
        json.dump({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}, f)
"""


def phases(model: Path, calib: Path, train: Path, work: Path, budget: float, device: str, layers: int = 32) \
        -> list[tuple]:
    """The phases of the acceptance run: (name, come.py arguments, GPU budget in GiB)."""
    common = ["--model", str(model), "--device", device, "--dtype", "bfloat16", "--seqlen", str(CALIB_SEQLEN),
              "--calib", str(calib), "--eval-ppl", str(calib), "--eval-windows", "2", "--no-eval-dense",
              "--overwrite"]
    pruned = work / "come-gpu" / "come_plan.json"
    train_args = ["--apply-plan", str(pruned), "--train-data", str(train), "--train-seqlen", str(TRAIN_SEQLEN)]
    gpu = device.startswith("cuda")       # on a CPU (the test of this script) the GPU-only settings are replaced
    return [
        ("prune come, cache on the GPU", common + ["--sparsity", "0.3", "--cache", "gpu" if gpu else "host"], budget,
         "come-gpu"),
        ("prune come, cache in host memory", common + ["--sparsity", "0.3", "--cache", "host"], budget, "come-host"),
        ("prune come, cache on disk", common + ["--sparsity", "0.3", "--cache", "disk"], budget, "come-disk"),
        ("prune come+", common + ["--method", "come+", "--sparsity", "0.3"], budget, "come-plus"),
        ("one CoMe-P step", common + ["--method", "come-p", "--target-layers", str(layers - 1)], budget, "come-p"),
        ("CoMe-mp post-training", common + train_args + ["--post-train", "mp"], budget, "mp"),
        ("CoMe-sp post-training, offload", common + train_args + ["--post-train", "sp", "--train-memory",
                                                                         "offload"], budget, "sp"),
        ("--post-train best", common + train_args + ["--post-train", "best"], budget, "best"),
        # the speed of the pruned model against the dense one (SLEB's protocol on a GPU; a token's worth on a CPU)
        ("--latency, dense and pruned", common + ["--apply-plan", str(pruned), "--latency"]
         + ([] if gpu else ["--latency-sizes", "prompt=32,iters=1,gen_batch=2,gen_prompt=8,new=4,gen_iters=1"]),
         budget, "latency"),
        # the offload path forced: 8 of 32 layers off the GPU (3 GiB of 12.6), the cache in host memory
        ("prune come, layers offloaded, 16 GiB", common + ["--sparsity", "0.3", "--cache", "host", "--offload-layers",
                                                          "8" if gpu else "2"], min(budget, 16.0), "offload"),
    ]


def build_model(folder: Path, device: str, shape: dict | None = None) -> None:
    """A random Llama-2-7b (come's built-in config; `shape` overrides fields) in bfloat16 with the repository's
    byte-level tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    sys.path.insert(0, str(REPO))
    import come_runtime
    family, fields = come_runtime.PAPER_CONFIGS["llama-2-7b"]
    tokenizer = AutoTokenizer.from_pretrained(REPO / "tiny_models" / "tokenizer")
    config = AutoConfig.for_model(family, **{**fields, **(shape or {}),
                                             "bos_token_id": tokenizer.bos_token_id,
                                             "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():       # distinct layers, so that scores and merges are not degenerate
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def text_files(work: Path) -> tuple[Path, Path]:
    """Calibration and training text: the first bytes of the book (one token a byte with this tokenizer)."""
    book = (REPO / "data" / "moby_dick.txt").read_text(encoding="utf-8")
    calib, train = work / "calib.txt", work / "train.txt"
    calib.write_text(book[:CALIB_WINDOWS * CALIB_SEQLEN - 1], encoding="utf-8")
    train.write_text(book[-TRAIN_WINDOWS * TRAIN_SEQLEN + 1:], encoding="utf-8")
    return calib, train


def phase_command(args: list[str], budget: float, work: Path, label: str, device: str, dry_run: bool = False) \
        -> list[str]:
    """The come.py process of a phase, under the launcher that caps its GPU memory and reports its peak RSS; with
    `dry_run`, come.py alone planning the same run (no weights, no GPU work)."""
    results = work / f"{label}.{'plan' if dry_run else 'results'}.json"
    tail = [*args, "--save", str(work / label), "--results", str(results)] + \
        (["--gpu-gib", str(budget)] if device.startswith("cuda") else [])
    if dry_run:
        return [sys.executable, str(REPO / "come.py"), *tail, "--dry-run"]
    return [sys.executable, "-c", LAUNCHER, str(budget if device.startswith("cuda") else 0),
            str(work / f"{label}.rss.json"), device, str(REPO / "come.py"), *tail]


def phase_plan(args: list[str], budget: float, work: Path, label: str, device: str) -> dict[str, float]:
    """What a phase's own memory plan says it needs at its peak (GiB of GPU, host and disk), from a dry run of the
    same command (one that does not fit exits 2 and still writes its plan); unknown parts count as 0."""
    subprocess.run(phase_command(args, budget, work, label, device, dry_run=True), cwd=REPO, capture_output=True)
    path = work / f"{label}.plan.json"
    memory = json.loads(path.read_text())["memory"] if path.is_file() else {}
    return {k: max((v.get(f"{k}_gib", 0.0) for v in memory.values()), default=0.0) for k in ("gpu", "host", "disk")}


def phase_row(name: str, label: str, work: Path, returncode: int, seconds: float, output: str) -> dict:
    """One finished come.py process: its plan, its measured peaks, its wall time."""
    results, rss = work / f"{label}.results.json", work / f"{label}.rss.json"
    row = {"phase": name, "seconds": round(seconds, 1), "returncode": returncode}
    if returncode != 0 or not results.is_file():
        return {**row, "error": output[-2000:]}
    res = json.loads(results.read_text())
    plan, summary = res["memory_plan"], res["summary"]
    peaks = summary.get("gpu_peaks", {})
    row.update(planned_gpu_gib=max(v["gpu_gib"] for v in plan["memory"].values()),
               planned_host_gib=max(v["host_gib"] for v in plan["memory"].values()),
               reserved_gib=max((p["reserved_gib"] for p in peaks.values()), default=0.0),
               allocated_gib=max((p["allocated_gib"] for p in peaks.values()), default=0.0),
               peak_rss_gib=round(json.loads(rss.read_text())["peak_rss_gib"], 2),
               cache=plan["cache"], offload_layers=plan.get("offload_layers", 0),
               per_phase={k: {"planned_gpu_gib": plan["memory"].get(come_phase(k), {}).get("gpu_gib"), **v}
                          for k, v in peaks.items()}, speedup=(res.get("latency") or {}).get("speedup"))
    # host memory judged phase by phase: come.py restarts its peak at every phase, so the process's ru_maxrss is
    # the last phase's only; each phase's own peak (Linux) against its plan, the whole process's where there is none
    host = {k: {"planned_host_gib": plan["memory"].get(come_phase(k), {}).get("host_gib"), "host_gib": v}
            for k, v in summary.get("host_peaks_gib", {}).items()}
    row["host_per_phase"] = host
    host_ok = all(v["planned_host_gib"] is None or v["host_gib"] <= v["planned_host_gib"] for v in host.values()) \
        if host else row["peak_rss_gib"] <= row["planned_host_gib"]
    row["within_plan"] = host_ok and all(v["planned_gpu_gib"] is not None and v["reserved_gib"] <= v["planned_gpu_gib"]
                                         for v in row["per_phase"].values())
    return row


def schedule(phases: list[dict], capacity: dict[str, float], start, wait, deadline_s: float | None = None,
             parallel: int = 4, clock=time.perf_counter, on_row=None) -> list[dict]:
    """Run phases side by side as far as their own plans allow.

    `phases`: dicts with "name", "label", "needs" (labels that must finish first) and "plan" (a callable giving the
    phase's planned GiB of "gpu", "host" and "disk", asked once the phase is ready). A ready phase starts when the
    planned needs of the running phases plus its own fit `capacity` in every resource and fewer than `parallel` run;
    a phase alone always starts (its own memory cap bounds it). `start(phase)` launches it; `wait(running)` blocks
    until one of the running phases ends and returns (label, row). Past `deadline_s` nothing starts: the phases left
    get {"phase", "cut": True} rows. `on_row(rows so far)` after every row. Rows come back in the phases' order; each
    row says which phases ran beside it ("beside")."""
    pending, running, rows, t0 = list(phases), {}, {}, clock()
    while pending or running:
        if deadline_s is not None and clock() - t0 > deadline_s:
            for ph in pending:
                rows[ph["label"]] = {"phase": ph["name"], "cut": True, "seconds": 0.0}
            pending = []
        for ph in list(pending):
            if any(n not in rows for n in ph["needs"]) or len(running) >= parallel:
                continue
            if "need" not in ph:        # a dry run: asked once, when the phase is ready
                ph["need"] = ph["plan"]()
            used = {k: sum(r["need"].get(k, 0.0) for r, _ in running.values()) for k in capacity}
            if running and any(used[k] + ph["need"].get(k, 0.0) > capacity[k] for k in capacity):
                continue
            beside = sorted(r["name"] for r, _ in running.values())
            running[ph["label"]] = (ph, start(ph))
            for r, _ in running.values():
                r.setdefault("beside", set()).update(set(beside + [ph["name"]]) - {r["name"]})
            pending.remove(ph)
        if not running and pending:
            raise ValueError(f"phases {[ph['label'] for ph in pending]} need phases that never ran")
        if running:
            label, row = wait(running)
            ph, _ = running.pop(label)
            rows[label] = {**row, "beside": sorted(ph.get("beside", ()))}
        if on_row:
            on_row([rows[ph["label"]] for ph in phases if ph["label"] in rows])
    return [rows[ph["label"]] for ph in phases]


def come_phase(peak_phase: str) -> str:
    """The memory-plan phase that bounds a phase of come.py's measured peaks."""
    return {"load": "evaluate"}.get(peak_phase, peak_phase)     # the plan has its own "evaluate post-trained"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| phase | planned GPU GiB | reserved GiB | allocated GiB | planned host GiB | peak RSS GiB "
             "| wall s | within plan | ran beside |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("cut"):
            lines.append(f"| {r['phase']} | cut: past the deadline | | | | | | not run | |")
            continue
        if "error" in r:
            lines.append(f"| {r['phase']} | failed (exit {r['returncode']}) | | | | | {r['seconds']} | no | "
                         f"{', '.join(r.get('beside', []))} |")
            continue
        lines.append(f"| {r['phase']} | {r['planned_gpu_gib']:.2f} | {r['reserved_gib']:.2f} | "
                     f"{r['allocated_gib']:.2f} | {r['planned_host_gib']:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['seconds']} | {'yes' if r['within_plan'] else '**no**'} | {', '.join(r.get('beside', []))} |")
    lines += [f"\n{r['phase']}: speedup {r['speedup']['prompt']:.2f}x prompt processing, "
              f"{r['speedup']['generation']:.2f}x generation ({r['speedup']['layers']:.2f}x fewer layers)"
              for r in rows if r.get("speedup")]
    return "\n".join(lines) + "\n"


def start_process(ph: dict, work: Path):
    """Launch a phase's command, its output to a file (a pipe that nobody reads would stall it when full)."""
    log = (work / f"{ph['label']}.log").open("w")
    return time.perf_counter(), subprocess.Popen(ph["command"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_processes(running: dict, work: Path, keep: set[str] = frozenset()) -> tuple[str, dict]:
    """Wait until one of the running phases' processes ends; (its label, its row). Its saved model is removed
    unless its label is in `keep`."""
    while True:
        for label, (ph, (began, proc)) in running.items():
            if proc.poll() is not None:
                if label not in keep:
                    shutil.rmtree(work / label, ignore_errors=True)
                output = (work / f"{label}.log").read_text(errors="replace")
                return label, phase_row(ph["name"], label, work, proc.returncode, time.perf_counter() - began,
                                        output) | {"started_s": began, "ended_s": time.perf_counter()}
        time.sleep(0.5)


# the post-training and latency phases replay the model the first prune saved
NEEDS = {"mp": ["come-gpu"], "sp": ["come-gpu"], "best": ["come-gpu"], "latency": ["come-gpu"]}


def capacity_of(device: str, work: Path) -> dict[str, float]:
    """GiB free now: GPU memory (less one CUDA context per process, counted in each phase's need), host memory
    (MemAvailable), and disk under the work folder."""
    import torch
    gpu = torch.cuda.mem_get_info(torch.device(device))[0] / GIB if device.startswith("cuda") else float("inf")
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()) \
        if Path("/proc/meminfo").is_file() else {}
    host = int(info["MemAvailable"].split()[0]) / 2**20 if "MemAvailable" in info else float("inf")
    return {"gpu": gpu, "host": host, "disk": shutil.disk_usage(work).free / GIB}


def acceptance(out: Path, budget: float, device: str = "cuda", shape: dict | None = None,
               keep: bool = False, deadline_s: float | None = None, parallel: int = 4) -> tuple[list[dict], str]:
    """Build the model, run the phases (side by side as far as their plans and `parallel` allow: `schedule`), write
    acceptance.md and acceptance.json to `out` after every phase; a phase that would start after `deadline_s` seconds
    is cut (listed as such); (rows, markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    scratch = shm if shm.is_dir() and shutil.disk_usage(shm).free > 60 * GIB else out     # fast writes when it can
    work = Path(tempfile.mkdtemp(prefix="come-acceptance-", dir=scratch))
    try:
        t0 = time.perf_counter()
        build_model(work / "model", device, shape)
        calib, train = text_files(work)
        print(f"model built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
        header = acceptance_header(budget, device, shape)
        layers, context = (shape or {}).get("num_hidden_layers", 32), 0.5 * device.startswith("cuda")
        todo = []
        for name, args, phase_budget, label in phases(work / "model", calib, train, work, budget, device, layers):
            def plan(a=args, b=phase_budget, lab=label) -> dict:     # plus the process's own CUDA context
                need = phase_plan(a, b, work, lab, device)
                return {**need, "gpu": need["gpu"] + context}
            todo.append({"name": name, "label": label, "needs": NEEDS.get(label, []), "plan": plan,
                         "command": phase_command(args, phase_budget, work, label, device)})

        def written(rows):          # after every phase: a run stopped early keeps its table
            (out / "acceptance.md").write_text(markdown(rows, header))
            (out / "acceptance.json").write_text(json.dumps({"budget_gib": budget, "device": device, "rows": rows},
                                                            indent=1))
            if rows:
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("per_phase", "host_per_phase")}),
                      flush=True)
        left = None if deadline_s is None else deadline_s - (time.perf_counter() - t0)    # the build counts
        rows = schedule(todo, capacity_of(device, work), lambda ph: start_process(ph, work),
                        lambda running: wait_processes(running, work, keep={"come-gpu"}),     # later phases replay it
                        left, parallel, on_row=written)
        written(rows)
        return rows, markdown(rows, header)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def acceptance_header(budget: float, device: str, shape: dict | None) -> str:
    import torch
    import transformers
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    return (f"Random Llama-2-7b{f' with {shape}' if shape else ''}, bfloat16, {CALIB_WINDOWS} calibration "
            f"windows of {CALIB_SEQLEN}, {TRAIN_WINDOWS} training windows of {TRAIN_SEQLEN}; {name}, budget "
            f"{budget:g} GiB (16 for the offload phase); torch {torch.__version__}, transformers "
            f"{transformers.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=40.0, help="GPU memory budget (default 40: an A100-40GB)")
    ap.add_argument("--out", type=Path, default=Path("gpu_acceptance"), help="where the table and JSON go")
    ap.add_argument("--keep", action="store_true", help="keep the random model and the pruned folders")
    ap.add_argument("--parallel", type=int, default=4, help="at most this many phases at once (default 4), as far "
                    "as their plans fit the free GPU, host and disk together")
    ap.add_argument("--deadline-s", type=float, help="start no phase after this many seconds (the table says which "
                    "were cut); e.g. 480 inside a 10-minute call")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_acceptance.py checks come.py on a CUDA GPU, and torch sees none here (torch.cuda.is_available() "
              "is False). Run it on a machine with a GPU; on this one, `python come.py --dry-run --device cuda "
              "--gpu-gib 40 --model meta-llama/Llama-2-7b-hf` prints the plan without one.", file=sys.stderr)
        return 2
    free = torch.cuda.mem_get_info()[0] / GIB
    if free < args.budget_gib:
        print(f"the GPU has {free:.1f} GiB free, less than the {args.budget_gib:g} GiB budget: pass a smaller "
              "--budget-gib", file=sys.stderr)
        return 2
    rows, text = acceptance(args.out, args.budget_gib, keep=args.keep, deadline_s=args.deadline_s,
                            parallel=args.parallel)
    print(text)
    ok = all("error" not in r and not r.get("cut") and r["within_plan"] for r in rows)
    print("all phases within their plans" if ok else "some phase failed or exceeded its plan", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
