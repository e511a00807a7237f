"""CoMe: Concatenation-based layer Merging for LLM depth compression.

Reference implementation of "Layer as Puzzle Pieces: Compressing Large Language Models through Layer
Concatenation" (Wang, Shen, Ding, Xue, Liu, Ding; NeurIPS 2025; arXiv 2510.15304), written from the paper
(the method in our words: docs/method.md; every § below is a section of it), not from the authors' code.

CoMe makes a decoder-only LLM shallower. It scores every attention KV group and FFN neuron (activation x
weight norm), picks the adjacent layers the model can best do without, and concatenates the most important
head groups and neurons of those layers into ONE layer of the original shape; it repeats until the target
depth is reached.

Paper map
    channel sensitivity (activation x weight norm)  -> ffn_neuron_scores, kv_group_scores
    Block Influence BI, skip score SBI (fig. 1)      -> block_influence, skip_influence, skip_nll
    which layers merge                               -> select_window
    merge ratio F_merge (p, rho) and budgets         -> merge_ratios, channel_budgets
    concatenation merge (fig. 1 step 2)              -> concat_merge, apply_merge
    Algorithm 1 (progressive CoMe)                   -> come_prune(method="come"): start_merging (step 1), measure
                                                        (step 3), window_scores (step 4), merge_step (the record)
    Algorithm 2 (progressive posterior CoMe-P)       -> come_prune(method="come-p") -> posterior_ratio, candidate_nll
    sparsity -> layers removed                       -> layers_to_remove
    post-training, hierarchical distillation (fig. 1 step 3; §9; the authors released no code for it)
      Algorithm 3 (CoMe-sp) / Algorithm 4 (CoMe-mp)  -> post_train(mode "sp" / "mp") -> distill_step, distill_loss,
                                                        teacher_states, mp_learning_rates, original_spans
    baselines (§13)                                  -> shortgpt_prune, sleb_prune, laco_prune (rdsc_merge),
                                                        weightsum_prune (weighted_sum_merge), reverse_prune,
                                                        replaceme_prune (ReplaceMe, Shopkhoev et al. 2025),
                                                        shortened_prune (taylor, magnitude: block_importance),
                                                        ppl_prune (Shortened LLaMA, Kim et al. 2024),
                                                        streamline_prune (LLM-Streamline: run_similarities,
                                                        train_replacement), mka_prune (MKA: window_distances,
                                                        diffusion_embedding, npib_similarity)
    evaluation (GPTQ perplexity, lm-eval)            -> come_eval.py: perplexity, task_accuracy, evaluate;
                                                        come_cli.py: main -> run (one call a phase); compare
  [OURS] beyond the paper, each behind a named option (README; docs/results.md, docs/paper-scale.md):
    --fold-norms (norm weights folded into rows)     -> concat_merge(fold_norms=True)
    --skip-score sleb|merge (window by an NLL)       -> window_scores -> skip_nll / merge_scores -> candidate_nll
    --score-windows (NLL choices on fewer windows)   -> HiddenStates.nll_from
    --repair lstsq|scale, --repair-o                 -> repair_merge -> refit_projection (in fp32: float32_layer);
                                                        --repair-alpha auto: leave-one-window-out
    --repair after drops (shortgpt, sleb, reverse)   -> drop_layers(cfg=), drop_blocks_repaired
    --method come+ (the best combination of these)   -> come_plus; its token rule: token_rule,
                                                        come_eval.calibration_with_floor
    --tasks offline, moby_cloze, --eval-ppl moby-dick -> come_eval.py: offline_suite_items, book_cloze_items
    memory plan, --dry-run, cache placement          -> come_runtime.py: memory_plan; come_cli.plan_memory; HiddenStates
    --resume (plan written after every merge step)   -> start_merging(resume=), come_prune(on_step=);
                                                        come_runtime.write_plan
    mp one layer at a time, --save-dtype             -> post_train -> train_layers
    sp --train-memory checkpoint|offload             -> distill_step, layerwise_backward; come_runtime.HostTraining
                                                        (host AdamW); part of the layers on the host:
                                                        TrainConfig.offload_count
    --post-train best (a recipe that recovers)       -> TrainConfig.from_recipe("best"), train_layers(targets "output")
    --offload-layers (device_map, weights off GPU)   -> come_runtime.load_model, materialized; spare_layer, apply_merge
    post-training of dropped models (§14)            -> drop_from_tree (the layer before a cut takes the block's span)
    BI only from the last merge on, on the device    -> measure (MergeRun.stale_from), block_influence(device=)
    --compare --post-train (every start, one recipe) -> come_cli.py: compare, post_trained_row
    --train-data calib+austen, +self, kjv, ... (mix) -> come_eval.mixed_windows, sampled_windows, domain_rows
    --latency (prompt and generation speed)          -> come_eval.measure_latency, speedup

Deviations from the authors' code (each marked `# DEVIATION:` below):
    1. GQA: the query heads of KV group k are heads k*g .. k*g+g-1 (repeat-interleave); the authors tile the mask.
    2. BI/SBI of the last layer use its raw output, not the final-normed hidden state.
    3. BI uses a row-wise cosine, never an N x N similarity matrix.
    4. CoMe-P builds one candidate layer and evaluates it from the cached hidden state; no model deep copies.
    5. When every window is blocked by the no-remerge rule, we say so, record it and re-merge (authors: window 0).
    6. Per-layer config fields (layer_types, max_window_layers) are rebuilt, so saved models reload on transformers 5.
    7. Statistics are running fp32 sums captured by hooks; activations are never copied or stored per token.
    8. Only the layers a merge changed are recomputed: hidden states entering every layer are cached (§7).
    9. CoMe-mp trains its merged layers one after another, not interleaved per batch (same result, less memory).
   10. Taylor: the gradient of the whole calibration loss, read once; the authors' never zeroed gradients are not.
   11. MKA: one diffusion-kernel row per calibration window; the authors' chunking pairs tokens of different windows.
   12. MKA: attention biases are weighted like every other parameter; the authors add both layers' biases unscaled.
Interpretations where neither source fixes the detail are marked `# INTERPRETATION:`.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import hashlib
import importlib
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


# ============================================================================ errors and logging
class ComeError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":      # under torchrun only rank 0 talks
        print(msg, file=sys.stderr, flush=True)


# ============================================================================ config
@dataclasses.dataclass
class ComeConfig:
    """Everything that decides which layers merge and how (§4-§8)."""
    method: str = "come"                 # "come" (Algorithm 1) or "come-p" (Algorithm 2)
    span: int = 2                        # adjacent layers per merge window
    allow_remerge: bool = False          # let a window contain a layer that is already a merge product
    sbi_tokens: str | None = None        # "last" | "all"; None -> method default (come: last, come-p: all)
    skip_score: str = "bi"               # "bi" (SBI cosine), "sleb" (NLL with the window removed), "merge" [OURS]
    p: float = 1.0                       # F_merge sharpening exponent
    rho: float = 0.0                     # F_merge floor for the dominant layer
    granularity: int = 20                # CoMe-P ratio grid {0, 1/G, ..., 1}
    fold_norms: bool = False             # [OURS] fold source RMSNorm weights into the kept rows
    repair: str = "none"                 # [OURS] "none", "lstsq" (ridge refit of down_proj) or "scale" (per channel)
    repair_alpha: float | str = 1e-3     # [OURS] ridge strength, relative to the mean diagonal of Z^T Z, or "auto"
    repair_target: str = "window"        # [OURS] "window": the window's output; "dense": the original model's
    repair_o: bool = False               # [OURS] refit self_attn.o_proj too (first, the MLP held fixed)
    score_windows: int | None = None     # [OURS] calibration windows the NLL-based choices read (None: all)
    repair_floor: int | None = None      # [OURS] come+'s token rule: tokens per d_ff below which the ridge grows
    weight_reduction: str = "sum"        # taylor / magnitude: over a weight's rows (the authors' default)
    block_reduction: str = "sum"         # taylor / magnitude: over a block's weights (the authors' default)

    def tokens_for_sbi(self) -> str:
        return self.sbi_tokens or ("all" if self.method == "come-p" else "last")


# INTERPRETATION: presets apply when a known model is named and --p/--rho are not given (§5).
PAPER_PRESETS = {"qwen2.5-7b": {"p": 32.0, "rho": 0.85}, "mistral-7b": {"rho": 0.97}, "llama-3-8b": {"rho": 0.97},
                 "meta-llama-3-8b": {"rho": 0.97}}


# ============================================================================ model surface
# Per-family facts. Every family uses stock transformers classes with the same layer layout:
# self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm.
FAMILIES = {"llama": "LLaMA (MHA and GQA: Llama-2/3, SmolLM2)", "mistral": "Mistral",
            "qwen2": "Qwen2 / Qwen2.5 (q/k/v bias)", "qwen3": "Qwen3 (q_norm / k_norm)"}


@dataclasses.dataclass(frozen=True)
class AttnShape:
    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv


def attn_shape(config) -> AttnShape:
    n_heads = config.num_attention_heads
    return AttnShape(n_heads, getattr(config, "num_key_value_heads", None) or n_heads,
                     getattr(config, "head_dim", None) or config.hidden_size // n_heads)


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


PER_LAYER_FIELDS = ("layer_types",)      # config lists with one entry per decoder layer (plus max_window_layers)


def count_params(module: nn.Module) -> int:
    """Parameters of a module; a tied embedding / LM head is one Parameter and is counted once."""
    return sum(p.numel() for p in module.parameters())


def layer_type(config, index: int) -> str:
    types = getattr(config, "layer_types", None)
    return types[index] if types else "full_attention"


def query_rows(groups: torch.Tensor, shape: AttnShape) -> torch.Tensor:
    """Output channels of q_proj (= input channels of o_proj) that belong to the given KV groups."""
    # DEVIATION: query heads of group k are k*g .. k*g+g-1 (HF repeat_kv layout); the authors tile the mask.
    heads = (groups[:, None] * shape.group_size + torch.arange(shape.group_size)).reshape(-1)
    return (heads[:, None] * shape.head_dim + torch.arange(shape.head_dim)).reshape(-1)


def kv_rows(groups: torch.Tensor, shape: AttnShape) -> torch.Tensor:
    return (groups[:, None] * shape.head_dim + torch.arange(shape.head_dim)).reshape(-1)


def _move(obj, device, dtype: torch.dtype | None = None):
    """Move tensors inside nested tuples/lists/dicts to `device` (floating ones also to `dtype` when given)."""
    if torch.is_tensor(obj):
        return obj.to(device, dtype) if dtype and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(x, device, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj


# ============================================================================ calibration statistics (hooks)
# DEVIATION: running fp32 sums from hooks; the authors deep-copy activation tensors inside the forward pass.
class ChannelActivity:
    """Running fp32 sums of |input| of one layer's mlp.down_proj and self_attn.o_proj (§3).

    The sums are made on the device the first input arrives on (the layer's compute device, wherever its weights
    are kept). Hooks return None: a forward pre-hook that returns a value would replace the module's input.
    """

    def __init__(self, layer: nn.Module):
        self.layer, self.ffn, self.attn = layer, None, None
        self.tokens, self.calls, self._handles = 0, [0, 0], []

    def _hook(self, which: int):
        def hook(module, args) -> None:
            x = args[0]
            total = torch.sum(x.detach().abs(), dim=tuple(range(x.dim() - 1)), dtype=torch.float32)
            if which == 0:
                self.ffn = total if self.ffn is None else self.ffn.add_(total)
                self.tokens += x.numel() // x.shape[-1]
            else:
                self.attn = total if self.attn is None else self.attn.add_(total)
            self.calls[which] += 1
        return hook

    def __enter__(self):
        self._handles = [self.layer.mlp.down_proj.register_forward_pre_hook(self._hook(0)),
                         self.layer.self_attn.o_proj.register_forward_pre_hook(self._hook(1))]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


class _Catcher(nn.Module):
    """Stands in for a decoder layer to record the arguments the model passes to it.

    Only the catcher of the first layer keeps its input h_0 (moved to `store`); the others pass it on and record
    the layer kwargs of their attention type once.
    """

    def __init__(self, store: torch.device | None, keep: bool):
        super().__init__()
        self.inputs, self.kwargs, self.store, self.keep = [], None, store, keep

    def forward(self, hidden_states, **kwargs):
        if self.keep:
            self.inputs.append(hidden_states.to(self.store) if self.store else hidden_states)
        if self.kwargs is None:
            self.kwargs = {k: v for k, v in kwargs.items() if k != "cache"}
        return hidden_states


def layer_inputs(model, ids: torch.Tensor, batch: int, store: torch.device | None = None) -> tuple[torch.Tensor, dict]:
    """(h_0 of all windows, what the model passes to a decoder layer of each attention type for `batch` windows).

    The kwargs (rotary embeddings, mask) are captured from the model's own forward, so they are exact for every family.
    Each batch's h_0 moves to `store` as it is made, so the device never holds all of them.
    """
    layers = decoder_layers(model)
    catchers = nn.ModuleList(_Catcher(store, keep=i == 0) for i in range(len(layers)))
    model.model.layers = catchers
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch):
                model.model(input_ids=ids[i:i + batch].to(device_of(model.get_input_embeddings())), use_cache=False)
    finally:
        model.model.layers = layers
    kwargs = {layer_type(model.config, i): c.kwargs for i, c in enumerate(catchers)}    # the same for a type's layers
    return torch.cat(catchers[0].inputs), kwargs


def call_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on x, with x and the layer kwargs moved to the layer's device and dtype."""
    p, dev = next(layer.parameters()), device_of(layer)
    return layer(x.to(dev, p.dtype, non_blocking=True), **_move(kwargs, dev, p.dtype))


def token_nll(model, hidden: torch.Tensor, ids: torch.Tensor, normed: bool, chunk: int = 512) -> tuple[float, int]:
    """(sum of next-token NLL, token count) from decoder hidden states, in token chunks to bound logits memory."""
    head = model.get_output_embeddings()
    dev = device_of(head)
    hidden, ids = hidden.to(dev), ids.to(dev)
    hidden = hidden if normed else model.model.norm(hidden)
    total, T = 0.0, ids.shape[1]
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        logits = head(hidden[:, s:e]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, s + 1:e + 1].reshape(-1),
                                 reduction="sum").item()
    return total, ids.shape[0] * (T - 1)


