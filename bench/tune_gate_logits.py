"""Tune the prefill gate's one-launch logits (`seerlib.kernels.gate_logits`: both projections, the
block RoPE and q · kᵀ per (query tile, key tile, batch · head)) for issue 13, beside the gate's
own torch ops, eager and compiled, and the layer's gate step that reads them (the logits, then
`ops.select_index`'s top-k and index at density 0.1).

On 12-07 (H100) the fused layer step cost about 0.235 ms over its kernel at both 8k and 32k on
SmolLM2's shape: launches, not bytes. This times every tile shape (block_m, block_n 16 / 32 / 64)
at 2, 4 and 8 warps on an untrained gate's pooled features of random q_pre / k_pre, each replayed
as a CUDA graph, and checks each against the gate's float32 logits on and below the diagonal.

    python bench/tune_gate_logits.py --out $OUT                     # on the GPU, about a minute
    TRITON_INTERPRET=1 python bench/tune_gate_logits.py --device cpu --shapes tiny \\
        --seq-lens 256 --out /tmp/tune                             # CPU smoke (correctness only)

Writes <out>/tune-gate-logits-<gpu>-<date><tag>.json (a list of records) and .md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys

import torch
from transformers import LlamaConfig

from seerlib import ops
from seerlib.gate import GateSet
from seerlib.graphs import capture
from seerlib.io import atomic_write_text
from seerlib.kernels import gate_logits as fused
from seerlib.reference import causal_block_mask
from seerlib.select import Selection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helper modules beside it
import _decode_peers as peers  # noqa: E402
from _results import resolve_device, run_meta, tuned_cases, write_json  # noqa: E402

SHAPES = {  # (Hq, Hkv, head dim, rope theta) of the prefill benchmark's shapes
    "smollm2": (9, 3, 64, 100000.0),
    "llama3-8b": (32, 8, 128, 500000.0),
    "tiny": (4, 2, 64, 10000.0),  # CPU smoke
}
TILES = (16, 32, 64)
WARPS = (2, 4, 8)
BLOCK = 64
DENSITY = 0.1
GATE_NOTE = "untrained gate (GateSet.from_config) on random q_pre / k_pre: timing only"


def variants(device) -> list[dict]:
    """The default launch first, then every (block_m, block_n, warps) combination."""
    default = {"block_m": 32, "block_n": 32, "num_warps": None}
    if device.type != "cuda":  # the interpreter: a few tile shapes, no launch options
        return [default, {**default, "block_m": 16, "block_n": 64},
                {**default, "block_m": 64, "block_n": 16}]
    return [default, *({"block_m": m, "block_n": n, "num_warps": w}
                       for m, n, w in itertools.product(TILES, TILES, WARPS))]


def clock(fn, device) -> float:
    """Median ms of fn: replayed as a CUDA graph on CUDA (the GPU time, no launch cost on the
    host), else the median wall clock of 3 eager calls (`_decode_peers.time_ms`)."""
    if device.type == "cuda":
        fn = capture(fn, device, warmup=3)[0].replay  # warm-up (and any compile) off the capture
    return peers.time_ms(fn, device, reps=50, warmup=10)


def gate_inputs(shape: str, S: int, device, dtype, seed: int = 0):
    """(the layer's untrained AttnGate, pooled q (B, Hq, nb, d), pooled k (B, Hkv, nb, 3 d))."""
    Hq, Hkv, d, theta = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=Hq * d, num_attention_heads=Hq, num_key_value_heads=Hkv,
                      head_dim=d, num_hidden_layers=1, max_position_embeddings=max(S, 8192),
                      rope_theta=theta)
    torch.manual_seed(seed)
    gate = GateSet.from_config(cfg, block_size=BLOCK).to(device=device, dtype=dtype)[0]
    gate.requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, Hq, S, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, S, d, device=device, dtype=dtype, generator=g)
    return gate, ops.pool_blocks(q, BLOCK, gate.q_pool), ops.pool_blocks(k, BLOCK, gate.k_pool)


def tune_case(shape: str, S: int, device, dtype, meta: dict) -> list[dict]:
    """Every variant at one (shape, length), the torch peers, and the gate step with each."""
    gate, qp, kp = gate_inputs(shape, S, device, dtype)
    nb = qp.shape[2]
    below = causal_block_mask(nb, device)
    want = gate.forward_pooled(qp, kp)[..., below]
    scale = float(want.abs().max())
    base = {**meta, "shape": shape, "seq_len": S, "blocks": nb, "block_size": BLOCK,
            "dtype": str(dtype).removeprefix("torch."), "gate": GATE_NOTE}
    records = []
    for v in variants(device):
        def logits(v=v):
            return fused.gate_logits(gate, qp, kp, **v)
        rec = {**base, "kind": "variant", **v}
        try:
            ms = clock(logits, device)
            diff = float((logits()[..., below] - want).abs().max())
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result, not a stop
            records.append({**rec, "status": "failed", "error": f"{type(e).__name__}: {e}"[:400]})
            continue
        records.append({**rec, "status": "ok", "ms": ms, "max_abs_diff": diff,
                        "ref_max_abs": scale})
    ok = [r for r in records if r["status"] == "ok"]
    peers = {"torch_eager_ms": lambda: gate.block_scores(qp, kp)}
    if device.type == "cuda":
        compiled = torch.compile(gate.block_scores, dynamic=False)
        peers["torch_compiled_ms"] = lambda: compiled(qp, kp)
    step = {**base, "kind": "step", "status": "ok"}
    try:
        for name, fn in peers.items():
            step[name] = clock(fn, device)
        sel = Selection(density=DENSITY)
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        knobs = {k: best[k] for k in ("block_m", "block_n", "num_warps")} if best else {}
        step["best"] = knobs
        step["step_eager_ms"] = clock(lambda: ops.select_index(
            gate.block_scores(qp, kp), sel, S, BLOCK), device)
        step["step_fused_ms"] = clock(lambda: ops.select_index(
            fused.gate_logits(gate, qp, kp, **knobs), sel, S, BLOCK), device)
    except Exception as e:  # noqa: BLE001 - the variants' timings stand without it
        step = {**step, "status": "failed", "error": f"{type(e).__name__}: {e}"[:400]}
    return [*records, step]


