"""Write held-out selection text: text that no calibration, training or test evaluation reads.

    python benchmarks/heldout_text.py --first 256 --rows 128 --out /tmp/heldout.txt     # in-domain (come+ selection)
    python benchmarks/heldout_text.py --first -160 --out /tmp/heldout-post.txt         # post-training selection
    python benchmarks/heldout_text.py --source moby-dick --out /tmp/heldout-book.txt    # out of domain
    python benchmarks/heldout_text.py --source kjv --out /tmp/sel-kjv.txt              # shakespeare, python-docs too

wiki-offline: rows of the training split in the seeded order calibration takes them (`come_eval.shuffled_rows`);
calibration takes the first `--nsamples` rows and post-training the first `--train-samples`, so rows from 256 on
(come+ at 256 calibration rows) and the last 160 (post-training reads at most 1,024) are never seen.
moby-dick: the book's selection part (its odd-numbered chapters; the test part, `--eval-ppl moby-dick`, and the
`moby_cloze` task use the even-numbered ones), in reading order.
shakespeare, kjv, python-docs: the domain's selection part (unit 1 of every four; `come_eval.domain_rows`).
The text is joined with blank lines; use the file as `--eval-ppl FILE` (a .txt file is tokenized as it is).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import come_eval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=("wiki-offline", "moby-dick", *come_eval.DOMAINS), default="wiki-offline")
    ap.add_argument("--first", type=int, default=0,
                    help="wiki-offline: index of the first row (negative: from the end)")
    ap.add_argument("--rows", type=int, help="number of rows (default: to the end)")
    ap.add_argument("--seed", type=int, default=10, help="the calibration seed (default 10)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.source != "wiki-offline":
        rows = come_eval.book_rows("train") if args.source == "moby-dick" else come_eval.domain_rows(args.source,
                                                                                                    "select")
        start = 0
    else:
        rows = come_eval.shuffled_rows("wiki-offline", args.seed)
        start = args.first % len(rows)
    chosen = rows[start:start + args.rows if args.rows else None]
    Path(args.out).write_text("\n\n".join(chosen))
    print(f"{len(chosen)} rows ({start}..{start + len(chosen) - 1} of {len(rows)}) of {args.source} -> {args.out}")


if __name__ == "__main__":
    main()