def cache_buffer(like: torch.Tensor, where: str) -> torch.Tensor:
    """An uninitialised tensor shaped like `like` for the hidden-state cache: "memory" (next to `like`), "pinned"
    (page-locked host memory: asynchronous copies to and from the GPU; ordinary memory where the system refuses to
    lock that much) or [OURS] "disk" (a memory-mapped file: come_runtime.disk_buffer)."""
    if where == "memory":
        return torch.empty_like(like)
    if where == "pinned":
        try:
            return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        except RuntimeError as e:
            log(f"pinned host memory refused ({str(e)[:80]}); this boundary of the cache uses ordinary memory")
            return torch.empty(like.shape, dtype=like.dtype)
    return _beside("come_runtime", "a hidden-state cache on disk").disk_buffer(like)


class HiddenStates:
    """Hidden states at every layer boundary for a fixed set of token windows (§7 cache).

    `states[l]` holds h_l (the input of layer l; h_0 = embeddings, h_L = raw output of the last layer) for all
    windows, shape (n_windows, seqlen, hidden). `kwargs[type]` is what the model passes to a layer of that
    attention type (rotary embeddings, mask), captured once from the model's own forward.
    [OURS] `placement` "disk" keeps every boundary in a memory-mapped file under the cache folder (unlinked at once,
    so nothing is left behind): the kernel pages it in and out, and results are bit-identical to a RAM cache. A
    host-memory cache of a model on a GPU is pinned, so that windows move to and from the GPU without a staging copy.
    `copies`: copies of every boundary the caller will keep on disk (the disk check counts them before any pass).
    """

    def __init__(self, model, ids: torch.Tensor, placement: torch.device | str = "cpu",
                 score_windows: int | None = None, copies: int = 1):
        self.model, self.ids, self.spill = model, ids, str(placement) == "disk"
        self.score_windows = score_windows
        self.device = device_of(model.get_input_embeddings())     # where the windows compute
        # a host-memory cache of a model on a GPU is pinned (a disk cache is a memory-mapped file instead)
        self.pin = not self.spill and self.device.type == "cuda" and torch.device(placement).type == "cpu"
        n_layers, hidden, dtype = len(decoder_layers(model)), model.config.hidden_size, next(model.parameters()).dtype
        if self.spill:      # refuse before the first pass rather than die of SIGBUS when the disk fills up
            rt = _beside("come_runtime", "a hidden-state cache on disk")
            rt.check_disk_space(rt.cache_root(), copies * (n_layers + 1) * ids.numel() * hidden * dtype.itemsize)
        h0, self.kwargs = layer_inputs(model, ids, batch=1, store=torch.device("cpu" if self.spill else placement))
        first = self.buffer(h0).copy_(h0) if self.spill or self.pin else h0
        self.states = [first] + [self.buffer(h0) for _ in range(n_layers)]

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like `like` where this cache lives (cache_buffer)."""
        return cache_buffer(like, "disk" if self.spill else "pinned" if self.pin else "memory")

    def run_layer(self, layer: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
        return call_layer(layer, x, self.kwargs[layer_type(self.model.config, index)])

    def refresh(self, start: int, desc: str = "statistics") -> list[ChannelActivity]:
        """Recompute h_{start+1} .. h_L layer by layer and capture each layer's channel activity."""
        layers, activity = decoder_layers(self.model), []
        with torch.inference_mode():
            for l in progress_bar(range(start, len(layers)), desc, total=len(layers) - start):
                with materialized(layers[l]), ChannelActivity(layers[l]) as act:
                    for i in range(self.states[l].shape[0]):
                        out = self.run_layer(layers[l], l, self.states[l][i:i + 1])
                        self.states[l + 1][i:i + 1].copy_(out, non_blocking=True)
                n = self.states[l].shape[0]
                assert act.calls == [n, n], f"layer {l}: hooks fired {act.calls} times for {n} windows"
                activity.append(act)
                self.wait_for_copies(layers[l], layers[l + 1] if l + 1 < len(layers) else None)
        return activity

    def wait_for_copies(self, layer: nn.Module, following: nn.Module | None) -> None:
        """A pinned cache is written by asynchronous copies from the GPU that ran `layer`: before the host (`following`
        None) or a layer on another GPU reads them, wait for that GPU (by its index, never the current device).
        [OURS] Then hand back the host heap the layer's windows freed (release_heap)."""
        dev = device_of(layer)
        if self.pin and dev.type == "cuda" and (following is None or device_of(following) != dev):
            torch.cuda.synchronize(dev)
        release_heap()

    def after_merge(self, start: int, n: int) -> None:
        """Layers start..start+n-1 became one layer: boundaries inside the window disappear."""
        del self.states[start + 1:start + n]

    def _outputs_from(self, start: int, layers: list[tuple[int, nn.Module]], n: int | None = None):
        """(window index, final hidden state) when h_start of the first n windows (default all) is run through
        `layers` (index, module), per window.

        [OURS] With layers a device_map offloaded, the windows go through the suffix layer by layer in a scratch
        boundary, so that each offloaded layer is loaded once per call instead of once per window.
        """
        n = min(n or self.states[start].shape[0], self.states[start].shape[0])
        with torch.inference_mode():
            if not any(offloaded(layer) for _, layer in layers):
                for i in range(n):
                    h = self.states[start][i:i + 1]
                    for index, layer in layers:
                        h = self.run_layer(layer, index, h)
                    yield i, h
                    release_heap()
                return
            scratch = self.buffer(self.states[start][:n]).copy_(self.states[start][:n])
            for k, (index, layer) in enumerate(layers):
                with materialized(layer):
                    for i in range(n):
                        scratch[i:i + 1].copy_(self.run_layer(layer, index, scratch[i:i + 1]), non_blocking=True)
                self.wait_for_copies(layer, layers[k + 1][1] if k + 1 < len(layers) else None)
            for i in range(n):
                yield i, scratch[i:i + 1]

    def nll_from(self, start: int, layers: list[tuple[int, nn.Module]]) -> float:
        """Mean next-token NLL of the calibration windows when h_start is run through `layers`; [OURS] of the first
        `score_windows` windows only when that is set (--score-windows)."""
        sums = [token_nll(self.model, h, self.ids[i:i + 1], normed=False)
                for i, h in self._outputs_from(start, layers, self.score_windows)]
        return sum(s for s, _ in sums) / sum(c for _, c in sums)

    def similarity_from(self, start: int, layers: list[tuple[int, nn.Module]], reference: torch.Tensor) -> float:
        """Mean token cosine similarity between the final hidden states reached from h_start and `reference`."""
        cos = [_row_cosine(h.to(reference.device), reference[i:i + 1]) for i, h in self._outputs_from(start, layers)]
        return torch.cat(cos).mean().item()


# ============================================================================ scores
def ffn_neuron_scores(act_abs_sum: torch.Tensor, tokens: int, w_down: torch.Tensor) -> torch.Tensor:
    """S_ffn(j) = mean_t |a_t[j]| * ||W_down[:, j]||_1 (§4.1)."""
    return (act_abs_sum.cpu() / tokens) * w_down.detach().float().abs().sum(0).cpu()


def kv_group_scores(act_abs_sum: torch.Tensor, tokens: int, w_o: torch.Tensor, shape: AttnShape) -> torch.Tensor:
    """S_att(k) = mean over tokens and over the g*d_h channels of group k of |o_t[c]| * ||W_o[:, c]||_1."""
    per_channel = (act_abs_sum.cpu() / tokens) * w_o.detach().float().abs().sum(0).cpu()
    return per_channel.view(shape.n_kv, shape.group_size * shape.head_dim).mean(1)


def _row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # DEVIATION: row-wise cosine; the authors build an N x N similarity matrix and take its diagonal.
    a, b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.nan_to_num(cos, nan=0.5)


def _on(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t if device is None else t.to(device, non_blocking=True)


def token_cosines(a: torch.Tensor, b: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """Cosine of every calibration token between two cached boundaries, window by window on `device`."""
    return torch.cat([_row_cosine(_on(a[i], device), _on(b[i], device)) for i in range(a.shape[0])])


def block_influence(states: list[torch.Tensor], device: torch.device | None = None) -> list[float]:
    """BI_l = sum_t (1 - clip(cos(h_l, h_{l+1}), 0, 1)) over all calibration tokens (§4.2).

    [OURS] `device`: each window is moved there (the model's device, from a host or disk cache) for its cosine.
    """
    # DEVIATION: h_L is the raw output of the last layer, not HF's final-normed last hidden state.
    return [sum((1 - _row_cosine(_on(a[i], device), _on(b[i], device)).clamp(0, 1)).sum().item()
                for i in range(a.shape[0])) for a, b in zip(states[:-1], states[1:])]


def skip_influence(states: list[torch.Tensor], span: int, tokens: str, device: torch.device | None = None) \
        -> list[float]:
    """SBI_l = sum_t arccos(clip(cos(h_l, h_{l+span}), 0, 1)) / pi for every window start l (§4.3)."""
    def pick(h):
        return h[:, -1:] if tokens == "last" else h
    out = []
    for l in range(len(states) - span):
        a, b = pick(states[l]), pick(states[l + span])
        out.append(sum((torch.arccos(_row_cosine(_on(a[i], device), _on(b[i], device)).clamp(0, 1)) / math.pi)
                       .sum().item() for i in range(a.shape[0])))
    return out


def skip_nll(cache: HiddenStates, span: int) -> list[float]:
    """--skip-score sleb: calibration NLL of the model with layers l .. l+span-1 removed, for every l."""
    layers = list(enumerate(decoder_layers(cache.model)))
    return [cache.nll_from(l, layers[l + span:])
            for l in progress_bar(range(len(layers) - span + 1), "skip NLL", total=len(layers) - span + 1)]


# ============================================================================ selection and ratios
def blocked_windows(tree: list[list[int]], span: int) -> list[bool]:
    """No-remerge rule: whether each window start holds a layer that is already a merge product."""
    return [any(len(tree[i]) > 1 for i in range(l, l + span)) for l in range(len(tree) - span + 1)]


def select_window(skip_scores: list[float], tree: list[list[int]], span: int, allow_remerge: bool) -> int:
    """Start of the window to merge: argmin of the skip score, windows with a merged layer blocked (§4.4)."""
    scores = list(skip_scores)
    if not allow_remerge:
        blocked = blocked_windows(tree, span)
        if all(blocked):
            # DEVIATION: say so (every step, and in the plan) and allow re-merging; the authors silently merge window 0.
            log("every merge window contains an already merged layer: re-merging in this step")
        else:
            scores = [math.inf if b else s for s, b in zip(scores, blocked)]
    return min(range(len(scores)), key=lambda l: (scores[l], l))


def merge_ratios(bi: list[float], p: float, rho: float, n_original: int) -> list[float]:
    """F_merge (§5): BI-proportional ratios, sharpened by p, dominant layer floored at rho^(1/(N-1))."""
    total = sum(bi)
    r = [s / total for s in bi] if total > 0 else [1 / len(bi)] * len(bi)     # step 1
    powered = [x ** p for x in r]
    r = [x / sum(powered) for x in powered] if sum(powered) > 0 else [1 / len(bi)] * len(bi)  # step 2
    floor = rho ** (1 / (n_original - 1)) if rho > 0 else 0.0                   # step 3
    top = max(range(len(r)), key=lambda i: (r[i], -i))
    if r[top] < floor:
        rest = sum(x for i, x in enumerate(r) if i != top)
        others = len(r) - 1
        r = [floor if i == top else ((1 - floor) * x / rest if rest > 0 else (1 - floor) / others)
             for i, x in enumerate(r)]
    return r


def channel_budgets(ratios: list[float], total: int) -> list[int]:
    """K_i = floor(N r_i), except argmax r which takes the remainder, so that sum K_i = N exactly."""
    top = max(range(len(ratios)), key=lambda i: (ratios[i], -i))
    k = [math.floor(total * r) for r in ratios]
    k[top] = total - sum(x for i, x in enumerate(k) if i != top)
    return k


def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in original index order (stable on ties)."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return order.sort().values


# ============================================================================ merging (pure functions on tensors)
def concat_merge(sources: list[dict[str, torch.Tensor]], groups: list[torch.Tensor], neurons: list[torch.Tensor],
                 ratios: list[float], shape: AttnShape, fold_norms: bool = False) -> dict[str, torch.Tensor]:
    """State dict of ONE decoder layer made of the kept KV groups and FFN neurons of the source layers (§6).

    The kept heads and neurons of all sources act in parallel on the same (normalized) input.
    """
    out = {}
    for key, ref in sources[0].items():
        parts = []
        for sd, grp, neu in zip(sources, groups, neurons):
            t = sd[key].to(ref.device).float()     # window layers may sit on different GPUs
            if fold_norms and key.split(".")[1] in ("q_proj", "k_proj", "v_proj") and key.endswith("weight"):
                t = t * sd["input_layernorm.weight"].to(ref.device).float()[None, :]
            if fold_norms and key.split(".")[1] in ("gate_proj", "up_proj") and key.endswith("weight"):
                t = t * sd["post_attention_layernorm.weight"].to(ref.device).float()[None, :]
            parts.append((t, grp, neu))
        module = key.rsplit(".", 1)[0]
        if module == "self_attn.q_proj":
            val = torch.cat([t[query_rows(g, shape)] for t, g, _ in parts])
        elif module in ("self_attn.k_proj", "self_attn.v_proj"):
            val = torch.cat([t[kv_rows(g, shape)] for t, g, _ in parts])
        elif key == "self_attn.o_proj.weight":
            val = torch.cat([t[:, query_rows(g, shape)] for t, g, _ in parts], dim=1)
        elif module in ("mlp.gate_proj", "mlp.up_proj"):
            val = torch.cat([t[n] for t, _, n in parts])
        elif key == "mlp.down_proj.weight":
            val = torch.cat([t[:, n] for t, _, n in parts], dim=1)
        elif key in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "self_attn.q_norm.weight",
                     "self_attn.k_norm.weight"):
            val = sum(r * t for r, (t, _, _) in zip(ratios, parts))          # b' = sum_i r_i b^i
        elif key in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            val = torch.ones_like(parts[0][0]) if fold_norms else sum(t for t, _, _ in parts) / len(parts)
        else:
            raise ComeError(f"concat_merge: no merge rule for parameter '{key}'")
        assert val.shape == ref.shape, f"{key}: merged shape {tuple(val.shape)} != {tuple(ref.shape)}"
        out[key] = val.to(ref.dtype)
    return out


def apply_merge(model, start: int, n: int, merged: dict[str, torch.Tensor]) -> None:
    """Write the merged layer at `start` and delete layers start+1 .. start+n-1."""
    layer = decoder_layers(model)[start]
    if offloaded(layer):        # [OURS] device_map offload: the merged layer lives on its compute device
        from accelerate.hooks import remove_hook_from_submodules
        for child in layer.children():
            remove_hook_from_submodules(child)
        layer.to_empty(device=device_of(layer))
    layer.load_state_dict(merged, strict=True)
    keep_layers(model, [i for i in range(len(decoder_layers(model))) if not start < i < start + n])


def keep_layers(model, keep: list[int]) -> None:
    """Keep only the decoder layers `keep` (in order); renumber them and rebuild every per-layer config field."""
    layers, config = decoder_layers(model), model.config
    old = len(layers)
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.layer_idx = i
    # DEVIATION: rebuild per-layer config fields from each new layer's first source layer (transformers 5 validates).
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, list):
            assert len(value) == old, f"config.{name} has {len(value)} entries for {old} layers"
            setattr(config, name, [value[i] for i in keep])
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
    config.num_hidden_layers = len(keep)


def layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    with materialized(layer):       # weights a device_map offloaded are read from the host or disk
        return {k: v.detach() for k, v in layer.state_dict().items()}


def spare_layer(model, index: int) -> nn.Module:
    """A free decoder layer like layer `index`, on its compute device, to load candidate merges into."""
    layer = decoder_layers(model)[index]
    if not offloaded(layer):
        return copy.deepcopy(layer)
    with torch.device("meta"):      # [OURS] device_map offload: built from the config, not copied with its hooks
        spare = type(layer)(model.config, index)
    return spare.to_empty(device=device_of(layer)).to(next(layer.parameters()).dtype).eval()


# ============================================================================ Algorithm 1
def join_window(tree: list[list[int]], start: int, span: int) -> None:
    tree[start:start + span] = [sum(tree[start:start + span], [])]


def next_span(depth: int, span: int, target: int, stops=()) -> int:
    """Layers to merge next: at most `span`, never jumping past the target or an intermediate depth in `stops`."""
    goal = max([t for t in stops if target <= t < depth] + [target])
    return min(span, depth - goal + 1)


def _notify(on_depth, model, t0: float) -> None:
    if on_depth:
        on_depth(model, len(decoder_layers(model)), time.perf_counter() - t0)


def layers_to_remove(model, sparsity: float) -> int:
    """Layers removed for a parameter sparsity: round(s * total / per_layer), clipped to [1, L-1] (§10)."""
    total, layers = count_params(model), decoder_layers(model)
    per_layer = count_params(layers[0])
    return min(max(round(sparsity * total / per_layer), 1), len(layers) - 1)


@dataclasses.dataclass
class MergeRun:
    """What Algorithm 1 carries from one merge step to the next."""
    model: nn.Module
    cache: HiddenStates                  # hidden states at every layer boundary of the current model (§7)
    tree: list[list[int]]                # the original layers behind each current layer
    steps: list[dict]                    # the merge record, one entry a step
    tensors: dict[str, torch.Tensor]     # [OURS] refit weights (--repair), by name
    activity: list                       # ChannelActivity of each current layer (None until measured)
    bi: list[float]                      # Block Influence of each current layer
    stale_from: int = 0                  # the first layer changed since its statistics were taken
    dense: list | None = None            # [OURS] --repair-target dense: the original model's boundary states

    def record(self) -> dict:
        """The merge record that apply_plan replays: steps, final tree, refit tensors."""
        return {"steps": self.steps, "tree": self.tree, **({"tensors": self.tensors} if self.tensors else {})}


@dataclasses.dataclass
class WindowScores:
    """Alg.1 step 4's score of every window start (lower: the model misses the window less)."""
    kind: str                            # "sbi" (§4.3) or [OURS] "skip_nll" (a calibration NLL)
    scores: list[float]
    ratios: list | None = None           # [OURS] --skip-score merge: the ratio of each window's best candidate merge
    tried: list | None = None            # [OURS] --skip-score merge: every candidate's [ratio, NLL]


def start_merging(model, calib_ids: torch.Tensor, cfg: ComeConfig, cache_device, resume: dict | None) -> MergeRun:
    """Alg.1 step 1: every layer stands for itself. [OURS] --resume: an interrupted run's steps are replayed first,
    without calibration (bit-identical)."""
    tree, steps, tensors = [[i] for i in range(len(decoder_layers(model)))], [], {}
    if resume:
        if cfg.repair_target == "dense" and resume["steps"]:
            raise ComeError("--resume cannot rebuild the original model's states for --repair-target dense")
        for step in resume["steps"]:
            replay_step(model, step, cfg.fold_norms, resume.get("tensors"))
        tree, steps, tensors = [list(t) for t in resume["tree"]], list(resume["steps"]), dict(resume.get("tensors", {}))
    # [OURS] --repair-target dense keeps a second copy of the boundaries (the original model's), counted up front
    copies = 2 if cfg.repair != "none" and cfg.repair_target == "dense" else 1
    cache = HiddenStates(model, calib_ids, cache_device, cfg.score_windows, copies)
    return MergeRun(model, cache, tree, steps, tensors, [None] * len(tree), [])


def measure(run: MergeRun, cfg: ComeConfig) -> None:
    """Alg.1 step 3: channel activity and Block Influence of the CURRENT model.

    Only the layers from the last merge on have changed: their boundaries are recomputed from the cache, and the BI of
    the layers before them is kept.
    """
    # DEVIATION: incremental recomputation from cached hidden states; the authors rerun the full pass each step.
    run.activity[run.stale_from:] = run.cache.refresh(run.stale_from, desc=f"step {len(run.steps) + 1} statistics")
    if cfg.repair_target == "dense" and run.dense is None:      # [OURS] the original model's boundary states
        run.dense = [run.cache.buffer(h).copy_(h) for h in run.cache.states]
    run.bi = run.bi[:run.stale_from] + block_influence(run.cache.states[run.stale_from:], run.cache.device)


def window_scores(run: MergeRun, span: int, cfg: ComeConfig) -> WindowScores:
    """Alg.1 step 4's scores: SBI of every window (§4.3). [OURS] --skip-score sleb: the calibration NLL of the model
    without the window; --skip-score merge: the NLL of the window's best candidate merge (merge_scores)."""
    if cfg.skip_score == "sleb":
        return WindowScores("skip_nll", skip_nll(run.cache, span))
    if cfg.skip_score == "merge":
        return WindowScores("skip_nll", *merge_scores(run.cache, run.tree, span, run.bi, run.activity, cfg))
    return WindowScores("sbi", skip_influence(run.cache.states, span, cfg.tokens_for_sbi(), run.cache.device))


def come_prune(model, calib_ids: torch.Tensor, target_layers: int, cfg: ComeConfig,
               cache_device: str | torch.device = "cpu", on_depth=None, stops=(), resume: dict | None = None,
               on_step=None) -> dict:
    """Algorithm 1 (progressive CoMe), and with cfg.method "come-p" Algorithm 2 (progressive posterior CoMe-P), which
    differs at one step: the merge ratio is the grid ratio with the lowest calibration NLL (posterior_ratio).

    Merges adjacent layers in place until the model has `target_layers` layers; returns the merge record (steps with
    kept indices, final tree; refit tensors under "tensors" with --repair) that `apply_plan` replays without
    calibration. [OURS] options enter at named points only: window_scores (--skip-score), repair_merge (--repair),
    start_merging (`resume`: the record of an interrupted run), and `on_step(record)` after each step.
    """
    if cfg.method == "come-p" and cfg.span != 2:
        raise ComeError("CoMe-P (Algorithm 2) searches a ratio [r, 1-r] between two layers: it needs span 2")
    shape, t_start = attn_shape(model.config), time.perf_counter()
    cfg = token_rule(cfg, calib_ids, model)      # [OURS] come+: a stronger ridge when calibration tokens are few
    run = start_merging(model, calib_ids, cfg, cache_device, resume)   # Alg.1 step 1
    while len(run.tree) > target_layers:                               # Alg.1 step 2
        t0 = time.perf_counter()
        measure(run, cfg)                                              # Alg.1 step 3
        span = next_span(len(run.tree), cfg.span, target_layers, stops)    # the last step may merge fewer layers
        scores = window_scores(run, span, cfg)                         # Alg.1 step 4: window <- argmin SBI
        start = select_window(scores.scores, run.tree, span, cfg.allow_remerge)
        window = list(range(start, start + span))
        sources = [layer_state(decoder_layers(model)[i]) for i in window]   # read once (offloaded: from the host)
        att, ffn = window_channel_scores(sources, run.activity, window, shape)
        search = None
        if cfg.method == "come-p":      # Alg.2 step 4: r <- argmin over the grid of the calibration NLL
            ratios, search = posterior_ratio(run.cache, start, sources, att, ffn, shape, cfg)
        elif scores.ratios:             # [OURS] --skip-score merge: the ratio of the window's best candidate merge
            ratios = scores.ratios[start]
        else:                           # Alg.1 step 5: r <- F_merge(BI[window])
            ratios = merge_ratios([run.bi[i] for i in window], cfg.p, cfg.rho, sum(len(run.tree[i]) for i in window))
        k_groups, k_neurons, groups, neurons = select_channels(att, ffn, ratios, shape)     # Alg.1 step 6
        apply_merge(model, start, span, concat_merge(sources, groups, neurons, ratios, shape, cfg.fold_norms))  # step 7
        run.steps.append(merge_step(run, window, scores, ratios, search, (k_groups, k_neurons, groups, neurons), cfg))
        run.cache.after_merge(start, span)
        del run.activity[start:start + span - 1]
        if cfg.repair != "none":
            repair_merge(run, start, window, cfg)
        run.steps[-1]["seconds"] = round(time.perf_counter() - t0, 3)
        join_window(run.tree, start, span)                             # Alg.1 step 8: tree <- window joined
        run.stale_from = start
        log(f"step {len(run.steps)}: merged layers {window} (original {run.steps[-1]['spans']}) with ratios "
            f"{[round(r, 3) for r in ratios]} -> {len(run.tree)} layers")
        _notify(on_depth, model, t_start)
        if on_step:
            on_step(run.record())
    return run.record()


def merge_step(run: MergeRun, window: list[int], scores: WindowScores, ratios, search, kept, cfg: ComeConfig) -> dict:
    """The record of one merge step: enough to replay it (window, ratios, kept channels) and every score behind it."""
    start, span = window[0], len(window)
    k_groups, k_neurons, groups, neurons = kept
    return {"op": "concat", "window": window, "spans": [run.tree[i] for i in window], "bi": [run.bi[i] for i in window],
            scores.kind: scores.scores[start], "bi_all": run.bi,
            f"{scores.kind}_all": [s if math.isfinite(s) else None for s in scores.scores],
            "remerge_forced": not cfg.allow_remerge and all(blocked_windows(run.tree, span)), "ratios": ratios,
            "k_groups": k_groups, "k_neurons": k_neurons,
            "kept_groups": [g.tolist() for g in groups], "kept_neurons": [n.tolist() for n in neurons],
            "ratio_search": search, **({"merge_nll": scores.tried} if scores.tried else {})}


def window_channel_scores(sources, activity, window, shape: AttnShape) -> tuple[list, list]:
    """(S_att, S_ffn) of every layer of the window (state dicts `sources`), from this step's statistics (§4.1)."""
    att = [kv_group_scores(activity[i].attn, activity[i].tokens, w["self_attn.o_proj.weight"], shape)
           for i, w in zip(window, sources)]
    ffn = [ffn_neuron_scores(activity[i].ffn, activity[i].tokens, w["mlp.down_proj.weight"])
           for i, w in zip(window, sources)]
    return att, ffn


def select_channels(att, ffn, ratios: list[float], shape: AttnShape):
    """Budgets K (KV groups, neurons) for the ratios and the top-K channels of each source layer (§5-§6)."""
    if len(ratios) != len(att):     # a missing ratio would silently drop a layer's channels
        raise ComeError(f"{len(ratios)} merge ratios for a window of {len(att)} layers")
    k_groups, k_neurons = channel_budgets(ratios, shape.n_kv), channel_budgets(ratios, ffn[0].numel())
    groups = [top_channels(s, k) for s, k in zip(att, k_groups)]
    neurons = [top_channels(s, k) for s, k in zip(ffn, k_neurons)]
    return k_groups, k_neurons, groups, neurons


# ============================================================================ Algorithm 2 (CoMe-P's ratio search)
def candidate_nll(cache: HiddenStates, start: int, span: int, merged: dict[str, torch.Tensor],
                  candidate: nn.Module) -> float:
    """Calibration NLL of the model with layers start..start+span-1 replaced by one layer of state dict `merged`.

    `candidate` is one spare decoder layer (a copy made once by the caller) that takes the merged weights; the suffix
    runs from the cached hidden state entering the window.
    """
    layers = decoder_layers(cache.model)
    candidate.load_state_dict(merged, strict=True)
    return cache.nll_from(start, [(start, candidate)] + [(i, layers[i]) for i in range(start + span, len(layers))])


