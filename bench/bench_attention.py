"""GPU benchmark of seerlib's attention kernels against SDPA (flash, cuDNN) and FlexAttention.

One process: for each sequence length it draws random bf16 inputs (B=1, Hq=32, Hkv=8, d=128),
checks every provider against the exact reference (or SDPA) on the first kv-head group, then times
them with `triton.testing.do_bench` (median) on random masks (diagonal kept) and a structured
sink + local-window pattern at each block sparsity. `sparsity` is the dropped share of the causal
blocks (the realized one is recorded). FLOPs: 4 * B * Hq * S^2 * d / 2 for causal dense, times the
kept share for sparse providers.

`--shape smollm2` runs SmolLM2's heads instead (Hq=9, Hkv=3, d=64; `--shape 8b smollm2` both).

Usage (on the GPU machine, from the repo root):
    python bench/bench_attention.py --seq-lens 8192 32768 65536 --out bench/results
    python bench/bench_attention.py --tune --seq-lens 32768          # launch-config sweep
    python bench/bench_attention.py --tune seer --shape 8b smollm2 --seq-lens 32768
    python bench/bench_attention.py --tune seer --tune-variants pair --shape smollm2 8b
Writes <out>/<gpu>-<date>.json (a list of records) and a markdown table beside it (the tune:
<gpu>-<date>-tune-<S>.json, see _attention_tune.py; a shape other than 8b adds -<shape>).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import triton
from triton.testing import do_bench

from seerlib import reference as ref
from seerlib.io import atomic_write_text

# Submodules by name: robust to an editable install that sees seerlib.kernels as a namespace.
from seerlib.kernels.block_index import build_block_index
from seerlib.kernels.block_sparse_attention import block_sparse_attention
from seerlib.kernels.pooled_attention import attention, pooled_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _results and the rest beside it
from _attention_peers import (  # noqa: E402 (bench_backward imports them from here too)
    flex_setup,
    random_mask,
    realized_sparsity,
    rel_err,
    sdpa_fn,
    sink_window_mask,
)
from _attention_tune import PEERS, tune  # noqa: E402
from _results import device_name, read_records, write_json  # noqa: E402

# Head layouts the sweep and the tune run at (--shape): Llama-3-8B's and SmolLM2-135M's.
SHAPES = {
    "8b": {"q_heads": 32, "kv_heads": 8, "head_dim": 128},
    "smollm2": {"q_heads": 9, "kv_heads": 3, "head_dim": 64},
}


@dataclass(frozen=True)
class Config:
    batch: int = 1
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 64
    dtype: torch.dtype = torch.bfloat16
    seq_lens: tuple = (8192, 32768, 65536, 131072)
    sparsities: tuple = (0.0, 0.5, 0.7, 0.9, 0.95)
    patterns: tuple = ("random", "sink_window")
    providers: tuple = ("seer", "seer_pooled", "seer_dense", "sdpa_flash", "sdpa_cudnn", "flex")
    sdpa_max_seq: int = 131072
    ref_check_max_seq: int = 65536  # longer: the sparse reference check runs at 90% random only
    check: bool = True
    meta: dict = field(default_factory=dict)


def causal_flops(cfg: Config, S: int) -> float:
    return 4.0 * cfg.batch * cfg.q_heads * S * S * cfg.head_dim / 2


# ---------------------------------------------------------------------------------------------
# measuring


def bench(fn, ms_hint=None):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    return ms, peak


class Recorder:
    def __init__(self, cfg: Config):
        self.cfg, self.records, self.checks = cfg, [], []

    def add(self, **kw):
        rec = {**self.cfg.meta, "block_size": self.cfg.block_size, **kw}
        self.records.append(rec)
        print(
            f"{rec['provider']:>12} S={rec['seq_len']:>6} {rec.get('pattern', ''):>11} "
            f"sp={rec['sparsity']:.3f} {rec['ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s "
            f"mem {rec.get('peak_mem_mb', 0):8.0f} MB",
            flush=True,
        )

    def check(self, name, S, err, limit):
        ok = err <= limit and math.isfinite(err)
        self.checks.append({"check": name, "seq_len": S, "rel_err": err, "limit": limit, "ok": ok})
        print(f"check {name:<34} S={S:>6} rel_err={err:.2e} {'ok' if ok else 'FAIL'}", flush=True)


def run_seq(cfg: Config, S: int, rec: Recorder, flex):
    B, Hq, Hkv, d, b = cfg.batch, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.block_size
    dev = "cuda"
    torch.manual_seed(S)
    q = torch.randn(B, Hq, S, d, device=dev, dtype=cfg.dtype)
    k = torch.randn(B, Hkv, S, d, device=dev, dtype=cfg.dtype)
    v = torch.randn(B, Hkv, S, d, device=dev, dtype=cfg.dtype)
    nb = ref.num_blocks(S, b)
    flops = causal_flops(cfg, S)
    G = Hq // Hkv
    dense_ms = {}

    # ---- dense providers
    if "seer_dense" in cfg.providers:
        fn = lambda: attention(q, k, v)  # noqa: E731
        if cfg.check:
            rec.check(
                "seer_dense vs reference (group 0)",
                S,
                rel_err(
                    attention(q[:, :G], k[:, :1], v[:, :1]),
                    ref.attention(q[:, :G], k[:, :1], v[:, :1]),
                ),
                2e-2,
            )
        ms, mem = bench(fn)
        rec.add(
            provider="seer_dense",
            seq_len=S,
            sparsity=0.0,
            pattern="dense",
            ms=ms,
            tflops=flops / ms / 1e9,
            peak_mem_mb=mem,
        )
        dense_ms["seer_dense"] = ms
    if "seer_pooled" in cfg.providers:
        fn = lambda: pooled_attention(q, k, v, b)  # noqa: E731
        if cfg.check:
            qs, ks, vs = q[:, :G], k[:, :1], v[:, :1]
            o, p = pooled_attention(qs, ks, vs, b)
            ro, rp = ref.pooled_attention(qs, ks, vs, b)
            rec.check("seer_pooled out vs reference", S, rel_err(o, ro), 2e-2)
            rec.check("seer_pooled map vs reference", S, rel_err(p, rp), 2e-2)
            del o, p, ro, rp
        ms, mem = bench(fn)
        rec.add(
            provider="seer_pooled",
            seq_len=S,
            sparsity=0.0,
            pattern="dense",
            ms=ms,
            tflops=flops / ms / 1e9,
            peak_mem_mb=mem,
        )
        dense_ms["seer_pooled"] = ms
    for name in ("sdpa_flash", "sdpa_cudnn"):
        if name not in cfg.providers or S > cfg.sdpa_max_seq:
            continue
        try:
            fn, how = sdpa_fn(q, k, v, name.split("_")[1])
        except RuntimeError as e:
            print(f"{name} unavailable at S={S}: {e}", flush=True)
            continue
        if cfg.check:
            qs, ks, vs = q[:, :G], k[:, :1], v[:, :1]
            rec.check(
                f"{name} vs seer_dense (group 0)",
                S,
                rel_err(fn()[:, :G], attention(qs, ks, vs)),
                2e-2,
            )
        ms, mem = bench(fn)
        rec.add(
            provider=name,
            seq_len=S,
            sparsity=0.0,
            pattern="dense",
            ms=ms,
            tflops=flops / ms / 1e9,
            peak_mem_mb=mem,
            gqa=how,
        )
        dense_ms[name] = ms

    # ---- sparse providers
    for pattern in cfg.patterns:
        for sp in cfg.sparsities:
            if pattern != "random" and sp == 0.0:
                continue  # every pattern is the full causal mask at sparsity 0
            if pattern == "random":
                mask = random_mask(B, Hq, nb, sp, dev, seed=S + int(sp * 100))
            else:
                mask = sink_window_mask(B, Hq, nb, sp, dev)
            real = realized_sparsity(mask)
            kept = 1.0 - real
            if "seer" in cfg.providers:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                index = build_block_index(mask, B, Hq, S, b)
                torch.cuda.synchronize()
                index_ms = (time.perf_counter() - t0) * 1e3
                fn = lambda index=index: block_sparse_attention(q, k, v, index, b)  # noqa: E731
                ref_check = S <= cfg.ref_check_max_seq or (pattern == "random" and sp == 0.9)
                if cfg.check and ref_check:
                    ms_ = mask[:, :G]
                    got = block_sparse_attention(
                        q[:, :G], k[:, :1], v[:, :1], ms_, b, rows_per_tile=index.rows_per_tile
                    )
                    rec.check(
                        f"seer {pattern} {sp} vs reference",
                        S,
                        rel_err(
                            got, ref.block_sparse_attention(q[:, :G], k[:, :1], v[:, :1], ms_, b)
                        ),
                        2e-2,
                    )
                ms, mem = bench(fn)
                extra = {
                    f"vs_{p}": dense_ms[p] / ms
                    for p in ("sdpa_flash", "sdpa_cudnn")
                    if p in dense_ms
                }
                rec.add(
                    provider="seer",
                    seq_len=S,
                    sparsity=real,
                    target_sparsity=sp,
                    pattern=pattern,
                    ms=ms,
                    tflops=flops * kept / ms / 1e9,
                    peak_mem_mb=mem,
                    index_ms=index_ms,
                    rows_per_tile=index.rows_per_tile,
                    **extra,
                )
                seer_ms = ms
                del index
            if flex is not None and "flex" in cfg.providers:
                make, run = flex
                try:
                    bm = make(mask, S, b)
                    fn = lambda bm=bm: run(q, k, v, bm, b)  # noqa: E731, B023
                    if cfg.check and "seer" in cfg.providers:
                        out_f = fn()
                        out_s = block_sparse_attention(q, k, v, mask, b)
                        rec.check(f"flex {pattern} {sp} vs seer", S, rel_err(out_f, out_s), 2e-2)
                        del out_f, out_s
                    ms, mem = bench(fn)
                    extra = {"seer_speedup": ms / seer_ms} if "seer" in cfg.providers else {}
                    rec.add(
                        provider="flex",
                        seq_len=S,
                        sparsity=real,
                        target_sparsity=sp,
                        pattern=pattern,
                        ms=ms,
                        tflops=flops * kept / ms / 1e9,
                        peak_mem_mb=mem,
                        **extra,
                    )
                    del bm
                except Exception as e:  # noqa: BLE001
                    print(
                        f"flex failed at S={S} {pattern} {sp}: {type(e).__name__}: {e}", flush=True
                    )
            del mask
    torch.cuda.empty_cache()


def targets(records, seer0, S=32768):
    """The issue's targets (H100, S = 32768, block 64) read off the records, as table lines."""

    def one(provider, **kw):
        for r in records:
            if (
                r["provider"] == provider
                and r["seq_len"] == kw.get("seq_len", S)
                and all(r.get(k) == v for k, v in kw.items() if k != "seq_len")
            ):
                return r
        return None

    s90, f90 = (
        one("seer", pattern="random", target_sparsity=0.9),
        one("flex", pattern="random", target_sparsity=0.9),
    )
    flash, pooled = one("sdpa_flash"), one("seer_pooled")
    pooled_long = [r for r in records if r["provider"] == "seer_pooled" and r["seq_len"] >= 131072]
    rows = []
    if s90 and flash:
        x = flash["ms"] / s90["ms"]
        rows.append(
            "| 90% sparsity (random): >= 9x SDPA flash | "
            f"{s90['ms']:.3f} ms vs {flash['ms']:.3f} ms: "
            f"{x:.2f}x | {'met' if x >= 9 else 'missed'} |"
        )
    if s90 and f90:
        x = f90["ms"] / s90["ms"]
        rows.append(
            f"| 90% sparsity (random): faster than Flex, same mask | {s90['ms']:.3f} ms vs "
            f"{f90['ms']:.3f} ms: {x:.2f}x | {'met' if x > 1 else 'missed'} |"
        )
    if S in seer0:
        t = seer0[S]["tflops"]
        rows.append(
            f"| 0% sparsity: >= 450 TFLOP/s | {t:.1f} TFLOP/s ({seer0[S]['ms']:.3f} ms) | "
            f"{'met' if t >= 450 else 'missed'} |"
        )
    if pooled and S in seer0:
        x = pooled["ms"] / seer0[S]["ms"]
        rows.append(
            "| pooled_attention <= 1.25x our dense run | "
            f"{pooled['ms']:.3f} ms / {seer0[S]['ms']:.3f} ms = "
            f"{x:.3f}x | {'met' if x <= 1.25 else 'missed'} |"
        )
    if pooled_long:
        r = pooled_long[-1]
        rows.append(
            "| pooled_attention runs at 131072 tokens | "
            f"{r['ms']:.1f} ms, peak {r['peak_mem_mb']:.0f} MB | met |"
        )
    if not rows:
        return []
    return [
        f"## Targets (S = {S}, block 64)",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *rows,
        "",
    ]


