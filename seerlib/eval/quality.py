"""Recall of attention mass and the per-config perplexity / recall / density rows."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seerlib import metrics
from seerlib.capture import attention_override, pre_rope_hooks
from seerlib.eval.maps_cache import cached_maps, maps_key, maps_path, model_key, save_maps
from seerlib.eval.ppl import _nll, _result
from seerlib.families import family_of
from seerlib.integrate import count_blocks, sparsify
from seerlib.longtext import text_windows
from seerlib.methods import LayerInputs, ground_truth, layer_block_mask


@dataclass
class RecallResult:
    """Recall of attention mass of one selection config, averaged over windows, layers, heads and
    query-block rows, with its achieved density (kept share of causal blocks)."""

    label: str
    recall: float
    density: float
    per_layer_recall: list[float] = field(default_factory=list)


@torch.no_grad()
def dense_pass(model, ids: torch.Tensor, configs, gates=None, block_size: int = 64,
               maps: dict | None = None, need_maps: bool | None = None):
    """One dense forward over `ids`, scoring block selections inside every layer.

    For each layer that `sparsify` makes sparse (not the sliding-window layers, which keep their
    window: Gemma3's 15 of 18) the exact attention mass per tile (`metrics.block_mass`, post-RoPE
    Q/K) is the reference: each config's mask (built by `integrate.layer_block_mask`, the code
    `sparsify` runs) gets its recall and kept/causal counts. Oracle configs select from the dense
    maps.

    Args:
        model: the (dense) transformers model.
        ids: (B, S) token ids.
        configs: SparseConfigs to score (dense ones are skipped).
        gates: GateSet for the configs whose method reads a gate.
        block_size: tile size b (every config must use it).
        maps: {layer: {"max": (B, Hq, nb, nb), "sum": ...}} from an earlier pass over the same ids
            (skips the ground-truth computation), or None.
        need_maps: compute the maps (default: when a config needs them, i.e. any sparse config).
    Returns:
        (nll (B, S - 1), scores, maps): scores maps each config label to
        {"recall": [per layer], "kept": int, "causal": int}; maps as the `maps` argument.
    """
    configs = [c for c in configs if c.spec.sparse]
    for c in configs:
        if c.block_size != block_size:
            raise ValueError(
                f"config {c.label} has block size {c.block_size}; expected {block_size}"
            )
    if need_maps is None:
        need_maps = bool(configs)
    maps = {} if maps is None else maps
    scores = {c.label: {"recall": [], "kept": 0, "causal": 0} for c in configs}
    pre: dict = {}

    family = family_of(model)

    def score(module, query, key, value, attention_mask, *, default, **kwargs):
        layer = module.layer_idx
        p = pre.pop(layer, None)
        scale = kwargs.get("scaling")
        softcap = kwargs.get("softcap")  # Gemma2's attn_logit_softcapping, None elsewhere
        if family.keeps_own_attention(model.config, layer, key.shape[2]):
            # a sliding-window layer keeps its window under sparsify: nothing selected to score
            return default(module, query, key, value, attention_mask, **kwargs)
        if need_maps:
            if layer not in maps:
                maps[layer] = {pool: ground_truth(query, key, value, block_size, pool, scale,
                                                  softcap=softcap)
                               for pool in ("max", "sum")}
            mass = maps[layer]["sum"]
            for c in configs:
                truth = c.spec.ground_truth
                mask = layer_block_mask(c, LayerInputs(
                    query, key, value, block_size, scale=scale, softcap=softcap,
                    gate=gates[layer] if gates is not None else None,
                    q_pre=p["q_pre"] if p else None, k_pre=p["k_pre"] if p else None,
                    weights=maps[layer][truth] if truth else None,
                ))
                s = scores[c.label]
                s["recall"].append(float(metrics.recall(mass, mask)))
                kept, causal = count_blocks(mask)
                s["kept"] += kept
                s["causal"] += causal
        return default(module, query, key, value, attention_mask, **kwargs)

    use_gate = any(c.spec.needs_gate for c in configs)
    hooks = pre_rope_hooks(model, pre) if use_gate else contextlib.nullcontext()
    with hooks, attention_override(model, score):
        nll = _nll(model, ids).cpu()
    return nll, scores, maps


def evaluate(model, tokenizer, configs, lengths, windows: int, gates=None, block_size: int = 64,
             offset: int = 0, cache: Path | None = None, on_row=None, progress: bool = True,
             recall: bool = True, text: str = "kjv"):
    """Perplexity, recall and achieved density of each config at each length.

    Per window: one dense pass (dense perplexity, ground-truth maps, every config's recall and
    density on the dense attention), then one sparse forward per sparse config. Oracle configs
    select from the dense pass's maps of that window (the blocks of the dense model's own
    attention), so they need no second ground-truth pass. With `recall=False` the dense pass skips
    the ground truth (the slow part on a CPU): recall is nan, the achieved density is counted in
    the sparse forwards, and oracle configs are refused.

    `cache` (a folder) keeps each window's ground-truth maps (`seerlib.eval.maps_cache`): a file
    made from this model, window and block size is used; any other (other inputs, damaged, cut
    short, an old pickle) is computed again and replaced, with a line on stderr saying why.

    `text`: the evaluation split of one of `seerlib.longtext.TEXTS` ("kjv", "longtext",
    "longtext+kjv"), read by `longtext.text_windows`.

    Memory at S tokens, nb = S / b blocks, one window (B = 1), Hq query heads, L layers: no
    S x S map per head is ever held (9 x 32768^2 x 4 B would be 38 GB). The maps are
    (Hq, nb, nb) float32 per layer and pool, kept for every layer through the window's sparse
    forwards: 2 L Hq nb^2 4 B. "max" comes from `ops.pooled_attention` (the fused kernel on CUDA
    in bf16/fp16, which never writes the probabilities; elsewhere the reference, in row chunks),
    "sum" from `metrics.block_maps`, which scores 64-row chunks: one (Hq, 64, S) float32 block of
    probabilities at a time. SmolLM2 (Hq 9, L 30) at 32768 tokens, b 64: 19 MB per layer, 566 MB
    in all, a 75 MB chunk transient. The dense forwards run the model's SDPA (no mask: flash on
    CUDA), the sparse ones the block-sparse kernel (CUDA, bf16/fp16). The largest transient is
    the logits in `_nll`: S x vocab float32, 6.4 GB at 32768 tokens (SmolLM2's 49152), about
    3x that at the peak of the cross-entropy.

    Returns:
        list of row dicts (label, method, density_target, threshold, length, windows, ppl, nll,
        tokens, per_window, achieved_density, recall, per_layer_recall, seconds).
    """
    rows = []
    sparse = [c for c in configs if c.spec.sparse]
    if not recall and any(c.spec.ground_truth for c in sparse):
        raise ValueError("oracle configs select from the ground-truth maps; they need recall=True")
    cache = Path(cache) if cache is not None and recall else None  # no maps without recall
    model_fields = model_key(model) if cache is not None else None  # hashes the weights once
    device = next(model.parameters()).device
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
    for S in lengths:
        ids_all = text_windows(tokenizer, text, "eval", S, windows, offset=offset)
        acc = {c.label: {"nll": [], "recall": [], "kept": 0, "causal": 0, "sec": 0.0}
               for c in configs}
        for w in range(ids_all.shape[0]):
            ids = ids_all[w : w + 1]
            maps = key = path = None
            if cache is not None:
                key = maps_key(model_fields, ids, w, offset, block_size)
                path = maps_path(cache, S, w, offset, block_size)
                maps = cached_maps(path, key, device, log)
            fresh = maps is None
            t0 = time.time()
            nll, scores, maps = dense_pass(model, ids, sparse, gates=gates, block_size=block_size,
                                           maps=maps, need_maps=recall)
            dense_sec = time.time() - t0
            if path is not None and fresh and maps:
                save_maps(path, maps, key)
            for c in configs:
                a = acc[c.label]
                if not c.spec.sparse:
                    a["nll"].append(nll)
                    a["sec"] += dense_sec
                    continue
                s = scores[c.label]
                a["recall"].append(s["recall"])
                a["kept"] += s["kept"]
                a["causal"] += s["causal"]
                kw = {}
                if c.spec.ground_truth:
                    kw["oracle_weights"] = {i: m[c.spec.ground_truth] for i, m in maps.items()}
                if c.spec.needs_gate:
                    kw["gates"] = gates
                t0 = time.time()
                with sparsify(model, c, **kw) as sp:
                    a["nll"].append(_nll(model, ids).cpu())
                a["sec"] += time.time() - t0
                if not recall:
                    a["kept"] += sp.stats.kept_blocks
                    a["causal"] += sp.stats.causal_blocks
                if progress:
                    print(f"  S={S} window {w}: {c.label} ppl "
                          f"{math.exp(a['nll'][-1].double().mean()):.3f} density "
                          f"{sp.stats.achieved_density:.3f} ({time.time() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
            if progress:
                print(f"S={S} window {w} done; dense ppl {math.exp(nll.double().mean()):.3f} "
                      f"({dense_sec:.0f} s)", file=sys.stderr, flush=True)
        for c in configs:
            a = acc[c.label]
            res = _result(a["nll"])
            if not c.spec.sparse:
                rec, dens, per_layer = 1.0, 1.0, []
            elif not recall:
                rec, dens, per_layer = float("nan"), a["kept"] / a["causal"], []
            else:
                per_layer = torch.tensor(a["recall"]).mean(dim=0).tolist()  # (layers,)
                rec, dens = sum(per_layer) / len(per_layer), a["kept"] / a["causal"]
            row = dict(label=c.label, method=c.method,
                       density_target=c.selection.density, threshold=c.selection.threshold,
                       length=S,
                       windows=ids_all.shape[0], ppl=res.ppl, nll=res.nll, tokens=res.tokens,
                       per_window=res.per_window, achieved_density=dens, recall=rec,
                       per_layer_recall=per_layer, seconds=a["sec"])
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