def posterior_ratio(cache: HiddenStates, start: int, sources, att, ffn, shape: AttnShape, cfg: ComeConfig):
    """Algorithm 2 ratio search: merge with [r, 1-r] for r on the grid, keep the lowest calibration NLL.

    Builds one candidate layer and evaluates it from the cached hidden state entering the window.
    """
    # DEVIATION: one candidate layer, no deep copies of the model (the authors' code makes 21).
    tried, candidate = [], spare_layer(cache.model, start)
    for j in progress_bar(range(cfg.granularity + 1), "CoMe-P ratio search", total=cfg.granularity + 1):
        r = [j / cfg.granularity, 1 - j / cfg.granularity]
        _, _, groups, neurons = select_channels(att, ffn, r, shape)
        merged = concat_merge(sources, groups, neurons, r, shape, cfg.fold_norms)
        tried.append((candidate_nll(cache, start, len(sources), merged, candidate), r))
    best = min(range(len(tried)), key=lambda i: (tried[i][0], i))
    return tried[best][1], [[r[0], nll] for nll, r in tried]


# ============================================================================ [OURS] come+, merge scoring, repairs
def come_plus(cfg: ComeConfig) -> ComeConfig:
    """[OURS] --method come+: the best training-free CoMe measured on SmolLM2 (docs/results.md).

    CoMe's windows and ratios, norms folded into the kept rows (--fold-norms), and each merged layer's down_proj
    refit by ridge least squares to the window's output (--repair lstsq, alpha from --repair-alpha).
    """
    return dataclasses.replace(cfg, fold_norms=True, repair="lstsq", repair_floor=REPAIR_TOKEN_FLOOR)


def merge_scores(cache: HiddenStates, tree, span: int, bi: list[float], activity, cfg: ComeConfig):
    """[OURS] --skip-score merge: score each window by the calibration NLL of its actual merge.

    Candidates per window: CoMe's F_merge ratio and every one-hot ratio (keep one layer's channels only; with
    --fold-norms that is the layer itself, so every SLEB removal inside a window is a candidate). Windows blocked by
    the no-remerge rule are not evaluated. Returns (best NLL per window, its ratio, every candidate's [ratio, NLL]).
    """
    layers, shape = decoder_layers(cache.model), attn_shape(cache.model.config)
    blocked = blocked_windows(tree, span) if not cfg.allow_remerge else [False] * (len(tree) - span + 1)
    blocked = [False] * len(blocked) if all(blocked) else blocked    # select_window warns and allows re-merge
    seen, scores, best, tried = {}, [], [], []
    for l in progress_bar(range(len(blocked)), "merge-scored windows", total=len(blocked)):
        window = range(l, l + span)
        if blocked[l]:
            scores += [math.inf]
            best += [None]
            tried += [None]
            continue
        sources = [layer_state(layers[i]) for i in window]      # read once (offloaded weights come from the host)
        att, ffn = window_channel_scores(sources, activity, window, shape)
        come = merge_ratios([bi[i] for i in window], cfg.p, cfg.rho, sum(len(tree[i]) for i in window))
        cands, nlls = [come] + [[float(i == k) for i in range(span)] for k in range(span)], []
        candidate = spare_layer(cache.model, l)    # one spare layer per window (a layer's attention type is its own)
        for r in cands:
            # with folded norms, keeping layer k of a window is the model without the window's other layers
            key = tuple(i for i in window if r[i - l] == 0) if cfg.fold_norms and 1.0 in r else None
            if key is None or key not in seen:
                _, _, groups, neurons = select_channels(att, ffn, r, shape)
                merged = concat_merge(sources, groups, neurons, r, shape, cfg.fold_norms)
                nll = candidate_nll(cache, l, span, merged, candidate)
                seen[key] = nll
            nlls.append(seen[key])
        k = min(range(len(cands)), key=lambda i: (nlls[i], i))
        scores += [nlls[k]]
        best += [cands[k]]
        tried += [[[r, v] for r, v in zip(cands, nlls)]]
    return scores, best, tried


# [OURS] The token rule of come+ (and of the repaired drop baselines it is compared with; docs/results.md): least
# squares fits d_ff weights per output channel of down_proj, so it needs tokens in proportion to d_ff. come+
# chooses a calibration size of at least REPAIR_TOKEN_FLOOR x d_ff tokens; a run with fewer tokens gets a ridge
# that grows as tokens / d_ff falls.
REPAIR_TOKEN_FLOOR = 8


def token_rule(cfg: ComeConfig, calib_ids: torch.Tensor, model) -> ComeConfig:
    """[OURS] cfg with the ridge strength of the token rule (cfg.repair_floor, set by come+): --repair-alpha below
    repair_floor x d_ff calibration tokens times floor / tokens, with one warning; unchanged at or above it, for
    scale and for auto. A plain --repair lstsq keeps its alpha and warns below the floor."""
    d_ff, tokens = decoder_layers(model)[0].mlp.down_proj.in_features, calib_ids.numel()
    floor = (cfg.repair_floor or REPAIR_TOKEN_FLOOR) * d_ff
    if cfg.repair != "lstsq" or tokens >= floor:
        return cfg
    if not cfg.repair_floor or cfg.repair_alpha == "auto":
        warnings.warn(f"--repair lstsq fits {d_ff} weights per output channel from {tokens} calibration tokens, "
                      f"fewer than {floor // d_ff} x {d_ff}: it may overfit (more --nsamples or a larger "
                      "--repair-alpha)")
        return cfg
    alpha = cfg.repair_alpha * floor / tokens
    warnings.warn(f"--repair lstsq fits {d_ff} weights per output channel from {tokens} calibration tokens, fewer "
                  f"than {cfg.repair_floor} x {d_ff}: ridge strength {cfg.repair_alpha:g} -> {alpha:.3g} against "
                  f"overfitting (more --nsamples recover the full fit)")
    return dataclasses.replace(cfg, repair_alpha=alpha)


# [OURS] --repair-alpha auto: the ridge strengths that the leave-one-window-out cross-validation chooses from
REPAIR_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


REPAIRED = {"repair_o": "self_attn.o_proj.weight", "repair": "mlp.down_proj.weight"}    # plan key -> refit weight


def repair_merge(run: MergeRun, start: int, window: list[int], cfg: ComeConfig) -> None:
    """[OURS] --repair: refit the merged layer's o_proj (--repair-o, first) and down_proj (refit_projection) to the
    window's old output (still cached as h_{start+1}) or, with --repair-target dense, the original model's state
    leaving the merged span."""
    target = run.dense[run.tree[window[-1]][-1] + 1] if run.dense else run.cache.states[start + 1]
    for key in ["repair_o"] * cfg.repair_o + ["repair"]:
        weight, name = REPAIRED[key], f"step{len(run.steps)}.{REPAIRED[key]}"
        run.tensors[name], run.steps[-1][key] = refit_projection(run.cache, start, target, cfg.repair,
                                                                 cfg.repair_alpha, weight)
        run.steps[-1][key].update(tensor=name, layer=start)
        set_weight(run.model, start, weight, run.tensors[name])


