"""Benchmark: SmolLM2-135M-Instruct, CoMe vs dropping the lowest-BI layers, at several sparsities.

Reports wiki-offline test perplexity (full split, 2048-token windows), pruning wall time, and the wall time
of one full calibration pass of the dense model (the unit of the SPEC §7 performance target).

    python benchmarks/smollm2_sparsity.py [--sparsities 0.1,0.2,0.3] [--out benchmarks/smollm2_sparsity.json]
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import come  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.1,0.2,0.3")
    ap.add_argument("--fold-norms", action="store_true")
    ap.add_argument("--out", default="benchmarks/smollm2_sparsity.json")
    args = ap.parse_args()
    model, tok = come.load_model(come.SMOLLM2, "cpu", torch.float32)
    calib = come.calibration_windows("wiki-offline", tok, 256, 2048, 10)
    test = come.eval_tokens("wiki-offline", tok, 2048)
    t0 = time.perf_counter()
    come.HiddenStates(model, calib).refresh(0)
    full_pass = time.perf_counter() - t0
    rows = [{"method": "dense", "layers": 30, "ppl": come.perplexity(model, test, 2048)["ppl"]}]
    print(rows[-1], f"full calibration pass {full_pass:.1f}s", flush=True)
    for s in map(float, args.sparsities.split(",")):
        target = 30 - come.layers_to_remove(model, s)
        for method in ("come", "bi-drop"):
            pruned = copy.deepcopy(model)
            t0 = time.perf_counter()
            if method == "come":
                result = come.come_prune(pruned, calib, target, come.ComeConfig(fold_norms=args.fold_norms))
                steps = len(result["steps"])
            else:
                come.shortgpt_drop(pruned, calib, target)
                steps = 0
            seconds = time.perf_counter() - t0
            rows.append({"method": method, "sparsity": s, "layers": target, "steps": steps,
                         "prune_seconds": round(seconds, 1), "ppl": come.perplexity(pruned, test, 2048)["ppl"]})
            if steps:
                rows[-1]["target_seconds"] = round(0.6 * steps * full_pass, 1)
            print(rows[-1], flush=True)
            del pruned
    Path(args.out).write_text(json.dumps({"full_pass_seconds": round(full_pass, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
