"""Tune the fused decode index (`seerlib.kernels.decode_gate_select`: the gate's query, its logits
over the K-compression cache, the selection and the index in one launch) for issue 15.

On 12-07 (H100) the fused index took 36.6 / 53.7 / 49.3 us (batch 1 at 32k and 128k, batch 16
at 32k) whatever the k-th-score search did, so its time is in the two loops before it: the query
projection over the group's G·d inputs and the logits over the cached blocks, 32 of each per
loop step (`chunk_c`, `chunk_n`), at 4 warps, one program per (batch, kv head) unless batch 1
splits a row's logits over programs (`blocks_per_program`). This times every combination of
those options on the step's real inputs (the Llama-3-8B attention shape, an untrained decode gate
on random keys, a token budget at 90% sparsity), each replayed as a CUDA graph, and checks that
every variant's index equals the default's. Then, in the same process, the whole step (index ->
sparse decode kernel) with the default launch and with the fastest variant, each as a CUDA graph,
beside SDPA's cuDNN decode on the same inputs: the step's speedup a tuned default would give.

    python bench/tune_decode_index.py --out $OUT                   # on the GPU, about a minute
    TRITON_INTERPRET=1 python bench/tune_decode_index.py --device cpu --preset tiny \\
        --kv-lens 1024 --batches 2 --out /tmp/tune                # CPU smoke (correctness only)

Writes <out>/tune-decode-index-<gpu>-<date><tag>.json (a list of records) and .md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time

import torch

from seerlib import ops
from seerlib.decode import parse_decode_config
from seerlib.decode.select import most_blocks
from seerlib.io import atomic_write_text
from seerlib.kernels import decode_gate_select as fused
from seerlib.ops import _select_kernel_args
from seerlib.reference import num_blocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helper modules beside it
import bench_decode as bd  # noqa: E402
from _results import resolve_device, run_meta, tuned_cases, write_json  # noqa: E402

CHUNKS = (32, 64, 128)
WARPS = (4, 8)
SPLITS = ("default", "whole", "quarter")  # logit_splits' choice, one program a row, W / 4 each


def per_program(split: str, width: int) -> int | None:
    """blocks_per_program for a SPLITS entry (None: the kernel's own `logit_splits`)."""
    if split == "default":
        return None
    if split == "whole":
        return max(width, 1)
    return max(1, -(-width // 4))


def variants(device) -> list[dict]:
    """The default launch first, then every (chunk_c, chunk_n, warps, split) combination."""
    default = {"chunk_c": 32, "chunk_n": 32, "num_warps": None, "split": "default"}
    if device.type != "cuda":  # the interpreter: a few shapes of the loops, no launch options
        return [default, {**default, "chunk_c": 128, "chunk_n": 64},
                {**default, "chunk_n": 16, "split": "quarter"}]
    grid = [{"chunk_c": c, "chunk_n": n, "num_warps": w, "split": s}
            for c, n, w, s in itertools.product(CHUNKS, CHUNKS, WARPS, SPLITS)]
    return [default, *grid]


def tune_case(cfg: bd.BenchConfig, device, attn_cfg, S: int, B: int, sparsity: float,
              meta: dict) -> list[dict]:
    """Every variant at one (KV length, batch): graph ms (wall ms on a CPU), index = default's."""
    case = bd.Case(cfg, device, attn_cfg, S, B)
    kb = bd.budget_blocks(sparsity, S, case.b)
    dcfg = parse_decode_config(f"gate@tok={kb * case.b}", case.b)
    gate, k_gate = case.gate()
    K, nb = most_blocks(dcfg.selection, case.b), num_blocks(S, case.b)
    kw = _select_kernel_args(dcfg.selection, True, case.b, "triton")
    position = torch.full((1,), S - 1, dtype=torch.long, device=device)
    W = k_gate.shape[2]
    base = {**meta, "kv_len": S, "batch": B, "sparsity": sparsity, "budget_blocks": kb,
            "cached_blocks": W, "preset": cfg.preset, "gate": bd.GATE_NOTE}
    records, want = [], None
    for v in variants(device):
        per = per_program(v["split"], W)

        def index(v=v, per=per):
            return fused.decode_gate_select(
                gate, case.q, k_gate, position, nb, max_blocks=K, blocks_per_program=per,
                chunk_c=v["chunk_c"], chunk_n=v["chunk_n"], num_warps=v["num_warps"], **kw)[:2]

        rec = {**base, **v, "blocks_per_program": per}
        try:
            if device.type == "cuda":
                ms, (idx, cnt) = bd.graph_ms(case, index)
            else:
                t0 = time.perf_counter()
                idx, cnt = index()
                ms = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result, not a stop
            records.append({**rec, "status": "failed", "error": f"{type(e).__name__}: {e}"[:400]})
            continue
        if want is None:
            want = (idx.clone(), cnt.clone())
        same = bool(torch.equal(idx, want[0]) and torch.equal(cnt, want[1]))
        records.append({**rec, "status": "ok", "ms": ms, "same_index": same})
    if device.type == "cuda":
        try:
            records.append(step_record(case, records, base, gate, k_gate, position, nb, K, kw))
        except Exception as e:  # noqa: BLE001 - the variants' timings stand without it
            records.append({**base, "status": "failed", "kind": "step",
                            "error": f"{type(e).__name__}: {e}"[:400]})
    return records


def step_record(case, records, base, gate, k_gate, position, nb, K, kw) -> dict:
    """The whole step with the default launch and with the fastest variant that gave the default's
    index (each index -> kernel in one CUDA graph), the kernel alone and cuDNN's dense decode."""
    ok = [r for r in records if r["status"] == "ok" and r["same_index"]]
    if not ok:
        return {**base, "status": "failed", "kind": "step", "error": "no variant ran"}
    best = min(ok, key=lambda r: r["ms"])
    q, k, v, b = case.q, case.k, case.v, case.b

    def step(var):
        idx, cnt = fused.decode_gate_select(
            gate, q, k_gate, position, nb, max_blocks=K,
            blocks_per_program=var["blocks_per_program"], chunk_c=var["chunk_c"],
            chunk_n=var["chunk_n"], num_warps=var["num_warps"], **kw)[:2]
        return ops.sparse_decode_attention(q, k, v, idx, cnt, b, backend="triton")

    idx, cnt = fused.decode_gate_select(gate, q, k_gate, position, nb, max_blocks=K, **kw)[:2]
    out = {**base, "status": "ok", "kind": "step", "best": label(best),
           "step_default_ms": bd.graph_ms(case, lambda: step(ok[0]))[0],
           "step_best_ms": bd.graph_ms(case, lambda: step(best))[0],
           "kernel_ms": bd.graph_ms(case, lambda: ops.sparse_decode_attention(
               q, k, v, idx, cnt, b, backend="triton"))[0],
           "sdpa_cudnn_ms": bd.dense_row(case, "sdpa_cudnn")["ms"],
           "cudnn_clock": "eager (as bench_decode's sdpa_cudnn row)"}
    if ok[0] is not records[0]:
        out["note"] = "the default launch failed or changed the index; step_default is the first ok"
    return out


def label(r: dict) -> str:
    warps = r["num_warps"] or "default"
    return f"c{r['chunk_c']} n{r['chunk_n']} w{warps} {r['split']}"


def markdown(records: list[dict]) -> str:
    steps = [r for r in records if r.get("kind") == "step"]
    records = [r for r in records if r.get("kind") != "step"]
    first = records[0] if records else {}
    clock = "µs in a CUDA graph (median)" if first.get("device") == "cuda" else "wall µs, eager"
    lines = [f"# The fused decode index, tuned: {first.get('gpu', '')}, {first.get('date', '')}",
             "", f"`bench/tune_decode_index.py`; {clock}; {first.get('preset', '')} attention, "
             f"{bd.GATE_NOTE}; torch {first.get('torch')}, triton {first.get('triton')}.", "",
             "Commands: " + "; ".join(f"`{c}`" for c in sorted({r['command'] for r in records})),
             "", "Variant: c = chunk_c (query projection inputs a loop step), n = chunk_n "
             "(cached blocks a loop step), w = warps, split = default (`logit_splits`), whole "
             "(one program a row) or quarter (a row over four programs).", "",
             "| batch | KV | default µs | best variant | best µs | default / best | variants "
             "(failed) | all give the default's index |", "|---|---|---|---|---|---|---|---|"]
    cases = tuned_cases(records, ("batch", "kv_len"))
    for (B, S), mine, ok in cases:
        if not ok:
            lines.append(f"| {B} | {S} | failed | | | | {len(mine)} ({len(mine)}) | |")
            continue
        default, best = ok[0], min(ok, key=lambda r: r["ms"])
        lines.append(
            f"| {B} | {S} | {default['ms'] * 1e3:.1f} | {label(best)} | {best['ms'] * 1e3:.1f} | "
            f"{default['ms'] / best['ms']:.2f}× | {len(mine)} ({len(mine) - len(ok)}) | "
            f"{all(r['same_index'] for r in ok)} |")
    lines += ["", "The five fastest variants of each case:", "",
              "| batch | KV | variant | µs |", "|---|---|---|---|"]
    for (B, S), _, ok in cases:
        fastest = sorted(ok, key=lambda r: r["ms"])[:5]
        lines += [f"| {B} | {S} | {label(r)} | {r['ms'] * 1e3:.1f} |" for r in fastest]
    if steps:
        lines += ["", "The whole step (index -> sparse decode kernel, one CUDA graph) with the "
                  "default launch and with the fastest variant, beside the kernel alone on the "
                  "default's index and SDPA cuDNN's dense decode (eager, as in bench_decode); "
                  "the gate's share is (step - kernel) / step:", "",
                  "| batch | KV | step, default µs | step, best µs | kernel µs | cuDNN µs | "
                  "cuDNN / step, default | cuDNN / step, best | gate share, best |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(steps, key=lambda r: (r["batch"], r["kv_len"])):
            if r["status"] != "ok":
                lines.append(f"| {r['batch']} | {r['kv_len']} | failed: {r['error']} |"
                             " | | | | | |")
                continue
            d, t, kn, c = (r[x] for x in ("step_default_ms", "step_best_ms", "kernel_ms",
                                          "sdpa_cudnn_ms"))
            lines.append(f"| {r['batch']} | {r['kv_len']} | {d * 1e3:.1f} | {t * 1e3:.1f} | "
                         f"{kn * 1e3:.1f} | {c * 1e3:.1f} | {c / d:.2f}× | {c / t:.2f}× | "
                         f"{(t - kn) / t:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--preset", default="llama3-8b", choices=tuple(bd.SHAPES))
    p.add_argument("--kv-lens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    device = resolve_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "bf16" if device.type == "cuda" else "fp32"
    cfg = bd.BenchConfig(preset=a.preset, device=device.type, dtype=dtype, rep_ms=50,
                         warmup_ms=10)
    command = "python bench/tune_decode_index.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    meta = run_meta(device, command)
    stem = os.path.join(a.out, f"tune-decode-index-{meta['gpu']}-{meta['date']}{a.tag}")
    os.makedirs(a.out, exist_ok=True)
    attn_cfg = bd.attention_config(a.preset)
    records: list[dict] = []
    for S in a.kv_lens:
        for B in a.batches:
            mine = tune_case(cfg, device, attn_cfg, S, B, a.sparsity, meta)
            records += mine
            write_json(f"{stem}.json", records)
            atomic_write_text(f"{stem}.md", markdown(records))
            tried = [r for r in mine if r.get("kind") != "step"]
            ok = [r for r in tried if r["status"] == "ok"]
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            print(f"batch {B}, KV {S}: {len(ok)} of {len(tried)} variants ran; default "
                  f"{ok[0]['ms'] * 1e3:.1f} µs, best {label(best)} {best['ms'] * 1e3:.1f} µs"
                  if ok else f"batch {B}, KV {S}: every variant failed", flush=True)
            for r in (r for r in mine if r.get("kind") == "step"):
                print(f"  step: {r['step_default_ms'] * 1e3:.1f} µs default, "
                      f"{r['step_best_ms'] * 1e3:.1f} best, cuDNN {r['sdpa_cudnn_ms'] * 1e3:.1f}"
                      if r["status"] == "ok" else f"  step failed: {r['error']}", flush=True)
    return stem


if __name__ == "__main__":
    main()