def refit_projection(cache: HiddenStates, index: int, targets: torch.Tensor, kind: str, alpha: float | str,
                     weight: str = "mlp.down_proj.weight") -> tuple[torch.Tensor, dict]:
    """[OURS] --repair: closed-form, ridge-regularised refit of one projection of layer `index` on calibration tokens.

    The layer computes out = W z + (the rest), z = the input of the projection (down_proj, or o_proj with
    --repair-o; the rest held fixed). Given targets y (the merged window's output before the merge) and
    r = y - out + W_0 z, W minimises sum_t ||r_t - W z_t||^2 + lam ||W - W_0||^2, lam = alpha * mean(diag(Z^T Z)):
    W = (C + lam W_0)(G + lam I)^-1, G = Z^T Z, C = R^T Z, accumulated as running float64 sums.
    kind "scale": W = diag(s) W_0 with s_c = (<r_c, m_c> + mu) / (||m_c||^2 + mu), m = W_0 z, mu = alpha mean ||m_c||^2.
    alpha "auto": each alpha of REPAIR_ALPHAS is fitted without one calibration window and scored on it (a second
    pass per window, sums only); the lowest held-out residual summed over the windows wins.
    Returns the new weight (in the layer's dtype) and the relative calibration residual before and after.
    """
    layer, seen = float32_layer(cache.model, index), {}
    proj = layer.get_submodule(weight.rsplit(".", 1)[0])
    dev, f, d = proj.weight.device, proj.in_features, proj.out_features
    W0 = proj.weight.detach().double()
    dtype = next(decoder_layers(cache.model)[index].parameters()).dtype
    if alpha == "auto" and targets.shape[0] < 2:
        raise ComeError("--repair-alpha auto holds out one calibration window at a time: it needs at least 2 windows "
                        "(raise --nsamples)")

    def sums(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:     # G, C, ||R||^2 over calibration windows
        G, C, rr = (torch.zeros(size, dtype=torch.float64, device=dev) for size in ((f, f), (d, f), ()))
        with torch.inference_mode():
            for i in rows:
                out = cache.run_layer(layer, index, cache.states[index][i:i + 1]).reshape(-1, d).double()
                z = seen["z"].reshape(-1, f).double()
                r = targets[i].to(dev).reshape(-1, d).double() - out + z @ W0.T     # what W z has to produce
                G += z.T @ z
                C += r.T @ z
                rr += (r * r).sum()
        return G, C, rr

    def fit(G, C, a: float) -> torch.Tensor:
        if kind == "lstsq":
            A, lam = G.clone(), a * G.diagonal().mean()
            A.diagonal().add_(lam)
            return torch.linalg.solve(A, (C + lam * W0).T).T
        if kind == "scale":
            m2, rm = ((W0 @ G) * W0).sum(1), (C * W0).sum(1)
            return ((rm + a * m2.mean()) / (m2 + a * m2.mean()))[:, None] * W0
        raise ComeError(f"unknown repair '{kind}' (lstsq or scale)")

    def residual(w, G, C, rr) -> torch.Tensor:      # ||R - Z w^T||^2 from the running sums
        return rr - 2 * (w * C).sum() + ((w @ G) * w).sum()

    def keep_input(module, args) -> None:      # the projection's input z of the window being run
        seen["z"] = args[0]
    handle = proj.register_forward_pre_hook(keep_input)
    try:
        n, info = targets.shape[0], {}
        G, C, rr = sums(range(n))
        if alpha == "auto":
            held = torch.zeros(len(REPAIR_ALPHAS), dtype=torch.float64, device=dev)
            for i in range(n):
                Gi, Ci, rri = sums([i])
                for k, a in enumerate(REPAIR_ALPHAS):
                    held[k] += residual(fit(G - Gi, C - Ci, a), Gi, Ci, rri)
            alpha = REPAIR_ALPHAS[int(held.argmin())]
            info["held_out_residual"] = dict(zip(map(str, REPAIR_ALPHAS), (held / rr).tolist()))
    finally:
        handle.remove()
    W = fit(G, C, alpha)
    before, after = ((residual(w, G, C, rr) / rr).item() for w in (W0, W))
    return W.to("cpu", dtype), {"kind": kind, "alpha": alpha, "residual_before": before,
                                "residual_after": after, **info}


def float32_layer(model, index: int) -> nn.Module:
    """[OURS] Decoder layer `index` in float32 on its compute device: itself if it is, else a float32 copy.

    The refits recompute the layer in float32: in bfloat16 a recomputed output carries rounding noise of several
    units where activations are in the thousands (Llama-2's first tokens), and that noise would enter every target.
    """
    layer = decoder_layers(model)[index]
    if next(layer.parameters()).dtype == torch.float32 and not offloaded(layer):
        return layer
    work = spare_layer(model, index).float()
    work.load_state_dict({k: v.float() for k, v in layer_state(layer).items()}, strict=True)
    return work


# ============================================================================ replaying a plan
def replay_step(model, step: dict, fold_norms: bool = False, tensors: dict | None = None) -> None:
    """Apply one recorded step (concat / weightsum / rdsc merge, or a drop of `count` layers) without calibration."""
    if step["op"] == "drop":
        first, n = step["layer"], step.get("count", 1)
        keep_layers(model, [i for i in range(len(decoder_layers(model))) if not first <= i < first + n])
    else:
        window, layers = step["window"], decoder_layers(model)
        sources = [layer_state(layers[i]) for i in window]
        if step["op"] == "concat":
            groups = [torch.tensor(g, dtype=torch.long) for g in step["kept_groups"]]
            neurons = [torch.tensor(n, dtype=torch.long) for n in step["kept_neurons"]]
            merged = concat_merge(sources, groups, neurons, step["ratios"], attn_shape(model.config), fold_norms)
        elif step["op"] == "weightsum":
            merged = weighted_sum_merge(sources, step["ratios"])
        else:
            merged = rdsc_merge(sources)
        apply_merge(model, window[0], len(window), merged)
    for key in [k for k in REPAIRED if step.get(k)]:    # [OURS] the refit projections, stored next to the plan
        layer = step[key].get("layer", step.get("window", [0])[0])      # plans before drop repairs: the window's
        set_weight(model, layer, REPAIRED[key], tensors[step[key]["tensor"]])
    replay_weights(model, step, tensors)


def replay_weights(model, step: dict, tensors: dict | None) -> None:
    """A step's trained replacement layer (LLM-Streamline): every weight of it, stored next to the plan."""
    if step.get("replaced"):
        prefix, layer = step["replaced"]["tensor"], step["replaced"]["layer"]
        for name, _ in decoder_layers(model)[layer].named_parameters():
            set_weight(model, layer, name, tensors[f"{prefix}.{name}"])


def set_weight(model, index: int, name: str, value: torch.Tensor) -> None:
    """Copy `value` into parameter `name` of decoder layer `index` (a refit or transformed projection)."""
    decoder_layers(model)[index].get_parameter(name).data.copy_(value)


def fingerprint(model) -> dict:
    """What identifies the base model a plan applies to: its shapes and a checksum of a few weights."""
    c, layers, digest = model.config, model.model.layers, hashlib.sha256()
    with materialized(model.get_input_embeddings()) as embed, materialized(layers[0]) as first, \
            materialized(layers[-1]) as last:
        probe = [embed.weight[:8], first.self_attn.q_proj.weight[:4], last.mlp.down_proj.weight[:4]]
    for t in probe:   # bf16-rounded, so the same weights loaded in another dtype still match
        digest.update(t.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    return {"model_type": c.model_type, "num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "vocab_size": c.vocab_size, "weights_sha256": digest.hexdigest()}


def check_fingerprint(model, plan: dict) -> None:
    have, want = fingerprint(model), plan["base_fingerprint"]
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        raise ComeError(f"the plan was made for a different base model ({plan.get('base_model')}): "
                        f"{', '.join(f'{k} {want[k]} != {have.get(k)}' for k in diff)}")


def apply_plan(model, plan: dict, depth: int | None = None) -> dict:
    """Replay the steps of a saved plan on the base model, without calibration (bit-identical rebuild).

    With `depth`, stop once the model has that many layers (a depth the plan passes through, e.g. a shallower
    --compare stop of a progressive run). Returns the merge record of the replayed steps (steps, tree, tensors).
    """
    check_fingerprint(model, plan)
    merge, tree = plan["merge"], [[i] for i in range(len(decoder_layers(model)))]
    depths = [len(tree)]
    for step in merge["steps"]:
        depths.append(depths[-1] - (step.get("count", 1) if step["op"] == "drop" else len(step["window"]) - 1))
    if depth is not None and depth not in depths:
        raise ComeError(f"the plan passes through {', '.join(map(str, depths))} layers, not {depth}")
    steps = merge["steps"][:depths.index(depth)] if depth is not None else merge["steps"]
    for step in steps:
        replay_step(model, step, plan["config"]["fold_norms"], merge.get("tensors"))
        if step["op"] == "drop":
            drop_from_tree(tree, step["layer"], step.get("count", 1))
        else:
            join_window(tree, step["window"][0], len(step["window"]))
    names = {s[k]["tensor"] for s in steps for k in REPAIRED if s.get(k)}
    names |= {s["replaced"]["tensor"] for s in steps if s.get("replaced")}     # a replacement layer's weight prefix
    return {"steps": steps, "tree": tree, **({"tensors": {k: v for k, v in merge["tensors"].items()
                                                          if k in names or k.split(".")[0] in names}}
                                             if names else {})}


# ============================================================================ post-training (Algorithms 3, 4)
# CoMe-mp learning rates of the merged layers, shallow to deep [PAPER].
# INTERPRETATION: families other than Qwen3 use LLaMA-2-7b's list.
MP_LRS = {"llama": [5e-4, 2.5e-4, 1e-4, 7.5e-5, 5e-5, 2.5e-5, 1e-5],
          "qwen3": [5e-4, 2.5e-4, 5e-5, 2.5e-5, 1e-5, 7.5e-6]}
# Post-training recipes as TrainConfig settings: the paper's for --post-train sp|mp [PAPER], ours for --post-train
# best [OURS] (docs/post-training.md: chosen on held-out text, never on a test split), and the number of token windows
# each trains on. The text they come from is the caller's (the command line mixes the calibration text with a third
# text for best: --train-data).
TRAIN_RECIPES = {"paper": {"epochs": 1, "lr": 1e-5, "seqlen": None, "loss": "kl", "targets": "merged",
                           "train_all": False},
                 "best": {"mode": "sp", "epochs": 1, "lr": 3e-4, "seqlen": 512, "loss": "kl", "targets": "output",
                          "train_all": True, "batch_size": 1}}
TRAIN_WINDOWS = {"paper": 256, "best": 1024}


@dataclasses.dataclass
class TrainConfig:
    """Post-training by hierarchical distillation from the frozen original model (§9)."""
    mode: str = "mp"                     # "sp" (Algorithm 3) or "mp" (Algorithm 4)
    epochs: int = 1
    batch_size: int = 1                  # token windows per optimizer step
    lr: float = 1e-5                     # sp: one learning rate for every trained layer [PAPER]
    mp_lrs: list[float] | None = None    # mp: shallow-to-deep list; None -> MP_LRS of the family
    loss: str = "kl"                     # "kl" on next-token distributions or "mse" on hidden states
    train_all: bool = False              # sp: train every decoder layer, not only the merged ones
    targets: str = "merged"              # sp: loss at each merged layer's boundary [PAPER]; "output" [OURS]: final only
    recipe: str = "paper"                # [OURS] "best": the settings of TRAIN_RECIPES["best"] (from_recipe)
    seqlen: int | None = None            # [OURS] training window (None: the calibration --seqlen)
    weight_decay: float = 1e-2           # AdamW [PAPER]
    kl_chunk: int = 256                  # tokens per KL chunk: memory ~ chunk x vocabulary
    loss_windows: int = 4                # first training windows on which the loss per layer is reported
    seed: int = 0                        # window order of every epoch
    save_dtype: str | None = None        # [OURS] dtype of the trained model (None: the student's); e.g. "float32"
    memory: str = "plain"                # [OURS] sp: "checkpoint" activations or "offload" (+ state on the host)
    offload_count: int | None = None     # [OURS] offload: how many trained layers go to the host (None: all)
    sampled_text: bool = False           # [OURS] training text sampled from the dense model first (memory plan)

    @classmethod
    def from_recipe(cls, name: str, **settings) -> TrainConfig:
        """A recipe of TRAIN_RECIPES with `settings` on top: TrainConfig.from_recipe("best") trains as --post-train
        best does, on the windows post_train is given (TRAIN_WINDOWS["best"] of them, of the caller's text)."""
        if name not in TRAIN_RECIPES:
            raise ComeError(f"unknown post-training recipe '{name}' (one of {', '.join(TRAIN_RECIPES)})")
        return cls(**{**TRAIN_RECIPES[name], "recipe": name, **settings})


def original_spans(tree: list[list[int]], n_original: int) -> list[tuple[int, int]]:
    """(a_j, b_j): the contiguous original layers behind student layer j, from the merge tree."""
    if [i for span in tree for i in span] != list(range(n_original)):
        raise ComeError("post-training needs a merge tree whose layers cover every original layer in order; "
                        "this one lacks some (a plan written before drops passed their span to a kept layer?)")
    return [(span[0], span[-1]) for span in tree]


def mp_learning_rates(n: int, schedule: list[float]) -> list[float]:
    """Learning rates of n merged layers, shallow to deep: `schedule` interpolated in log space over depth rank."""
    # INTERPRETATION: rank i sits at position i (len-1)/(n-1) of the list, geometric between neighbours; n = 1 -> first.
    out = []
    for i in range(n):
        x = i * (len(schedule) - 1) / max(n - 1, 1)       # exact at the knots: i (len-1) is a multiple of n-1
        k = int(x)
        a, b = schedule[k], schedule[min(k + 1, len(schedule) - 1)]
        out.append(a if x == k else min(max(a * (b / a) ** (x - k), min(a, b)), max(a, b)))
    return out


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, norm: nn.Module, head: nn.Module, kind: str,
                 chunk: int = 256) -> tuple[float, torch.Tensor | None]:
    """Distillation loss of one student layer output against the teacher's state, and its gradient w.r.t. `student`.

    kl: KL(p_T || p_S) of softmax(head(norm(h))), mean over tokens, temperature 1, through the frozen final norm and
    LM head; forward and backward run chunk by chunk, so memory is bounded by chunk x vocabulary. mse: mean squared
    error of the hidden states. Under torch.no_grad the gradient is None.
    """
    # INTERPRETATION: fig. 1's L_KL on hidden states = KL of the distributions they give through the frozen norm + head.
    need_grad = torch.is_grad_enabled()
    leaf = student.detach().float().requires_grad_(need_grad)
    target = teacher.detach().to(leaf.device)
    dev, dt = device_of(head), head.weight.dtype
    if kind == "mse":
        loss = F.mse_loss(leaf, target.float())
        if need_grad:
            loss.backward()
        return loss.item(), leaf.grad.to(student.dtype) if need_grad else None
    n, total = leaf.numel() // leaf.shape[-1], 0.0
    for s in range(0, n, chunk):
        with torch.no_grad():
            log_t = F.log_softmax(head(norm(target.reshape(n, -1)[s:s + chunk].to(dev, dt))).float(), -1)
        log_s = F.log_softmax(head(norm(leaf.reshape(n, -1)[s:s + chunk].to(dev, dt))).float(), -1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / n
        if need_grad:
            kl.backward()
        total += kl.item()
    return total, leaf.grad.to(student.dtype) if need_grad else None


def teacher_states(teacher, ids: torch.Tensor, boundaries: set[int]) -> tuple[dict[int, torch.Tensor], dict]:
    """The teacher's hidden states H^(k) at the given boundaries for one batch of windows, and the layer kwargs."""
    h, kwargs = layer_inputs(teacher, ids, batch=ids.shape[0])
    out, layers = {0: h}, decoder_layers(teacher)
    with torch.no_grad():
        for l in range(max(boundaries, default=0)):     # empty on a rank with no layer to train
            h = call_layer(layers[l], h, kwargs[layer_type(teacher.config, l)])
            if l + 1 in boundaries:
                out[l + 1] = h
    return out, kwargs


def distill_step(student, teacher, states, kwargs, spans, js, tc: TrainConfig, host=None) -> dict[int, float]:
    """Loss of each student layer in `js` against H^(b_j+1); with gradients enabled, back-propagates their sum.

    mp: layer j runs teacher-forced on H^(a_j). sp: the student runs end to end on its own hidden states.
    [OURS] `host` (come_runtime.HostTraining, --train-memory offload): its layers are staged onto the device only
    while they run, and the backward runs layer by layer (layerwise_backward) so that each is staged once more.
    """
    layers, h, outs, inputs = decoder_layers(student), states[0], {}, {}
    layerwise = host is not None and torch.is_grad_enabled()    # no graph now: layerwise_backward runs each again
    for j in js if tc.mode == "mp" else range(max(js) + 1):
        x = inputs[j] = states[spans[j][0]] if tc.mode == "mp" else h    # Alg.4 step 3: teacher-forced; Alg.3: own
        kw = kwargs[layer_type(student.config, j)]
        if tc.memory != "plain" and torch.is_grad_enabled() and not layerwise:     # [OURS] recompute in backward
            h = outs[j] = torch.utils.checkpoint.checkpoint(call_layer, layers[j], x, kw, use_reentrant=False)
            continue
        with (torch.no_grad() if layerwise else contextlib.nullcontext(),
              host.staged(j) if host else contextlib.nullcontext()):
            h = outs[j] = call_layer(layers[j], x, kw)
    norm, head = teacher.model.norm, teacher.get_output_embeddings()
    losses = {j: distill_loss(outs[j], states[spans[j][1] + 1], norm, head, tc.loss, tc.kl_chunk) for j in js}
    if layerwise:
        layerwise_backward(student, inputs, kwargs, {j: g for j, (_, g) in losses.items()}, host)
    elif torch.is_grad_enabled():
        torch.autograd.backward([outs[j] for j in js], [losses[j][1] for j in js])
    return {j: v for j, (v, _) in losses.items()}


def layerwise_backward(student, inputs: dict, kwargs: dict, grads: dict, host) -> None:
    """[OURS] The backward of an sp step one layer at a time, from the deepest down to the first trained layer: the
    layer is staged, run again on its saved input with gradients, and back-propagated from the gradient of its output
    (what came back from above plus its own loss's); the gradient of its input goes on down. The same gradients as
    autograd through the checkpointed layers."""
    layers, g = decoder_layers(student), None
    first = min(j for j in inputs if any(p.requires_grad for p in layers[j].parameters()))
    for j in sorted((j for j in inputs if j >= first), reverse=True):
        if j in grads:
            g = grads[j] if g is None else g + grads[j].to(g.dtype)
        if g is None:
            continue
        x = inputs[j].detach().requires_grad_(j > first)
        with torch.enable_grad(), host.staged(j):
            out = call_layer(layers[j], x, kwargs[layer_type(student.config, j)])
            torch.autograd.backward(out, g.to(out.dtype))
        g = x.grad


def post_train(student, teacher, tree: list[list[int]], ids: torch.Tensor, tc: TrainConfig,
               rank: int = 0, world: int = 1) -> dict:
    """Algorithm 3 (CoMe-sp, tc.mode "sp") and Algorithm 4 (CoMe-mp, tc.mode "mp"): hierarchical distillation.

    Trains the merged layers of the pruned `student` in place so that each matches the frozen `teacher` (the original
    model) at the boundary leaving its original span. Teacher states are produced batch by batch from `ids`. Under
    torch.distributed (mp only) rank r trains merged layers r, r + world, ... and every rank receives every layer.
    The trained layers end in tc.save_dtype (default: the student's dtype); their loss is measured as saved.
    """
    spans = original_spans(tree, len(decoder_layers(teacher)))
    layers = decoder_layers(student)
    # Alg.3/4 step 1: the layers to train: the merged ones (or every layer with --train-all)
    # INTERPRETATION: with --train-all (sp) the summed loss covers every layer, each at the end of its span.
    trained = [j for j, (a, b) in enumerate(spans) if b > a or tc.train_all]
    if not trained:
        raise ComeError("the pruned model has no merged layer to post-train")
    # Alg.4 step 2: one learning rate per merged layer, decaying with depth (Alg.3: one for all)
    schedule = tc.mp_lrs or MP_LRS.get(student.config.model_type, MP_LRS["llama"])
    lr_of = dict(zip(trained, mp_learning_rates(len(trained), schedule) if tc.mode == "mp" else [tc.lr] * len(trained)))
    mine = trained[rank::world] if tc.mode == "mp" else trained
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    dtype = getattr(torch, tc.save_dtype) if tc.save_dtype else next(student.parameters()).dtype
    t0, rows = time.perf_counter(), []
    # DEVIATION: mp layers train one after another (Alg.4 interleaves them per batch). Each is teacher-forced, so the
    # result is the same, and only one layer's fp32 weights, gradients and AdamW moments are alive at a time.
    for js in [[j] for j in mine] if tc.mode == "mp" else [mine]:
        rows += [{**r, "rank": rank} for r in train_layers(student, teacher, spans, js, ids, tc, lr_of, dtype)]
    seconds = time.perf_counter() - t0
    student.to(dtype).requires_grad_(True)
    if world > 1:   # every rank gets every trained layer and every loss row
        for i, j in enumerate(trained):
            for t in layers[j].state_dict().values():
                torch.distributed.broadcast(t, src=i % world)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["layer"])
    return {"mode": tc.mode, "settings": dataclasses.asdict(tc), "world_size": world,
            "steps": tc.epochs * math.ceil(ids.shape[0] / tc.batch_size), "windows": ids.shape[0],
            "tokens": ids.numel(), "seconds": round(seconds, 2), "layers": rows,
            "loss_on": f"the first {min(tc.loss_windows, ids.shape[0])} training windows, weights as saved"}


def train_layers(student, teacher, spans, js: list[int], ids: torch.Tensor, tc: TrainConfig, lr_of: dict,
                 dtype: torch.dtype) -> list[dict]:
    """Steps 3-4 of Algorithms 3/4 for the student layers `js` (mp: one layer; sp: every trained layer, summed loss).

    Returns per loss position (each layer in `js`; with tc.targets "output" [OURS] only the last layer) the loss
    before, after in fp32, and after the cast to `dtype` (the weights as saved).
    """
    layers = decoder_layers(student)
    # [OURS] targets "output": one loss, at the last layer's output, for every trained layer
    at = [len(layers) - 1] if tc.targets == "output" else js
    boundaries = {spans[j][1] + 1 for j in at} | ({spans[j][0] for j in at} if tc.mode == "mp" else {0})

    def losses() -> dict[int, float]:
        sums, batches = {j: 0.0 for j in at}, ids[:tc.loss_windows].split(tc.batch_size)
        with torch.no_grad():
            for batch in batches:
                states, kwargs = teacher_states(teacher, batch, boundaries)
                for j, v in distill_step(student, teacher, states, kwargs, spans, at, tc, host).items():
                    sums[j] += v / len(batches)
        return sums

    host = None     # the losses before training read the layers as they are
    before, n_steps = losses(), tc.epochs * math.ceil(ids.shape[0] / tc.batch_size)
    # INTERPRETATION: trained layers keep fp32 weights while training (a 1e-5 step vanishes in bf16).
    # [OURS] offload: the deepest `offload_count` trained layers (all by default) keep their training state on the
    # host (come_runtime.HostTraining, its own AdamW there); the others train on the device.
    on_host = (js if tc.offload_count is None else js[max(len(js) - tc.offload_count, 0):]) \
        if tc.memory == "offload" else []
    host = _beside("come_runtime", "--train-memory offload").HostTraining(
        layers, on_host, lr_of[js[0]], tc.weight_decay) if on_host else None
    params = [p for j in js if j not in on_host for p in layers[j].float().requires_grad_(True).parameters()]
    opts = ([torch.optim.AdamW(params, lr=lr_of[js[0]], weight_decay=tc.weight_decay)] if params else []) \
        + ([host.opt] if host else [])
    # INTERPRETATION: cosine decay from the initial rate to 0 over all steps, no warm-up.
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps) for opt in opts]
    name = f"CoMe-{tc.mode}" + (f" layer {js[0]}" if tc.mode == "mp" else "")
    for epoch in range(tc.epochs):
        order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(tc.seed + epoch))
        bar, epoch_loss = progress_bar(order.split(tc.batch_size), f"{name} epoch {epoch + 1}/{tc.epochs}"), 0.0
        for batch in bar:
            # Alg.3/4 step 3: teacher boundary states of this batch only, never of the whole training set
            states, kwargs = teacher_states(teacher, ids[batch], boundaries)
            # Alg.3/4 step 4: loss at the boundary leaving each original span; AdamW step; cosine decay
            step_loss = sum(distill_step(student, teacher, states, kwargs, spans, at, tc, host).values())
            for opt, sched in zip(opts, scheds):
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            epoch_loss += step_loss / ids.shape[0] * len(batch)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{step_loss:.4f}")
        log(f"{name} epoch {epoch + 1}/{tc.epochs}: mean summed loss {epoch_loss:.4f}")
    after_fp32 = losses()
    if host:    # plain layers on the device again, with the trained weights
        host.finish()
    for j in js:
        layers[j].requires_grad_(False).to(dtype)
    after = losses() if dtype != torch.float32 else after_fp32
    for j in at:
        if after[j] - after_fp32[j] > 0.5 * (before[j] - after_fp32[j]) > 0:
            warnings.warn(f"layer {j}: the cast to {dtype} undoes more than half of post-training's gain (loss "
                          f"{before[j]:.4g} -> {after_fp32[j]:.4g} in fp32, {after[j]:.4g} as saved); "
                          "keep it with --save-dtype float32 or train longer / with a larger learning rate")
    return [{"layer": j, "original_span": list(spans[j]), "lr": lr_of[js[0]], "loss_before": before[j],
             "loss_after_fp32": after_fp32[j], "loss_after": after[j]} for j in at]


