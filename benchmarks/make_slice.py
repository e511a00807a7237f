"""Write a width-faithful slice of a large model: its real layer shapes, a few layers, random weights.

    python benchmarks/make_slice.py --like llama-2-7b --layers 6 --out /tmp/slice-llama2-7b

The slice's memory per layer is the real model's, so come.py's memory plan can be checked against measured peaks on a
machine too small for the model itself. The tokenizer is SmolLM2's (vocabulary 49,152; the real model's vocabulary
is replaced by it so that the offline calibration text tokenizes).
"""
import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import come  # noqa: E402,F401
import come_runtime  # noqa: E402
import come_eval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", default="llama-2-7b", choices=sorted(come_runtime.PAPER_CONFIGS))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(come_eval.smollm2_folder())
    family, fields = come_runtime.PAPER_CONFIGS[args.like]
    config = AutoConfig.for_model(family, **{**fields, "num_hidden_layers": args.layers,
                                             "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                             "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():       # distinct layers, so that the scores and merges are not degenerate
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: {args.like} shapes, {args.layers} layers, {come.count_params(model):,} parameters")


if __name__ == "__main__":
    main()
