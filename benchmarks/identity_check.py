"""Fingerprint every method's plan and pruned weights on the tiny models, to show a refactor changes neither.

    python benchmarks/identity_check.py > before.json      # on the old code
    python benchmarks/identity_check.py > after.json       # on the new code
    diff before.json after.json                            # empty: plans and weights bit-identical

Each entry: the method and its options, the sha256 of the plan's steps and tree (timings removed, JSON with sorted
keys) and the sha256 of every tensor of the pruned model (in state-dict order), on a tiny random model
(tiny_models/) calibrated on the same 8 windows of 32 random tokens.
"""
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import come                                     # noqa: E402
from conftest import make_tiny                  # noqa: E402

RUNS = [("come", {}), ("come-p", {"granularity": 4}), ("come+", {}), ("come", {"skip_score": "sleb"}),
        ("come", {"skip_score": "merge", "fold_norms": True}), ("come", {"allow_remerge": True, "span": 3}),
        ("come", {"repair": "lstsq", "repair_o": True, "repair_target": "dense"}),
        ("come", {"repair": "scale", "repair_alpha": "auto"}), ("come", {"score_windows": 3, "skip_score": "sleb"}),
        ("shortgpt", {}), ("shortgpt", {"repair": "lstsq"}), ("sleb", {}), ("sleb", {"repair": "lstsq"}),
        ("reverse", {}), ("reverse", {"repair": "lstsq"}), ("replaceme", {}), ("laco", {"span": 4}),
        ("weightsum", {})]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Record names that changed without changing what they hold, mapped to the older name: the calibration NLLs behind
# --skip-score sleb|merge were recorded as "sbi"; a drop of one layer was recorded without its count.
OLD_NAMES = {"skip_nll": "sbi", "skip_nll_all": "sbi_all"}


def untimed(record: dict) -> dict:
    """The record without timings, in the older names (OLD_NAMES), a drop's count of 1 left implicit."""
    steps = [{OLD_NAMES.get(k, k): v for k, v in s.items() if k != "seconds" and not (k == "count" and v == 1
                                                                                       and "repair" not in s)}
             for s in record["steps"]]
    return {"steps": steps, "tree": record["tree"]}


def main() -> None:
    torch.manual_seed(0)
    out = []
    for family in ("llama-gqa", "qwen2"):
        ids = torch.randint(0, 250, (8, 32), generator=torch.Generator().manual_seed(1))
        for method, opts in RUNS:
            model = make_tiny(family)
            target = len(come.decoder_layers(model)) - 3
            cfg = dataclasses.replace(come.ComeConfig(method=method), **opts)
            if method == "come+":
                cfg = come.come_plus(dataclasses.replace(cfg, method="come"))
            record = come.PRUNERS[method](model, ids, target, cfg)
            weights = hashlib.sha256()
            for t in model.state_dict().values():
                weights.update(t.detach().contiguous().numpy().tobytes())
            tensors = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16]
                       for k, v in record.get("tensors", {}).items()}
            out.append({"family": family, "method": method, "options": opts, "plan": digest(untimed(record)),
                        "tensors": tensors, "weights": weights.hexdigest()[:16],
                        "layers": len(come.decoder_layers(model))})
            print(f"{family} {method} {opts}: {out[-1]['plan']} {out[-1]['weights']}", file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