# ============================================================================ baselines (§13)
def weighted_sum_merge(sources: list[dict[str, torch.Tensor]], ratios: list[float]) -> dict[str, torch.Tensor]:
    """theta' = sum_i r_i theta_i for every parameter (the paper's WeightSum ablation, MKA-style)."""
    return {k: sum(r * sd[k].to(ref.device).float() for r, sd in zip(ratios, sources)).to(ref.dtype)
            for k, ref in sources[0].items()}


def rdsc_merge(sources: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """LaCo's Reserving-Differences-while-Seeking-Common: theta' = theta_l + sum_k (theta_{l+k} - theta_l)."""
    out = {}
    for key, ref in sources[0].items():
        base = ref.float()
        out[key] = (base + sum(sd[key].to(ref.device).float() - base for sd in sources[1:])).to(ref.dtype)
    return out


def drop_from_tree(tree: list[list[int]], start: int, n: int) -> list[int]:
    """Remove current layers start..start+n-1 from the merge tree; returns the original layers they covered.

    [OURS] Their span passes to the layer before the cut (to the layer after it for a cut at layer 0), so that the
    tree still covers every original layer in order and post-training distils each kept layer to the teacher's state
    leaving its span (§14, drop spans). A drop step's "original" is this list: the span the removed layers stood
    for, including layers that an earlier drop passed to them.
    """
    dropped = sum(tree[start:start + n], [])
    del tree[start:start + n]
    if start > 0:
        tree[start - 1] = tree[start - 1] + dropped
    elif tree:
        tree[0] = dropped + tree[0]
    return dropped


def drop_layers(model, tree: list[list[int]], start: int, n: int, cache: HiddenStates | None = None,
                cfg: ComeConfig | None = None, tensors: dict | None = None, **info) -> dict:
    """Remove current layers start..start+n-1 (and their boundaries from `cache`); returns the drop's record.

    [OURS] With cfg.repair (and the cache) the down_proj of the layer before the cut is refit in closed form
    (refit_projection) so that its output reproduces the state that left the removed span; the refit tensor goes into
    `tensors`. The cache must then be refreshed from layer start-1 on. A span at the very start has no layer before
    the cut and is dropped unrepaired (recorded as "repair": None).
    """
    repair = cfg is not None and cfg.repair != "none"
    target = cache.states[start + n] if repair else None      # the cached state leaving the span
    keep_layers(model, [i for i in range(len(tree)) if not start <= i < start + n])
    if cache is not None:
        del cache.states[start + 1:start + n + 1]       # h_start now enters the layer that followed the span
    step = {"op": "drop", "layer": start, "count": n, "original": drop_from_tree(tree, start, n), **info}
    if repair:
        step["repair"] = None
        if start > 0:
            name = f"drop{len(tensors)}.{REPAIRED['repair']}"
            tensors[name], step["repair"] = refit_projection(cache, start - 1, target, cfg.repair, cfg.repair_alpha)
            step["repair"].update(tensor=name, layer=start - 1)
            set_weight(model, start - 1, REPAIRED["repair"], tensors[name])
    refit = f", refit layer {start - 1}" if repair and start else ", nothing before the cut to refit" if repair else ""
    log(f"dropped layers {step['original']}{refit} -> {len(tree)} layers")
    return step


def blocks_of(layers: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of sorted layer indices as (first, count)."""
    runs = []
    for i in sorted(layers):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def drop_blocks_repaired(model, cache: HiddenStates, tree, drop: list[int], cfg: ComeConfig, on_depth, t0) -> dict:
    """[OURS] Remove the given layers block by block, shallow first, each block repaired once (drop_layers)."""
    steps, tensors, removed, blocks = [], {}, 0, blocks_of(drop)
    for k, (first, n) in enumerate(blocks):
        at = first - removed        # the block's first layer in the current model
        steps.append(drop_layers(model, tree, at, n, cache, cfg, tensors))
        removed += n
        if k + 1 < len(blocks):     # the next block's refit reads the states of the repaired model
            cache.refresh(max(at - 1, 0), desc="states after the repair")
        _notify(on_depth, model, t0)
    return {"steps": steps, "tree": tree, "tensors": tensors}


def drop_in_order(model, calib_ids, order: list[int], n: int, cfg: ComeConfig, scores: dict[str, list[float]],
                  cache: HiddenStates | None = None, cache_device="cpu", on_depth=None, t0: float = 0.0) -> dict:
    """Remove the first n layers of `order` (original indices) in one shot, each step recording its layer's
    `scores`; the same set at any depth. [OURS] With --repair every contiguous block of them is repaired once
    (drop_blocks_repaired), from `cache` when the caller has one."""
    tree = [[i] for i in range(len(decoder_layers(model)))]
    if cfg.repair != "none":
        if cache is None:
            cache = HiddenStates(model, calib_ids, cache_device)
            cache.refresh(0, desc="states")
        return drop_blocks_repaired(model, cache, tree, order[:n], cfg, on_depth, t0)
    steps, alive = [], list(range(len(tree)))     # the original layer behind each current layer
    for orig in order[:n]:
        steps.append(drop_layers(model, tree, alive.index(orig), 1, **{k: v[orig] for k, v in scores.items()}))
        alive.remove(orig)
        _notify(on_depth, model, t0)
    return {"steps": steps, "tree": tree}


def shortgpt_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """ShortGPT: drop the layers with the lowest Block Influence of the dense model, in one shot.

    [OURS] With --repair every contiguous block of dropped layers is repaired once (drop_blocks_repaired).
    """
    t0 = time.perf_counter()
    cfg = token_rule(cfg, calib_ids, model)
    cache = HiddenStates(model, calib_ids, cache_device)
    cache.refresh(0, desc="BI statistics")
    bi = block_influence(cache.states, cache.device)
    order = sorted(range(len(bi)), key=lambda l: (bi[l], l))
    return drop_in_order(model, calib_ids, order, len(bi) - target_layers, cfg, {"bi": bi},
                         cache if cfg.repair != "none" else None, cache_device, on_depth, t0)


# Shortened LLaMA (Kim et al., 2024) scores whole blocks and drops the least important in one shot; its "+" forms
# never drop the first 4 and the last 2 layers unless nothing else is left.
KEEP_FIRST, KEEP_LAST = 4, 2
REDUCTIONS = ("sum", "mean", "max")     # the authors also list a product: it overflows for any real layer


def heuristic_order(order: list[int], n_layers: int) -> list[int]:
    """The "+" forms: the first KEEP_FIRST and the last KEEP_LAST layers move to the end of a removal order."""
    kept = list(range(KEEP_FIRST)) + list(range(n_layers - KEEP_LAST, n_layers))
    return [l for l in order if l not in kept] + [l for l in kept if l in order]


def _reduce(values: torch.Tensor, how: str) -> torch.Tensor:
    if how not in REDUCTIONS:
        raise ComeError(f"unknown reduction '{how}' (one of {', '.join(REDUCTIONS)})")
    return values.amax(0) if how == "max" else getattr(values, how)(0)


def block_importance(layer: nn.Module, criterion: str, weight_reduction: str, block_reduction: str) -> float:
    """Shortened LLaMA's importance of one block from its weights W (magnitude: |W|; taylor: |W * dL/dW|, the
    gradient in W.grad): for every projection weight the values summed over each output row's inputs, then reduced
    over the rows (`weight_reduction`); for every norm weight the values reduced; those numbers reduced over the
    block's weights (`block_reduction`)."""
    per_weight = []
    for name, w in layer.named_parameters():
        if not name.endswith("weight") or not ("proj" in name or "norm" in name):
            continue
        value = (w.detach().float() * (w.grad.float() if criterion == "taylor" else 1)).abs()
        per_weight.append(_reduce(value.sum(1) if "proj" in name else value, weight_reduction))
    return _reduce(torch.stack(per_weight), block_reduction).item()


def calibration_gradients(model, calib_ids: torch.Tensor) -> None:
    """dL/dW of every decoder-layer weight into W.grad, L = the sum of the calibration windows' mean token losses
    (one window at a time, activations recomputed per layer in backward)."""
    # DEVIATION: the gradient of the whole calibration loss, read once; the authors' code adds a score after every
    # window while the gradients of all earlier windows are still summed in (never zeroed).
    dev, was_training = device_of(model.get_input_embeddings()), model.training
    wanted = {p: p.requires_grad for p in model.parameters()}      # given back as found
    model.requires_grad_(False)
    decoder_layers(model).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    if hasattr(model, "activation_checkpointing_enable"):      # transformers >= 5.x names it so
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()       # transformers checkpoints layers in training mode only; these families have no dropout
    try:
        for i in progress_bar(range(calib_ids.shape[0]), "gradients", total=calib_ids.shape[0]):
            ids = calib_ids[i:i + 1].to(dev)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)
        for p, flag in wanted.items():
            p.requires_grad_(flag)


