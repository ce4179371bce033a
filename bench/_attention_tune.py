"""`bench_attention.py --tune`: launch variants of the kernels at one shape and length, and the
peers timed in the same process on the same inputs and masks, so the ratios come from one run.

The block-sparse forward ("seer") at sparsity 0 and 0.9 (random mask, kv-major launch order):
rows_per_tile {1, 2} x (num_warps, num_stages) in LAUNCHES x tma {False, True} x warp_specialize
(only with tma), each with its time, TFLOP/s on the kept tiles, and the relative error of its
output against the default launch on the pointer path (tma=False), so a variant that compiles
but computes garbage shows. A variant that fails (compile error, resources) is recorded with the
exception text. Besides: the default launch as the library picks it (tma=None), the pooled kernel
as before, and the peers: SDPA cuDNN and flash (dense) and FlexAttention on the 90% mask.

Writes `{**meta, "seq_len", "rows"}` after every row (a device call may be cut at 10 minutes)
and prints a summary: the best variant per (sparsity, rows_per_tile) and the peers.
"""

from __future__ import annotations

import math

import torch
from _attention_peers import flex_setup, random_mask, realized_sparsity, rel_err, sdpa_fn
from _results import write_json
from triton.testing import do_bench

from seerlib import reference as ref
from seerlib.kernels.block_index import build_block_index
from seerlib.kernels.block_sparse_attention import block_sparse_attention
from seerlib.kernels.pooled_attention import pooled_attention

LAUNCHES = ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4))  # (num_warps, num_stages)
PEERS = ("sdpa_cudnn", "sdpa_flash", "flex")
SPARSITIES = (0.0, 0.9)
OK_ERR = 2e-2  # a variant further than this from the pointer path's output is broken
ERROR_CHARS = 4000  # exception text kept per failed row (Triton's can run to pages)


def seer_variants(which: str = "sweep") -> list[dict]:
    """The block-sparse kernel's tune variants, as keyword arguments of `block_sparse_attention`.
    "sweep" (36): rows_per_tile x LAUNCHES x (tma, warp_specialize) in (F, F), (T, F), (T, T).
    "pair" (8): rows_per_tile x tma x pair_blocks at the library's launch (`sparse_launch`), the
    paired loop beside the unpaired one in a short call."""
    if which == "pair":
        return [{"rows_per_tile": qpt, "kv_major": True, "tma": tma, "pair_blocks": pair}
                for qpt in (1, 2) for tma in (False, True) for pair in (False, True)]
    if which != "sweep":
        raise ValueError(f"variants must be 'sweep' or 'pair'; got {which!r}")
    return [
        {"rows_per_tile": qpt, "num_warps": w, "num_stages": s, "kv_major": True, "tma": tma,
         "warp_specialize": ws}
        for qpt in (1, 2)
        for w, s in LAUNCHES
        for tma, ws in ((False, False), (True, False), (True, True))
    ]