def label(r: dict) -> str:
    return f"m{r['block_m']} n{r['block_n']} w{r['num_warps'] or 'default'}"


def markdown(records: list[dict]) -> str:
    steps = [r for r in records if r.get("kind") == "step"]
    records = [r for r in records if r.get("kind") != "step"]
    first = records[0] if records else {}
    clock_note = ("µs in a CUDA graph (median)" if first.get("device") == "cuda"
                  else "wall µs, eager (the interpreter: correctness only)")
    lines = [f"# The prefill gate's one-launch logits, tuned: {first.get('gpu', '')}, "
             f"{first.get('date', '')}", "",
             f"`bench/tune_gate_logits.py`; {clock_note}; block {BLOCK}, {GATE_NOTE}; torch "
             f"{first.get('torch')}, triton {first.get('triton')}.", "",
             "Commands: " + "; ".join(f"`{c}`" for c in sorted({r['command'] for r in records})),
             "", "Variant: m / n = query / key blocks a tile, w = warps. Diff: the largest "
             "|kernel - gate.forward_pooled| on and below the diagonal.", "",
             "| shape | S | default µs | best variant | best µs | default / best | worst diff "
             "| variants (failed) |", "|---|---|---|---|---|---|---|---|"]
    for (shape, S), mine, ok in tuned_cases(records, ("shape", "seq_len")):
        if not ok:
            lines.append(f"| {shape} | {S} | failed | | | | | {len(mine)} ({len(mine)}) |")
            continue
        default, best = ok[0], min(ok, key=lambda r: r["ms"])
        lines.append(
            f"| {shape} | {S} | {default['ms'] * 1e3:.1f} | {label(best)} | "
            f"{best['ms'] * 1e3:.1f} | {default['ms'] / best['ms']:.2f}× | "
            f"{max(r['max_abs_diff'] for r in ok):.1e} | {len(mine)} ({len(mine) - len(ok)}) |")
    if steps:
        lines += ["", f"Beside them, the gate's torch ops (`AttnGate.block_scores`, eager and "
                  "compiled), and the gate step a layer runs after pooling: its logits, then "
                  f"`ops.select_index` (top-k at density {DENSITY} and the index, one launch), "
                  "eager logits against the fastest variant:", "",
                  "| shape | S | torch eager µs | torch compiled µs | step, torch logits µs | "
                  "step, fused logits µs | step saving |", "|---|---|---|---|---|---|---|"]
        for r in sorted(steps, key=lambda r: (r["shape"], r["seq_len"])):
            if r["status"] != "ok":
                lines.append(f"| {r['shape']} | {r['seq_len']} | failed: {r['error']} | | | | |")
                continue
            comp = r.get("torch_compiled_ms")
            comp = f"{comp * 1e3:.1f}" if comp is not None else "-"
            e, f = r["step_eager_ms"], r["step_fused_ms"]
            lines.append(f"| {r['shape']} | {r['seq_len']} | {r['torch_eager_ms'] * 1e3:.1f} | "
                         f"{comp} | {e * 1e3:.1f} | {f * 1e3:.1f} | {e / f:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["smollm2", "llama3-8b"], choices=tuple(SHAPES))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    device = resolve_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    command = "python bench/tune_gate_logits.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    meta = run_meta(device, command)
    stem = os.path.join(a.out, f"tune-gate-logits-{meta['gpu']}-{meta['date']}{a.tag}")
    os.makedirs(a.out, exist_ok=True)
    records: list[dict] = []
    for shape in a.shapes:
        for S in a.seq_lens:
            mine = tune_case(shape, S, device, dtype, meta)
            records += mine
            write_json(f"{stem}.json", records)
            atomic_write_text(f"{stem}.md", markdown(records))
            ok = [r for r in mine if r.get("kind") == "variant" and r["status"] == "ok"]
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            print(f"{shape} {S}: {len(ok)} variants ran; default {ok[0]['ms'] * 1e3:.1f} µs, "
                  f"best {label(best)} {best['ms'] * 1e3:.1f} µs" if ok
                  else f"{shape} {S}: every variant failed", flush=True)
    return stem


if __name__ == "__main__":
    main()