def shapes(cfg: Config, S: int, out_path: str):
    """Other head dims and block sizes at one length: default launch and a few alternatives at
    sparsity 0 and 0.9 (random), the pooled kernel, and the index build (torch vs triton)."""
    B, Hq, Hkv = cfg.batch, cfg.q_heads, cfg.kv_heads
    rows = []
    for d, b in ((128, 64), (64, 64), (128, 32), (128, 128), (64, 32), (64, 128)):
        torch.manual_seed(0)
        q = torch.randn(B, Hq, S, d, device="cuda", dtype=cfg.dtype)
        k = torch.randn(B, Hkv, S, d, device="cuda", dtype=cfg.dtype)
        v = torch.randn(B, Hkv, S, d, device="cuda", dtype=cfg.dtype)
        nb = ref.num_blocks(S, b)
        flops = 4.0 * B * Hq * S * S * d / 2
        for sp in (0.0, 0.9):
            mask = random_mask(B, Hq, nb, sp, "cuda", seed=2)
            kept = 1 - realized_sparsity(mask)
            for method in ("torch", "triton"):
                build_block_index(mask, B, Hq, S, b, method=method)
                ms = do_bench(
                    lambda m=method, mask=mask: build_block_index(mask, B, Hq, S, b, method=m),  # noqa: B023
                    warmup=5, rep=50, return_mode="median",
                )
                rows.append({"kind": "index", "d": d, "b": b, "sparsity": sp, "method": method,
                             "ms": ms})
                print(rows[-1], flush=True)
            index = build_block_index(mask, B, Hq, S, b, method="triton")
            if cfg.check:
                qs, ks, vs, ms_ = q[:, :4], k[:, :1], v[:, :1], mask[:, :4]
                idx4 = build_block_index(ms_, B, 4, S, b, method="triton")
                err = rel_err(block_sparse_attention(qs, ks, vs, idx4, b),
                              ref.block_sparse_attention(qs, ks, vs, ms_, b))
                rows.append({"kind": "check", "d": d, "b": b, "sparsity": sp, "rel_err": err})
                print(rows[-1], flush=True)
            for warps, stages in ((None, None), (None, 2)):
                try:
                    ms = do_bench(
                        lambda w=warps, s=stages, index=index: block_sparse_attention(
                            q, k, v, index, b, num_warps=w, num_stages=s),  # noqa: B023
                        warmup=25, rep=100, return_mode="median",
                    )
                except Exception as e:  # noqa: BLE001
                    print(f"d={d} b={b} w={warps} s={stages} failed: {type(e).__name__}: {e}")
                    continue
                rows.append({"kind": "seer", "d": d, "b": b, "sparsity": sp,
                             "rows_per_tile": index.rows_per_tile, "num_warps": warps,
                             "num_stages": stages, "ms": ms, "tflops": flops * kept / ms / 1e9})
                print(rows[-1], flush=True)
        ms = do_bench(lambda: pooled_attention(q, k, v, b), warmup=25, rep=100,  # noqa: B023
                      return_mode="median")
        rows.append({"kind": "pooled", "d": d, "b": b, "ms": ms, "tflops": flops / ms / 1e9})
        print(rows[-1], flush=True)
        write_json(out_path, {**cfg.meta, "seq_len": S, "rows": rows})