def _error_text(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    if len(text) <= ERROR_CHARS:
        return text
    half = ERROR_CHARS // 2
    return text[:half] + " ... " + text[-half:]


def _median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def tune(cfg, S: int, out_path: str, kernels=("seer", "pooled"), peers=PEERS, device="cuda",
         timer=_median_ms, variants: str = "sweep"):
    """Time the variants at cfg's shape (B, Hq, Hkv, d, block) and length S; see the module.

    Args:
        cfg: bench_attention's Config (batch, q_heads, kv_heads, head_dim, block_size, dtype,
            meta); S: sequence length; out_path: the JSON file, rewritten after every row.
        kernels: which of "seer", "pooled" to tune; peers: which of PEERS to time (besides
            "seer"); device, timer: where to run and how to time a callable (ms), for tests.
        variants: the seer variant set, "sweep" or "pair" (`seer_variants`).
    Returns:
        rows: the list written under "rows".
    """
    B, Hq, Hkv, d, b = cfg.batch, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.block_size
    torch.manual_seed(0)
    q = torch.randn(B, Hq, S, d, device=device, dtype=cfg.dtype)
    k = torch.randn(B, Hkv, S, d, device=device, dtype=cfg.dtype)
    v = torch.randn(B, Hkv, S, d, device=device, dtype=cfg.dtype)
    nb = ref.num_blocks(S, b)
    flops = 4.0 * B * Hq * S * S * d / 2  # causal dense
    rows = []
    doc = {**cfg.meta, "seq_len": S, "q_heads": Hq, "kv_heads": Hkv, "head_dim": d,
           "block_size": b, "rows": rows}

    def add(row):
        rows.append(row)
        print(row, flush=True)
        write_json(out_path, doc)

    base_out = {}  # sparsity -> the default launch's output on the pointer path
    for sp in SPARSITIES if "seer" in kernels or "flex" in peers else ():
        mask = random_mask(B, Hq, nb, sp, device, seed=1)
        kept = 1 - realized_sparsity(mask)
        base_out[sp] = block_sparse_attention(q, k, v, mask, b, tma=False)
        if "seer" not in kernels:
            continue
        seer_vars = [{"variant": "default"}] + seer_variants(variants)  # default: the library's
        indexes = {}
        for var in seer_vars:
            kw = {key: val for key, val in var.items() if key != "variant"}
            qpt = kw.get("rows_per_tile")
            row = {"kernel": "seer", "variant": var.get("variant", "sweep"), "sparsity": sp,
                   "realized_sparsity": 1 - kept, "rows_per_tile": qpt,
                   "num_warps": kw.get("num_warps"), "num_stages": kw.get("num_stages"),
                   "kv_major": kw.get("kv_major", True), "tma": kw.get("tma"),
                   "warp_specialize": kw.get("warp_specialize", False),
                   "pair_blocks": kw.get("pair_blocks", False)}
            try:
                if qpt not in indexes:
                    indexes[qpt] = build_block_index(mask, B, Hq, S, b, rows_per_tile=qpt)
                index = indexes[qpt]
                row["rows_per_tile"] = index.rows_per_tile
                fn = lambda index=index, kw=kw: block_sparse_attention(  # noqa: E731
                    q, k, v, index, b, **kw)
                err = rel_err(fn(), base_out[sp])  # the first call compiles
                ms = timer(fn)
                row.update(ms=ms, tflops=flops * kept / ms / 1e9, rel_err=err)
            except Exception as e:  # noqa: BLE001
                row.update(ms=None, tflops=None, error=_error_text(e))
            add(row)
        del mask, indexes
    _peers(q, k, v, cfg, S, peers, base_out, flops, add, timer, device)
    for qpt in (1, 2) if "pooled" in kernels else ():
        for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
            try:
                kw = {"rows_per_tile": qpt, "num_warps": warps, "num_stages": stages}
                ms = timer(lambda kw=kw: pooled_attention(q, k, v, b, **kw))
                ms2 = timer(lambda kw=kw: pooled_attention(q, k, v, None, **kw))
            except Exception as e:  # noqa: BLE001
                print(f"pooled qpt={qpt} w={warps} s={stages} failed: {e}")
                continue
            add({"kernel": "pooled", "rows_per_tile": qpt, "num_warps": warps,
                 "num_stages": stages, "ms": ms, "tflops": flops / ms / 1e9, "dense_ms": ms2,
                 "dense_tflops": flops / ms2 / 1e9})
    write_json(out_path, doc)
    print("\n".join(summary(rows)), flush=True)
    return rows


def _peers(q, k, v, cfg, S, peers, base_out, flops, add, timer, device):
    """SDPA cuDNN and flash on the dense causal problem, Flex on the 90% mask (seed and shape of
    the seer rows), each a row with its error against our pointer path's output."""
    B, Hq, b = cfg.batch, cfg.q_heads, cfg.block_size
    for name in ("sdpa_cudnn", "sdpa_flash"):
        if name not in peers:
            continue
        row = {"kernel": name, "sparsity": 0.0}
        try:
            fn, how = sdpa_fn(q, k, v, name.split("_")[1])
            err = rel_err(fn(), base_out[0.0]) if 0.0 in base_out else None
            ms = timer(fn)
            row.update(ms=ms, tflops=flops / ms / 1e9, rel_err=err, gqa=how)
        except Exception as e:  # noqa: BLE001
            row.update(ms=None, tflops=None, error=_error_text(e))
        add(row)
    if "flex" in peers:
        sp = 0.9
        row = {"kernel": "flex", "sparsity": sp}
        try:
            make, run = flex_setup()
            mask = random_mask(B, Hq, ref.num_blocks(S, b), sp, device, seed=1)
            kept = 1 - realized_sparsity(mask)
            bm = make(mask, S, b)
            fn = lambda: run(q, k, v, bm, b)  # noqa: E731
            err = rel_err(fn(), base_out[sp])
            ms = timer(fn)
            row.update(realized_sparsity=1 - kept, ms=ms, tflops=flops * kept / ms / 1e9,
                       rel_err=err)
        except Exception as e:  # noqa: BLE001
            row.update(ms=None, tflops=None, error=_error_text(e))
        add(row)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def summary(rows) -> list[str]:
    """Markdown lines: the fastest correct seer variant per (sparsity, rows_per_tile) with the
    default launch's time beside it, the failed and wrong variants counted, and the peers with
    their time over the best seer time (at their sparsity, and at 90%)."""
    seer = [r for r in rows if r.get("kernel") == "seer"]
    good = [r for r in seer if r.get("ms") is not None and r.get("rel_err") is not None
            and math.isfinite(r["rel_err"]) and r["rel_err"] <= OK_ERR]
    default = {r["sparsity"]: r for r in good if r.get("variant") == "default"}
    best_at = {}  # sparsity -> the fastest correct sweep variant
    lines = ["| sparsity | rows/tile | pair | warps | stages | tma | ws | ms | TFLOP/s | rel err "
             "| default ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted({(r["sparsity"], r["rows_per_tile"], r.get("pair_blocks", False))
                       for r in good if r.get("variant") != "default"}):
        cands = [r for r in good if r.get("variant") != "default"
                 and (r["sparsity"], r["rows_per_tile"], r.get("pair_blocks", False)) == key]
        r = min(cands, key=lambda r: r["ms"])
        if key[0] not in best_at or r["ms"] < best_at[key[0]]["ms"]:
            best_at[key[0]] = r
        dflt = default.get(key[0])
        lines.append(
            f"| {r['sparsity']} | {r['rows_per_tile']} | {key[2]} | {r['num_warps']} "
            f"| {r['num_stages']} "
            f"| {r['tma']} | {r['warp_specialize']} | {r['ms']:.3f} | {r['tflops']:.1f} "
            f"| {r['rel_err']:.1e} | {_fmt(dflt and dflt['ms'], '.3f')} |"
        )
    failed = [r for r in seer if r.get("ms") is None]
    wrong = [r for r in seer if r.get("ms") is not None and r not in good]
    lines += ["", f"seer variants: {len(seer)}, failed {len(failed)}, wrong output {len(wrong)}"]
    peers = [r for r in rows if r.get("kernel") in PEERS]
    if peers:
        lines += ["", "| peer | sparsity | ms | TFLOP/s | rel err | / best seer, same sparsity "
                  "| / best seer at 90% |", "|---|---|---|---|---|---|---|"]
    for r in peers:
        if r.get("ms") is None:
            lines.append(f"| {r['kernel']} | {r['sparsity']} | failed: "
                         f"{r.get('error', '')[:80]} | | | | |")
            continue
        same, s90 = best_at.get(r["sparsity"]), best_at.get(0.9)
        lines.append(
            f"| {r['kernel']} | {r['sparsity']} | {r['ms']:.3f} | {r['tflops']:.1f} "
            f"| {_fmt(r.get('rel_err'), '.1e')} | {_fmt(same and r['ms'] / same['ms'], '.2f')} "
            f"| {_fmt(s90 and r['ms'] / s90['ms'], '.2f')} |"
        )
    return lines