def shortened_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """Shortened LLaMA's one-shot block criteria as the CoMe authors run them (taylor, magnitude; their "+" forms:
    heuristic_order): drop the blocks of lowest block_importance (taylor: from the gradient of the calibration loss;
    magnitude: from the weights alone). [OURS] With --repair each contiguous block of dropped layers is repaired once.
    """
    t0, criterion, L = time.perf_counter(), cfg.method.rstrip("+"), len(decoder_layers(model))
    cfg = token_rule(cfg, calib_ids, model)
    if criterion == "taylor":
        calibration_gradients(model, calib_ids)
    with torch.no_grad():
        scores = [block_importance(layer, criterion, cfg.weight_reduction, cfg.block_reduction)
                  for layer in decoder_layers(model)]
    model.zero_grad(set_to_none=True)
    order = sorted(range(L), key=lambda l: (scores[l], l))
    order = heuristic_order(order, L) if cfg.method.endswith("+") else order
    return drop_in_order(model, calib_ids, order, L - target_layers, cfg, {"importance": scores},
                         cache_device=cache_device, on_depth=on_depth, t0=t0)


def ppl_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """Shortened LLaMA's PPL criterion: each block scored once, on the dense model, by the calibration NLL of the
    model without it (SLEB's first step); the blocks of lowest NLL are dropped in one shot."""
    t0 = time.perf_counter()
    cfg = token_rule(cfg, calib_ids, model)
    cache = HiddenStates(model, calib_ids, cache_device, cfg.score_windows)
    cache.refresh(0, desc="dense states")
    nll = skip_nll(cache, 1)
    order = sorted(range(len(nll)), key=lambda l: (nll[l], l))
    return drop_in_order(model, calib_ids, order, len(nll) - target_layers, cfg, {"nll": nll},
                         cache if cfg.repair != "none" else None, cache_device, on_depth, t0)


def reverse_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """Reverse-order: drop the last layers, deepest first. [OURS] With --repair the dropped block is repaired once."""
    L = len(decoder_layers(model))
    cfg = token_rule(cfg, calib_ids, model) if cfg.repair != "none" else cfg     # a plain drop reads no text
    return drop_in_order(model, calib_ids, list(range(L - 1, -1, -1)), L - target_layers, cfg, {},
                         cache_device=cache_device, on_depth=on_depth, t0=time.perf_counter())


def sleb_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """SLEB: repeatedly drop the single layer whose removal gives the lowest calibration NLL.

    [OURS] With --repair the layer before each cut is refit right after the removal (drop_layers), inside the
    greedy loop, so that the next removal is chosen on the repaired model.
    """
    t0 = time.perf_counter()
    cfg = token_rule(cfg, calib_ids, model)
    cache = HiddenStates(model, calib_ids, cache_device, cfg.score_windows)
    tree, steps, stale_from, tensors = [[i] for i in range(len(decoder_layers(model)))], [], 0, {}
    while len(tree) > target_layers:
        cache.refresh(stale_from, desc=f"SLEB step {len(steps) + 1}")
        nll = skip_nll(cache, 1)
        index = min(range(len(nll)), key=lambda l: (nll[l], l))
        steps.append(drop_layers(model, tree, index, 1, cache, cfg, tensors, nll=nll[index]))
        # the next removal reads the current model: from the repaired layer before the cut on, else from the cut on
        stale_from = max(index - 1, 0) if cfg.repair != "none" else index
        _notify(on_depth, model, t0)
    return {"steps": steps, "tree": tree, **({"tensors": tensors} if tensors else {})}


def replaceme_distances(states: list[torch.Tensor], n: int, device: torch.device | None = None) -> list[float]:
    """ReplaceMe's block score: mean angular distance arccos(cos)/pi over every calibration token between the state
    entering layer b and the state leaving layer b+n-1, for every block start b >= 1."""
    # INTERPRETATION: every token, not one last token a window (ReplaceMe's default): 13 windows gave 13 vectors.
    return [(torch.arccos(token_cosines(states[b], states[b + n], device).clamp(-1, 1)) / math.pi).mean().item()
            for b in range(1, len(states) - n)]


def replaceme_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """ReplaceMe (Shopkhoev et al., 2025; NeurIPS): replace the contiguous block of n = L - target layers whose
    input and output are closest by a linear transform T folded into the down_proj of the layer before the block.

    Block: argmin over b >= 1 of replaceme_distances (their cosine criterion, here over every calibration token).
    T: least squares on the calibration tokens, min_T ||M T - (H - Y)||^2 with M the MLP output of layer b-1, Y its
    attention residual (the layer's output minus M) and H the state leaving the block; W_down <- T^T W_down.
    How our --repair refit (drop_layers) differs from this estimator: it refits all of W_down (d x d_ff numbers
    instead of T's d x d), regularised toward the old weights (ridge, --repair-alpha) where ReplaceMe's default
    least squares has no ridge, and it runs after every SLEB / ShortGPT removal instead of once per block.
    """
    # INTERPRETATION: one block (ReplaceMe's default), raw last-layer output for H, float64 normal equations.
    t0, L = time.perf_counter(), len(decoder_layers(model))
    n = L - target_layers
    cache = HiddenStates(model, calib_ids, cache_device)
    cache.refresh(0, desc="ReplaceMe states")
    dist = replaceme_distances(cache.states, n, cache.device)
    start = 1 + min(range(len(dist)), key=lambda i: (dist[i], i))
    layer, seen = float32_layer(model, start - 1), {}
    if layer.mlp.down_proj.bias is not None:
        raise ComeError("replaceme: a down_proj with a bias is not supported")
    d, dev = model.config.hidden_size, layer.mlp.down_proj.weight.device
    MtM, MtR = (torch.zeros(d, d, dtype=torch.float64, device=dev) for _ in range(2))
    def keep_output(module, args, out) -> None:    # the MLP output M of the window being run
        seen["m"] = out
    handle = layer.mlp.register_forward_hook(keep_output)
    try:
        with torch.inference_mode():
            for i in range(cache.states[0].shape[0]):
                out = cache.run_layer(layer, start - 1, cache.states[start - 1][i:i + 1]).reshape(-1, d).double()
                M = seen["m"].reshape(-1, d).double()
                R = cache.states[start + n][i].to(dev).reshape(-1, d).double() - (out - M)     # H - Y
                MtM += M.T @ M
                MtR += M.T @ R
    finally:
        handle.remove()
    T = torch.linalg.lstsq(MtM.cpu(), MtR.cpu(), driver="gelsd").solution     # minimum norm where M is rank-deficient
    dtype = next(decoder_layers(model)[0].parameters()).dtype
    weight = (T.T @ layer.mlp.down_proj.weight.detach().double().cpu()).to(dtype)
    tree = [[i] for i in range(L)]
    step = {"op": "drop", "layer": start, "count": n, "original": drop_from_tree(tree, start, n), "distances": dist,
            "repair": {"kind": "replaceme", "tensor": "replaceme.mlp.down_proj.weight", "layer": start - 1}}
    replay_step(model, step, tensors={"replaceme.mlp.down_proj.weight": weight})
    log(f"ReplaceMe: replaced original layers {step['original']} by a linear transform in layer {start - 1}")
    _notify(on_depth, model, t0)
    return {"steps": [step], "tree": tree, "tensors": {"replaceme.mlp.down_proj.weight": weight}}


# INTERPRETATION: LLM-Streamline's replacement is one decoder layer of the model's own shape (the paper's transformer
# layer form, so that every layer keeps one shape), initialized from the run's first layer and trained by mean squared
# error on the calibration states with AdamW; the paper trains on its own corpus, and these are our epochs and rate.
STREAMLINE_EPOCHS, STREAMLINE_LR = 10, 1e-4


def run_similarities(cache: HiddenStates, n: int) -> list[float]:
    """Mean cosine over every calibration token between the state entering layer l and the state leaving layer
    l+n-1, for every start l."""
    return [token_cosines(cache.states[l], cache.states[l + n], cache.device).mean().item()
            for l in range(len(cache.states) - n)]


def train_replacement(cache: HiddenStates, start: int, target: torch.Tensor) -> tuple[dict, dict]:
    """Layer `start` trained (in float32) to map the cached state entering it to `target`, window by window: MSE,
    AdamW, STREAMLINE_EPOCHS epochs in a seeded order. Returns its weights in the model's dtype and the MSE before
    and after, on the calibration windows."""
    work = float32_layer(cache.model, start)
    dtype = next(decoder_layers(cache.model)[start].parameters()).dtype
    windows = cache.states[start].shape[0]

    def mse(i: int) -> torch.Tensor:
        out = cache.run_layer(work, start, cache.states[start][i:i + 1]).float()
        return F.mse_loss(out, target[i:i + 1].to(out.device).float())

    def mean_mse() -> float:
        with torch.no_grad():
            return sum(mse(i).item() for i in range(windows)) / windows
    before = mean_mse()
    work.requires_grad_(True)
    opt = torch.optim.AdamW(work.parameters(), lr=STREAMLINE_LR, weight_decay=0.0)
    order = torch.Generator().manual_seed(0)
    for _ in progress_bar(range(STREAMLINE_EPOCHS), "Streamline replacement", total=STREAMLINE_EPOCHS):
        for i in torch.randperm(windows, generator=order).tolist():
            mse(i).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    work.requires_grad_(False)
    weights = {k: v.detach().to("cpu", dtype) for k, v in work.state_dict().items()}
    return weights, {"mse_before": before, "mse_after": mean_mse()}


def streamline_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """LLM-Streamline (Chen et al., ICLR 2025): the run of n = L - target + 1 consecutive layers whose entering and
    leaving states are the most similar (run_similarities) is replaced by ONE layer trained to map the one to the
    other (train_replacement); the run's other layers are dropped, so their span passes to it."""
    t0, L = time.perf_counter(), len(decoder_layers(model))
    n = L - target_layers + 1
    cache = HiddenStates(model, calib_ids, cache_device)
    cache.refresh(0, desc="Streamline states")
    sims = run_similarities(cache, n)
    start = max(range(len(sims)), key=lambda l: (sims[l], -l))
    weights, losses = train_replacement(cache, start, cache.states[start + n])
    del cache
    tree = [[i] for i in range(L)]
    step = drop_layers(model, tree, start + 1, n - 1, similarity=sims[start], similarities=sims)
    tensors = {f"streamline.{k}": v for k, v in weights.items()}
    step["replaced"] = {"layer": start, "tensor": "streamline", **losses}      # its weights: streamline.<name>
    replay_weights(model, step, tensors)
    log(f"LLM-Streamline: original layers {tree[start]} replaced by one trained layer (MSE {losses['mse_before']:.4g}"
        f" -> {losses['mse_after']:.4g})")
    _notify(on_depth, model, t0)
    return {"steps": [step], "tree": tree, "tensors": tensors}


# MKA (Liu et al., EMNLP 2024, "Pruning via Merging"), as the CoMe authors run it: the states leaving every layer on
# the first MKA_TOKENS tokens of each calibration window; each layer's windows embedded in MKA_DIMS coordinates by a
# diffusion kernel and rank-normalized; the similarity of two layers the normalized information bottleneck (NPIB) of
# their embeddings; then the last two layers merged by a weighted sum, again and again. The authors' constants:
MKA_TOKENS, MKA_SIGMA, MKA_ALPHA, MKA_DIMS, MKA_BETA = 512, 8.0, 0.5, 2, 1.0
# INTERPRETATION: the authors derive both neighbor counts from MMLU's categories (250 rows, 50 tasks): mutual
# information with 250 // 50 = 5 neighbors, entropy with 50. We keep those numbers for any calibration text.
MKA_MI_NEIGHBORS, MKA_ENTROPY_NEIGHBORS = 5, 50
MKA_BLOCK_BYTES = 1 << 26       # the float64 token block the distances are summed from (64 MiB)