def write_table(cfg: Config, records, checks, path):
    lines = [
        f"# Attention benchmark: {cfg.meta['gpu']}, {cfg.meta['date']}",
        "",
        f"torch {cfg.meta['torch']}, triton {cfg.meta['triton']}; B={cfg.batch}, Hq={cfg.q_heads}, "
        f"Hkv={cfg.kv_heads}, d={cfg.head_dim}, bf16, causal, block {cfg.block_size}. "
        "Median of `triton.testing.do_bench`. TFLOP/s count the kept share of 4·B·Hq·S²·d/2.",
        f"Rerun: `{cfg.meta['command']}`",
        "",
    ]
    seer0 = {
        r["seq_len"]: r
        for r in records
        if r["provider"] == "seer" and r.get("target_sparsity") == 0.0
    }
    lines += targets(records, seer0)
    lines += [
        "## Dense (sparsity 0)",
        "",
        "| S | provider | ms | TFLOP/s | peak MB | time / seer at sparsity 0 |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["pattern"] == "dense":
            s0 = seer0.get(r["seq_len"])
            ratio = f"{r['ms'] / s0['ms']:.3f}" if s0 else "-"
            lines.append(
                f"| {r['seq_len']} | {r['provider']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                f"{r['peak_mem_mb']:.0f} | {ratio} |"
            )
    lines += [
        "",
        "## Block-sparse",
        "",
        "| S | pattern | sparsity | seer ms | seer TFLOP/s | flex ms | flex TFLOP/s | seer vs flex "
        "| seer vs sdpa_flash | seer vs sdpa_cudnn |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    flex = {
        (r["seq_len"], r["pattern"], r["target_sparsity"]): r
        for r in records
        if r["provider"] == "flex"
    }
    for r in records:
        if r["provider"] != "seer":
            continue
        f = flex.get((r["seq_len"], r["pattern"], r["target_sparsity"]))
        fx = (
            f"| {f['ms']:.3f} | {f['tflops']:.1f} | {f['ms'] / r['ms']:.2f}× "
            if f
            else "| - | - | - "
        )
        vs = lambda key, r=r: f"{r[key]:.2f}×" if key in r else "-"  # noqa: E731
        lines.append(
            f"| {r['seq_len']} | {r['pattern']} | {r['sparsity']:.3f} | {r['ms']:.3f} | "
            f"{r['tflops']:.1f} {fx}| {vs('vs_sdpa_flash')} | {vs('vs_sdpa_cudnn')} |"
        )
    if checks:
        lines += [
            "",
            "## Checks (relative Frobenius error, first kv-head group)",
            "",
            "| check | S | rel err | ok |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c['check']} | {c['seq_len']} | {c['rel_err']:.2e} | {c['ok']} |" for c in checks
        ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def merge(paths, out_dir, tag=""):
    records, checks = [], []
    for p in paths:
        records += read_records(p)
        cp = p[: -len(".json")] + "-checks.json"
        if os.path.exists(cp):
            checks += read_records(cp)
    meta = {k: records[0][k] for k in ("gpu", "torch", "triton", "date")}
    cmds = sorted({r["command"] for r in records})
    meta["command"] = "`; `".join(cmds)
    cfg = Config(meta=meta, **SHAPES[records[0].get("shape", "8b")])
    stem = os.path.join(out_dir, f"{meta['gpu']}-{meta['date']}{tag}")
    records.sort(
        key=lambda r: (
            r["seq_len"],
            r["provider"] != "seer",
            r.get("pattern", ""),
            r.get("target_sparsity", 0),
        )
    )
    write_json(stem + ".json", records)
    write_json(stem + "-checks.json", checks)
    write_table(cfg, records, checks, stem + ".md")
    print(open(stem + ".md").read())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=list(Config.seq_lens))
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(Config.sparsities))
    ap.add_argument("--patterns", nargs="+", default=list(Config.patterns))
    ap.add_argument("--providers", nargs="+", default=list(Config.providers))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument(
        "--tune",
        nargs="*",
        choices=("seer", "pooled"),
        default=None,
        help="time launch variants of these kernels instead of the sweep",
    )
    ap.add_argument("--shape", nargs="+", choices=tuple(SHAPES), default=["8b"],
                    help="head layouts to run at, one after the other (sweep and tune); a "
                    "shape other than 8b adds its name to the result file names")
    ap.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS),
                    help="with --tune: the peers to time beside the variants")
    ap.add_argument("--tune-variants", choices=("sweep", "pair"), default="sweep",
                    help="with --tune: the launch sweep (36 variants) or the paired loop beside "
                    "the unpaired one at the library's launch (8)")
    ap.add_argument(
        "--shapes",
        action="store_true",
        help="time other head dims / block sizes and the index build instead of the sweep",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine result files of earlier runs into --out/<gpu>-<date>.{json,md}",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.tag)
    gpu = device_name("cuda")
    date = datetime.date.today().isoformat()
    meta = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": date,
        "command": "python bench/bench_attention.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs(args.out, exist_ok=True)
    sweep = args.tune is None and not args.shapes
    flex = flex_setup() if sweep and "flex" in args.providers else None  # compiled once
    for shape in args.shape:
        cfg = Config(
            **SHAPES[shape],
            seq_lens=tuple(args.seq_lens),
            sparsities=tuple(args.sparsities),
            patterns=tuple(args.patterns),
            providers=tuple(args.providers),
            check=not args.no_check,
            meta={**meta, "shape": shape},
        )
        name = "" if shape == "8b" else f"-{shape}"  # 8b: the names of the earlier runs
        run_shape(cfg, args, os.path.join(args.out, f"{gpu}-{date}{name}{args.tag}"), flex)


def run_shape(cfg: Config, args, stem: str, flex):
    """One shape's --shapes, --tune or sweep, into files named from `stem`."""
    if args.shapes:
        for S in cfg.seq_lens:
            shapes(cfg, S, f"{stem}-shapes-{S}.json")
        return
    if args.tune is not None:
        for S in cfg.seq_lens:
            suffix = "" if args.tune_variants == "sweep" else f"-{args.tune_variants}"
            tune(cfg, S, f"{stem}-tune{suffix}-{S}.json", tuple(args.tune) or ("seer", "pooled"),
                 peers=tuple(args.peers), variants=args.tune_variants)
        return
    rec = Recorder(cfg)
    try:
        for S in cfg.seq_lens:
            run_seq(cfg, S, rec, flex)
    finally:
        write_json(stem + ".json", rec.records)
        write_json(stem + "-checks.json", rec.checks)
        write_table(cfg, rec.records, rec.checks, stem + ".md")
    print(open(stem + ".md").read())

if __name__ == "__main__":
    main()