def window_distances(cache: HiddenStates, boundary: int) -> torch.Tensor:
    """Euclidean distance between every two calibration windows' states at `boundary` (all their tokens, flattened),
    summed in float64 over token blocks of at most MKA_BLOCK_BYTES; shape (windows, windows)."""
    states, norm = cache.states[boundary], cache.model.model.norm
    n, T, d = states.shape
    block = max(1, MKA_BLOCK_BYTES // (n * d * 8))
    gram = torch.zeros(n, n, dtype=torch.float64, device=cache.device)
    with torch.inference_mode():
        for s in range(0, T, block):
            x = states[:, s:s + block]
            # INTERPRETATION: the last layer's state is read after the final norm, as the authors' hidden-state
            # tuple gives it (every other boundary is a raw layer output)
            x = norm(x.to(device_of(norm))) if boundary == len(cache.states) - 1 else x
            x = x.to(cache.device, torch.float64).reshape(n, -1)
            gram += x @ x.T
    dist = (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).abs().sqrt()
    # DEVIATION: one kernel row per window over all its tokens; the authors' chunking compares token a of the first
    # window of a chunk of windows with token b of another chunk's first window and calls that windows i+a and j+b.
    return dist.fill_diagonal_(0.0)


def diffusion_embedding(dist: torch.Tensor, sigma: float = MKA_SIGMA, alpha: float = MKA_ALPHA,
                        dims: int = MKA_DIMS) -> torch.Tensor:
    """The authors' diffusion map of n points from their distances (float64): K = exp(-sqrt(D / sigma)),
    K1 = K / (p p^T)^alpha with p the column sums of K, A = K1 / (v v^T) with v^2 the column sums of K1; a
    singular A gets 1e-6, 1e-5, ... on its diagonal (at most 10 times); entries below 1e-12 in magnitude become
    1e-12; the top dims + 1 left singular vectors U (signed so that the largest entry of each is positive), each
    divided by the first: returns U[:, 1:dims + 1] (n, dims)."""
    k = torch.exp(-(dist.double() / sigma).sqrt())
    k1 = k / torch.outer(k.sum(0), k.sum(0)) ** alpha
    a = k1 / torch.outer(k1.sum(0).sqrt(), k1.sum(0).sqrt())
    for i in range(10):
        if torch.isfinite(torch.linalg.cond(a)):
            break
        a = a + 1e-6 * 10 ** i * torch.eye(len(a), dtype=a.dtype, device=a.device)
    a = torch.nan_to_num(a)
    a = torch.where(a.abs() < 1e-12, torch.full_like(a, 1e-12), a)
    u = torch.linalg.svd(a, full_matrices=False).U[:, :dims + 1]
    # INTERPRETATION: each singular vector's sign fixed (its largest entry positive), so that runs agree; a flip
    # would reverse a coordinate's ranks, which the similarity does not see
    u = u * torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    first = torch.where(u[:, 0] == 0, torch.full_like(u[:, 0], 1e-8), u[:, 0])
    return u[:, 1:] / first[:, None]


def rank_normalize(y: torch.Tensor) -> torch.Tensor:
    """Each column replaced by its ranks / n (non-finite values read as 0 first), as the authors do."""
    y = torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.argsort(torch.argsort(y, dim=0, stable=True), dim=0, stable=True).double() / y.shape[0]


def ksg_mutual_information(x: torch.Tensor, y: torch.Tensor, k: int, generator: torch.Generator | None = None,
                           jitter: float = 1e-10) -> float:
    """Kraskov's estimator of I(x; y) for two samples of n numbers, as scikit-learn's mutual_info_regression computes
    it: each scaled to unit standard deviation plus a jitter (jitter x max(1, mean |.|) x N(0, 1)) that breaks ties;
    r_i the max-norm distance of (x_i, y_i) to its k-th neighbor, narrowed by one float step; n_x(i), n_y(i) the
    points within r_i in x and in y (i itself included); I = psi(n) + psi(k) - <psi(n_x)> - <psi(n_y)>, at least 0."""
    def prepared(v: torch.Tensor) -> torch.Tensor:
        v = v.double().flatten()
        v = v / v.std(unbiased=False) if v.std(unbiased=False) > 0 else v     # scikit-learn's scale
        return v + jitter * max(1.0, v.abs().mean().item()) * torch.randn(v.numel(), generator=generator,
                                                                          dtype=torch.float64).to(v.device)
    x, y, n = prepared(x), prepared(y), x.numel()
    dx, dy = (x[:, None] - x[None, :]).abs(), (y[:, None] - y[None, :]).abs()
    joint = torch.maximum(dx, dy).fill_diagonal_(math.inf)
    radius = joint.kthvalue(k, dim=1).values
    radius = torch.nextafter(radius, torch.zeros_like(radius))[:, None]     # strictly inside the k-th distance
    nx, ny = (dx <= radius).sum(1).double(), (dy <= radius).sum(1).double()
    psi = torch.special.digamma
    mi = psi(torch.tensor([n, k], dtype=torch.float64)).sum() - psi(nx).mean().cpu() - psi(ny).mean().cpu()
    return max(0.0, mi.item())


def knn_entropy(x: torch.Tensor, k: int) -> float:
    """The authors' k-nearest-neighbor entropy of n points in d dimensions: -mean log(k / (n r_k^d)), r_k the
    Euclidean distance of each point to its k-th neighbor."""
    n, d = x.shape
    r = ((x.double()[:, None] - x.double()[None, :]) ** 2).sum(-1).sqrt().kthvalue(k + 1, 1).values  # itself first
    return -torch.log(k / (n * r ** d)).mean().item()


def npib_similarity(embeddings: list[torch.Tensor], mi_neighbors: int = MKA_MI_NEIGHBORS,
                    entropy_neighbors: int = MKA_ENTROPY_NEIGHBORS, seed: int = 0, jitter: float = 1e-10) \
        -> torch.Tensor:
    """S[i, j] = I(E_i; E_j) / sqrt(H(E_i) H(E_j)) for every two layers' embeddings E (n, dims): I the mean of the KSG
    estimates over every pair of their coordinates, H the k-NN entropy. The jitter is drawn from `seed`."""
    gen, L = torch.Generator().manual_seed(seed), len(embeddings)
    h = [knn_entropy(e, entropy_neighbors) for e in embeddings]
    sim = torch.zeros(L, L, dtype=torch.float64)
    for i in progress_bar(range(L), "MKA similarity", total=L):
        for j in range(i, L):
            mi = [ksg_mutual_information(embeddings[i][:, a], embeddings[j][:, b], mi_neighbors, gen, jitter)
                  for b in range(embeddings[j].shape[1]) for a in range(embeddings[i].shape[1])]
            sim[i, j] = sim[j, i] = sum(mi) / len(mi) / math.sqrt(h[i] * h[j]) if h[i] * h[j] > 0 else math.nan
    if not torch.isfinite(sim).all():
        raise ComeError("MKA: layers' entropy estimates of opposite signs leave their similarity undefined (the "
                        "authors' code would merge with NaN ratios); give more calibration windows (--nsamples)")
    return sim


def check_mka_windows(windows: int) -> None:
    if windows <= MKA_ENTROPY_NEIGHBORS + 1:
        raise ComeError(f"MKA needs at least {MKA_ENTROPY_NEIGHBORS + 2} calibration windows, got {windows}; cut "
                        f"the text into shorter windows (--seqlen {MKA_TOKENS}: MKA reads the first {MKA_TOKENS} "
                        "tokens of each) or give more of it (--nsamples)")


def mka_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """MKA: layer similarities from the dense model's calibration states (window_distances -> diffusion_embedding ->
    rank_normalize -> npib_similarity), computed once; then, until the target depth, the last two layers are merged
    by weighted_sum_merge, the earlier with r = sigmoid(beta s_a / (s_a + s_b)), s the mean of a layer's row of the
    similarity, the later with 1 - r."""
    t0, L = time.perf_counter(), len(decoder_layers(model))
    check_mka_windows(calib_ids.shape[0])
    # causal: the states of a window's first MKA_TOKENS tokens are those of those tokens alone
    cache = HiddenStates(model, calib_ids[:, :MKA_TOKENS], cache_device)
    cache.refresh(0, desc="MKA states")
    embeddings = [rank_normalize(diffusion_embedding(window_distances(cache, l))).cpu()
                  for l in progress_bar(range(1, L + 1), "MKA embeddings", total=L)]
    del cache
    sim = npib_similarity(embeddings)
    tree, steps = [[i] for i in range(L)], []
    while len(tree) > target_layers:
        # the authors read the similarity rows of the original layers at the last two positions: the merged layer
        # at the end keeps the row of the original layer it replaced
        a, b = len(tree) - 2, len(tree) - 1
        s_a, s_b = sim[a].mean().item(), sim[b].mean().item()
        r = 1.0 / (1.0 + math.exp(-MKA_BETA * s_a / (s_a + s_b)))      # the fusion ratio: a sigmoid
        # DEVIATION: weighted_sum_merge weights q/k/v biases too (Qwen2); the authors sum both layers' unscaled
        steps.append({"op": "weightsum", "window": [a, b], "ratios": [r, 1.0 - r], "similarity": [s_a, s_b],
                      "spans": tree[a:],
                      **({} if steps else {"npib_similarity": sim.tolist()})})
        replay_step(model, steps[-1])
        join_window(tree, a, 2)
        _notify(on_depth, model, t0)
    log(f"MKA: original layers {tree[-1]} merged into the last layer")
    return {"steps": steps, "tree": tree}


# INTERPRETATION: LaCo's similarity threshold and search interval (the LaCo paper's values, not tuned here).
LACO_THRESHOLD, LACO_INTERVAL = 0.65, 2


def laco_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """LaCo (Layer Collapse): collapse `span` adjacent layers into one by RDSC, searching from the top down.

    A candidate is accepted when the cosine similarity of the final hidden states (merged vs dense model, mean over
    calibration tokens) is at least LACO_THRESHOLD; the search then continues LACO_INTERVAL layers further down and
    wraps around to the top. If a whole sweep accepts nothing, its most similar candidate is merged.
    """
    # INTERPRETATION: the wrap-around and the best-candidate fallback make LaCo reach an exact target depth.
    t0 = time.perf_counter()
    cache = HiddenStates(model, calib_ids, cache_device)
    cache.refresh(0, desc="LaCo dense pass")
    dense_out = cache.states[-1].clone()
    tree, steps, pointer = [[i] for i in range(len(decoder_layers(model)))], [], -1
    while len(tree) > target_layers:
        span = next_span(len(tree), cfg.span, target_layers, stops)
        layers = decoder_layers(model)
        pointer = pointer if 0 <= pointer <= len(tree) - span else len(tree) - span
        tried = []
        for start in range(pointer, -1, -1):
            candidate = spare_layer(model, start)
            candidate.load_state_dict(rdsc_merge([layer_state(layers[i]) for i in range(start, start + span)]))
            suffix = [(start, candidate)] + [(i, layers[i]) for i in range(start + span, len(layers))]
            tried.append((cache.similarity_from(start, suffix, dense_out), start))
            if tried[-1][0] >= LACO_THRESHOLD:
                break
        sim, start = tried[-1] if tried[-1][0] >= LACO_THRESHOLD else max(tried)
        steps.append({"op": "rdsc", "window": list(range(start, start + span)),
                      "spans": tree[start:start + span], "similarity": sim})
        replay_step(model, steps[-1])
        cache.after_merge(start, span)
        join_window(tree, start, span)
        log(f"LaCo: collapsed original layers {steps[-1]['spans']} (similarity {sim:.3f}) -> {len(tree)} layers")
        pointer = start - LACO_INTERVAL
        _notify(on_depth, model, t0)
        if len(tree) > target_layers:
            cache.refresh(start, desc=f"LaCo step {len(steps) + 1}")
    return {"steps": steps, "tree": tree}


def weightsum_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=(),
                    come_plan: dict | None = None) -> dict:
    """The paper's WeightSum ablation: exactly CoMe's windows and ratios, merged by the weighted sum of parameters."""
    t0 = time.perf_counter()
    if come_plan is None:   # CoMe must see its own merged model to choose each next window
        come_plan = come_prune(copy.deepcopy(model), calib_ids, target_layers, dataclasses.replace(cfg, method="come"),
                               cache_device, stops=stops)
    tree, steps = [[i] for i in range(len(decoder_layers(model)))], []
    for step in come_plan["steps"]:
        if len(tree) <= target_layers:
            break
        steps.append({"op": "weightsum", "window": step["window"], "ratios": step["ratios"],
                      "spans": tree[step["window"][0]:step["window"][-1] + 1]})
        replay_step(model, steps[-1])
        join_window(tree, step["window"][0], len(step["window"]))
        _notify(on_depth, model, t0)
    return {"steps": steps, "tree": tree}


PRUNERS = {"come": come_prune, "come-p": come_prune, "come+": come_prune, "shortgpt": shortgpt_prune,
           "sleb": sleb_prune, "laco": laco_prune, "weightsum": weightsum_prune, "reverse": reverse_prune,
           "replaceme": replaceme_prune, "taylor": shortened_prune, "taylor+": shortened_prune,
           "magnitude": shortened_prune, "magnitude+": shortened_prune, "ppl": ppl_prune,
           "streamline": streamline_prune, "mka": mka_prune}
COME_METHODS = ("come", "come-p", "come+")
DROPPERS = ("shortgpt", "sleb", "reverse", "replaceme", "taylor", "taylor+", "magnitude", "magnitude+", "ppl",
            "streamline")
# (methods that remove layers instead of merging them)


def span_for(method: str, span: int | None) -> int:
    """--span, or the method's default: LaCo collapses 4 layers at a time (its paper's C), the others merge 2."""
    # INTERPRETATION: LaCo's own C = 4 by default; with 2 its RDSC formula reduces to keeping the upper layer.
    return span if span is not None else 4 if method == "laco" else 2


# ============================================================================ machinery (not the method)
# The host heap, progress bars, where a module computes, weights a device_map keeps off the GPU (accelerate's
# hooks), and the repository's modules that opt-in paths load beside come.py.
def release_heap() -> None:
    """[OURS] Return the freed memory glibc keeps in its heap: tensors of a few MiB come from there and stay resident,
    fragmented, once freed (0.3-0.7 GiB at SmolLM2's pruning peak). Called after each layer (or window) of a pass,
    it keeps the process at the tensors it holds; nothing where the C library has no malloc_trim."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).malloc_trim(0)


def progress_bar(iterable, desc: str, total: int | None = None):
    """tqdm progress bar when tqdm is installed (quiet on torchrun ranks other than 0); plain iteration otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    quiet = None if os.environ.get("RANK", "0") == "0" else True
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=quiet, dynamic_ncols=True)


def device_of(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device under a device_map, else its weights'; a GPU
    always with its index (a bare "cuda" from a device_map means the current GPU), so that every CUDA call names one."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    dev = next(module.parameters()).device if dev is None else torch.device("cuda", dev) if isinstance(dev, int) \
        else torch.device(dev)      # accelerate names a GPU by its index
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def offloaded(module: nn.Module) -> bool:
    """Whether a device_map keeps (some of) the module's weights off its device (meta until it runs)."""
    return any(p.device.type == "meta" for p in module.parameters())


@contextlib.contextmanager
def materialized(module: nn.Module):
    """The module with every offloaded weight on its execution device for the duration, loaded once.

    accelerate's hooks copy an offloaded module's weights in before every forward and drop them after; inside this
    context they stay, so a loop over windows pays one copy per layer instead of one per window.
    """
    hooked = []
    if offloaded(module):
        from accelerate.utils import has_offloaded_params
        hooked = [m for m in module.modules() if has_offloaded_params(m)]
    try:
        for m in hooked:
            m._hf_hook.pre_forward(m)
            m._hf_hook.offload = False      # later forwards find the weights in place
        yield module
    finally:
        for m in hooked:
            m._hf_hook.offload = True
            m._hf_hook.post_forward(m, None)


def _beside(module: str, purpose: str):
    """A module of this repository that an opt-in path needs next to come.py (the method itself needs none)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ComeError(f"{purpose} needs {module}.py next to come.py: copy it from the CoMe repository too "
                        "(the methods themselves need only come.py, torch and transformers)") from None


# ============================================================================ CLI entry
def main(argv: list[str] | None = None) -> dict:
    """`python come.py ...`: the command line lives in come_cli.py (arguments, memory plan, evaluation, files)."""
    try:
        cli = _beside("come_cli", "the command line")
    except ComeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cli.main(argv)


if __name__ == "__main__":
    main()
