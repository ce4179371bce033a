"""Decode-phase benchmark (issue 15, SeerAttention-R): the sparse decode step against dense
decode, and generation throughput with decode sparsity.

`--part step` (default): one decode attention step, q_len 1, Llama-3-8B's attention shape (Hq 32,
Hkv 8, d 128; `--preset`), bf16, block 64, at each KV length x batch x sparsity; a sparsity s
keeps round((1 - s) S / 64) blocks per (batch, kv head) (half up, at least 1). Inputs are random
normal. Every provider runs in one process, timed by `triton.testing.do_bench` (median, L2
flushed; wall clock on a CPU):
- dense: `sdpa_cudnn`, `sdpa_flash`, `sdpa_efficient`, `sdpa_math` (SDPA under each backend,
  enable_gqa; math only up to `--math-max-len`), `seer_dense` (`ops.decode_attention`,
  backend "triton"), `flex_dense` (compiled FlexAttention, no block mask);
- sparse, on one random keep mask (the newest block and budget - 1 random earlier ones per
  (batch, kv head)) indexed once before timing (`seerlib.decode.select.decode_index`):
  `seer_kernel` (`ops.sparse_decode_attention`, backend "triton") and `flex_sparse` (the same
  blocks as a BlockMask, built before timing);
- `seer_step`: the whole sparse step as generation runs it: the untrained decode gate's scores
  against a K-compression cache filled before timing (`step_index` of "gate@tok=N": the gate's
  query, logits, selection and index in one launch), the kernel; eager and captured in a CUDA
  graph, with the kernel alone on the step's own index: gate share = (step - kernel) / step.
  Beside it: the kernel alone and the index alone in a graph; the earlier torch path of the index
  (`decode_scores`, `select_decode`, `decode_index`) eager and in a graph, and the selection
  alone fused (`ops.decode_select`) on those scores; whether the fused and torch indexes agree.
Each record: ms, µs, bytes moved (K/V of the blocks read, q, out, index), GB/s, its share of the
device copy rate measured at the start of the run, speed-up vs the fastest SDPA row of the same
(batch, KV length), and a check of row 0 against `seerlib.reference` (max abs diff).

`--part generate`: `model.generate` (greedy, `min_new_tokens = max_new_tokens`) of a
`--prompt-len` prompt on SmolLM2-135M's shapes with RANDOM weights (or the cached model with
`--model-cache`): dense (the model's SDPA) and `sparse_generation` at each `--labels` label (the
gate UNTRAINED unless `--decode-gates`). A generate of one token times the prefill; decode tokens/s
= (new tokens - 1) x batch / (total - prefill) (the first new token comes from the prefill).

Usage (repo root; one device call must stay under 10 minutes; --budget-s guards it):
    python bench/bench_decode.py --kv-lens 8192 32768 --out $OUT --tag _step_a
    python bench/bench_decode.py --kv-lens 131072 --out $OUT --tag _step_b
    python bench/bench_decode.py --part generate --out $OUT --tag _gen
    python bench/bench_decode.py --merge a.json b.json --out bench/results
    python bench/bench_decode.py --device cpu --preset tiny --out /tmp/d    # CPU smoke
Writes <out>/decode-<gpu>-<date><tag>.json (a list of records) and .md, after every row.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from seerlib import ops, reference
from seerlib.decode import DecodeGateSet, decode_index, parse_decode_config, select_decode
from seerlib.decode.kcache import KCompressionCache
from seerlib.decode.methods import DecodeInputs, decode_scores, step_index
from seerlib.decode.select import most_blocks
from seerlib.graphs import capture
from seerlib.reference import num_blocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helper modules beside it
import _decode_generate as gen  # noqa: E402
import _decode_peers as peers  # noqa: E402
from _decode_report import FILES, report, targets  # noqa: E402
from _results import (  # noqa: E402
    Results,
    Skip,
    free,
    merge,
    resolve_device,
    row_runner,
    run_meta,
    stop_when_out_of_time,
)

# attention (and, for generate, model) shapes; a LlamaConfig of these keys is built lazily
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      vocab_size=32000, rope_theta=500000.0, rms_norm_eps=1e-5),
    "smollm2": gen.SMOLLM2,
    "tiny": None,  # seerlib.distill.tiny_config(): 4 / 2 heads, d 16 (CPU smoke)
}
DEFAULT_PRESET = {"step": "llama3-8b", "generate": "smollm2"}
SDPA = tuple(peers.SDPA)
DENSE = (*SDPA, "seer_dense", "flex_dense")
SPARSE = ("seer_kernel", "seer_step", "flex_sparse")
PROVIDERS = (*DENSE, *SPARSE)
CUDA_ONLY = ("sdpa_cudnn", "sdpa_efficient")
DTYPES = gen.DTYPES
# max abs diff vs the float32 reference, relative to its largest entry (a few ulps of the dtype)
TOL = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 1e-4}
GATE_NOTE = "the decode gate is untrained (DecodeGateSet.from_config): its choices are arbitrary"


@dataclass(frozen=True)
class BenchConfig:
    part: str = "step"
    preset: str = "llama3-8b"
    kv_lens: tuple[int, ...] = (8192, 32768, 131072)
    batches: tuple[int, ...] = (1, 8, 16)
    sparsities: tuple[float, ...] = (0.9, 0.95)
    providers: tuple[str, ...] = PROVIDERS
    block_size: int = 64
    device: str = "cuda"
    dtype: str = "bf16"
    gate_dtype: str | None = None  # the decode gate's parameters (default: dtype)
    rep_ms: int = 100  # do_bench's rep and warmup, ms of device time
    warmup_ms: int = 25
    math_max_len: int = 32768
    budget_s: float = 540.0
    seed: int = 0
    # --part generate
    prompt_len: int = 8000
    new_tokens: int = 128
    labels: tuple[str, ...] = gen.LABELS
    reps: int = 1
    decode_gates: str | None = None
    model_cache: str | None = None


# ---------------------------------------------------------------------------------------------
# budgets, masks, bytes


def budget_blocks(sparsity: float, kv_len: int, block_size: int) -> int:
    """Blocks a query reads at `sparsity`: round((1 - s) S / b), half up, in [1, ceil(S / b)]."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1); got {sparsity}")
    nb = num_blocks(kv_len, block_size)
    return max(1, min(nb, math.floor((1 - sparsity) * kv_len / block_size + 0.5)))


def random_keep(batch: int, kv_heads: int, kv_len: int, block_size: int, kept_blocks: int,
                device, seed: int = 0) -> torch.Tensor:
    """(B, Hkv, nb) bool: the newest block (nb - 1) and kept_blocks - 1 random earlier blocks per
    (batch, kv head)."""
    nb = num_blocks(kv_len, block_size)
    if not 1 <= kept_blocks <= nb:
        raise ValueError(f"kept_blocks must lie in [1, {nb}] at S {kv_len}, b {block_size}; "
                         f"got {kept_blocks}")
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(batch, kv_heads, nb, device=device, generator=g)
    scores[..., -1] = 2.0  # ranks first: the newest block is always read
    top = scores.topk(kept_blocks, dim=-1).indices  # (B, Hkv, kept)
    return torch.zeros(batch, kv_heads, nb, dtype=torch.bool, device=device).scatter_(-1, top, True)


def kept_tokens(kept_blocks: int, kv_len: int, block_size: int) -> int:
    """Keys in kept_blocks blocks that include the newest (possibly partial) one."""
    nb = num_blocks(kv_len, block_size)
    return (kept_blocks - 1) * block_size + kv_len - (nb - 1) * block_size


def traffic(B: int, Hq: int, Hkv: int, d: int, elt: int, tokens: int, kv_heads_read=None,
            meta: int = 0, extra: int = 0) -> dict:
    """Bytes a decode step must move: K and V of `tokens` keys per (batch, kv head read), q read
    and out written (B, Hq, 1, d each), `meta` (index, block lists) and `extra` (gate keys).
    kv_heads_read: Hkv (default), or Hq when K/V were repeated to the query heads."""
    kv = 2 * B * (kv_heads_read or Hkv) * tokens * d * elt
    qo = 2 * B * Hq * d * elt
    return {"kv_bytes": kv, "qo_bytes": qo, "meta_bytes": meta, "extra_bytes": extra,
            "bytes": kv + qo + meta + extra}


# ---------------------------------------------------------------------------------------------
# one (KV length, batch): inputs and rows


def attention_config(preset: str):
    """A transformers config of the preset's attention (one layer), for the decode gate."""
    if preset == "tiny":
        from seerlib.distill import tiny_config  # lazy: imports transformers (seconds)

        return tiny_config(num_hidden_layers=1, max_position_embeddings=1 << 17)
    from transformers import LlamaConfig  # lazy: seconds to import

    return LlamaConfig(**{**SHAPES[preset], "num_hidden_layers": 1,
                          "max_position_embeddings": 1 << 17})


class Case:
    """Inputs of one (KV length, batch), the references of row 0 and the step's gate."""

    def __init__(self, cfg: BenchConfig, device, attn_cfg, kv_len: int, batch: int):
        self.cfg, self.device, self.S, self.B, self.b = cfg, device, kv_len, batch, cfg.block_size
        self.Hq, self.Hkv = attn_cfg.num_attention_heads, attn_cfg.num_key_value_heads
        self.d = getattr(attn_cfg, "head_dim", None) or attn_cfg.hidden_size // self.Hq
        self.dtype = DTYPES[cfg.dtype]
        self.elt = torch.empty((), dtype=self.dtype).element_size()
        g = torch.Generator(device=device).manual_seed(cfg.seed + kv_len * 31 + batch)
        like = {"device": device, "dtype": self.dtype, "generator": g}
        self.q = torch.randn(batch, self.Hq, 1, self.d, **like)
        self.k, self.v = (torch.randn(batch, self.Hkv, kv_len, self.d, **like) for _ in range(2))
        self.nb = num_blocks(kv_len, self.b)
        self._attn_cfg, self._gate, self._k_gate, self._dense_ref = attn_cfg, None, None, None
        self.keeps: dict[float, tuple] = {}

    def row0(self):
        return self.q[:1].float(), self.k[:1].float(), self.v[:1].float()

    def dense_ref(self) -> torch.Tensor:
        if self._dense_ref is None:
            self._dense_ref = reference.decode_attention(*self.row0())
        return self._dense_ref

    def check(self, out: torch.Tensor, want: torch.Tensor) -> dict:
        """Row 0 of `out` against the float32 reference `want`: max abs diff, and ok when it is
        within TOL (relative to the reference's largest entry: a decode output over many random
        values is small, so an absolute bound would pass zeros)."""
        diff, scale = float((out[:1].float() - want).abs().max()), float(want.abs().max())
        limit = TOL[self.cfg.dtype] * max(scale, 1e-6)
        return {"max_abs_diff": diff, "check_limit": limit, "check_ok": diff <= limit,
                "ref_max_abs": scale}

    def sparse(self, s: float):
        """(kept blocks, keep (B, Hkv, nb), index, count, reference of row 0) at sparsity s."""
        if s not in self.keeps:
            kb = budget_blocks(s, self.S, self.b)
            keep = random_keep(self.B, self.Hkv, self.S, self.b, kb, self.device,
                               seed=self.cfg.seed + self.S + self.B)
            idx, cnt = decode_index(keep, kb)
            ref = reference.sparse_decode_attention(*self.row0(), idx[:1], cnt[:1], self.b)
            self.keeps[s] = (kb, keep, idx, cnt, ref)
        return self.keeps[s]

    def gate(self):
        """(the layer's untrained DecodeGate, its K-compression cache keys of all S keys)."""
        if self._gate is None:
            gates = DecodeGateSet.from_config(self._attn_cfg, block_size=self.b)
            gate_dtype = DTYPES[self.cfg.gate_dtype or self.cfg.dtype]
            self._gate = gates.to(device=self.device, dtype=gate_dtype).eval()[0]
            self._gate.requires_grad_(False)
            cache = KCompressionCache(self._gate)
            cache.update(self.k)  # random keys stand in for the pre-RoPE ones (timing only)
            self._k_gate = cache.keys
        return self._gate, self._k_gate

    def time(self, fn) -> float:
        return peers.time_ms(fn, self.device, self.cfg.rep_ms, self.cfg.warmup_ms)

    def traffic(self, tokens: int, **kw) -> dict:
        return traffic(self.B, self.Hq, self.Hkv, self.d, self.elt, tokens, **kw)


def seer_impl(case: Case) -> str:
    """Which code `ops` runs for backend "triton" on these inputs (kernel or reference)."""
    # ops' own dispatch rule (private, no public flag): the record says what was timed
    if ops._use_kernels(case.q, "triton", case.b, inputs=(case.q, case.k, case.v)):
        return "triton kernel (seerlib.kernels.sparse_decode)"
    return "torch reference"


def dense_row(case: Case, provider: str) -> dict:
    q, k, v = case.q, case.k, case.v
    extra = {}
    if provider in SDPA:
        if provider in CUDA_ONLY and case.device.type != "cuda":
            raise Skip(f"SDPA's {provider.removeprefix('sdpa_')} backend runs on CUDA only")
        if provider == "sdpa_math" and case.S > case.cfg.math_max_len:
            raise Skip(f"sdpa_math materializes repeated K/V and scores; skipped past "
                       f"--math-max-len {case.cfg.math_max_len}")
        fn, how = peers.sdpa_call(provider, q, k, v)
        repeated = how != "enable_gqa"
        extra["gqa"] = how
        tr = case.traffic(case.S, kv_heads_read=case.Hq if repeated else None)
    elif provider == "seer_dense":
        fn = lambda: ops.decode_attention(q, k, v, backend="triton")  # noqa: E731
        extra["impl"] = seer_impl(case)
        tr = case.traffic(case.S)
    else:  # flex_dense
        compiled = case.device.type == "cuda"
        fn, extra["compile_s"] = peers.flex_call(q, k, v, None, compiled)
        extra["flex_mode"] = "compiled" if compiled else "eager (CPU: a check, not a timing)"
        tr = case.traffic(case.S)
    out = fn()
    return {"ms": case.time(fn), **tr, **extra, **case.check(out, case.dense_ref()),
            "check_against": "reference.decode_attention"}


def sparse_row(case: Case, provider: str, s: float) -> dict:
    kb, keep, idx, cnt, ref = case.sparse(s)
    q, k, v, b = case.q, case.k, case.v, case.b
    tokens = kept_tokens(kb, case.S, b)
    if provider == "seer_kernel":
        fn = lambda: ops.sparse_decode_attention(q, k, v, idx, cnt, b, backend="triton")  # noqa: E731
        extra = {"impl": seer_impl(case)}
        meta = idx.numel() * 4 + cnt.numel() * 4
    else:  # flex_sparse
        compiled = case.device.type == "cuda"
        bm = peers.flex_block_mask(idx, cnt, case.Hq, case.S, b, None if compiled else keep)
        fn, compile_s = peers.flex_call(q, k, v, bm, compiled)
        extra = {"flex_mode": "compiled" if compiled else "eager (CPU: a check, not a timing)",
                 "compile_s": compile_s}
        meta = 2 * (bm.kv_indices.numel() + bm.kv_num_blocks.numel()) * 4
    out = fn()
    return {"ms": case.time(fn), **case.traffic(tokens, meta=meta), **extra,
            **case.check(out, ref), "check_against": "reference.sparse_decode_attention"}


def _library_frame(exc: BaseException) -> str:
    """file:line of the deepest seerlib/kernels frame of exc's traceback (where a capture broke)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "seerlib" in f.filename or f"{os.sep}kernels{os.sep}" in f.filename]
    if not frames:
        return "no seerlib frame"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def index_overlap(a: torch.Tensor, b: torch.Tensor, nb: int) -> float:
    """Share of the blocks kept by index a (B, Hkv, K; -1 padding) that index b keeps too."""
    def mask(i):
        m = torch.zeros(*i.shape[:2], nb + 1, dtype=torch.bool, device=i.device)
        return m.scatter_(-1, torch.where(i < 0, nb, i).long(), True)[..., :nb]
    ma, mb = mask(a), mask(b)
    return float((ma & mb).sum()) / max(1, int(ma.sum()))


def graph_ms(case: Case, fn):
    """(median ms of fn replayed as a CUDA graph, its captured output); the GPU time alone, with no
    launch cost on the host. Raises what capture raises."""
    graph, captured = capture(fn, case.device, warmup=3)
    graph.replay()
    return case.time(graph.replay), captured


def step_row(case: Case, s: float) -> dict:
    """The sparse step: `step_index` (the gate on the K-compression cache, the selection and the
    index; one launch on CUDA) -> kernel; eager, as a CUDA graph, and the kernel alone on the
    step's index. Beside it, in the same process: the index alone, the torch path to it, and the
    fused selection alone on the torch path's scores (module docstring)."""
    kb = budget_blocks(s, case.S, case.b)
    dcfg = parse_decode_config(f"gate@tok={kb * case.b}", case.b)
    gate, k_gate = case.gate()
    q, k, v, b = case.q, case.k, case.v, case.b
    positions = torch.full((1,), case.S - 1, dtype=torch.long, device=case.device)
    inputs = DecodeInputs(q, k, positions, b, gate=gate, q_pre=q, k_gate=k_gate)
    K, nb = most_blocks(dcfg.selection, b), num_blocks(case.S, b)

    def index():
        return step_index(dcfg, inputs, K)

    def step():
        idx, cnt = index()
        return ops.sparse_decode_attention(q, k, v, idx, cnt, b, backend="triton")

    eager_out = step()
    eager = case.time(step)
    idx, cnt = index()
    scores = decode_scores(dcfg, inputs)

    def kernel_fn():
        return ops.sparse_decode_attention(q, k, v, idx, cnt, b, backend="triton")

    def unfused():
        keep = select_decode(decode_scores(dcfg, inputs), dcfg.selection, positions, b)
        return decode_index(keep, K)

    kernel = case.time(kernel_fn)
    ref = reference.sparse_decode_attention(*case.row0(), idx[:1], cnt[:1], b)
    want_idx, want_cnt = unfused()
    out = {"eager_ms": eager, "kernel_ms": kernel, "config": dcfg.label, "gate": GATE_NOTE,
           "impl": seer_impl(case), "gate_share_eager": (eager - kernel) / eager,
           "step_kept_blocks": float(cnt.float().mean()),
           "k_gate_blocks": int(k_gate.shape[2]),
           "index_ms": case.time(index),
           "select_fused_ms": case.time(lambda: ops.decode_select(
               scores, dcfg.selection, positions, nb, b, K)),
           "select_unfused_ms": case.time(unfused),
           "index_equals_unfused": bool(torch.equal(idx, want_idx) and torch.equal(cnt, want_cnt)),
           # the fused step is float32 inside, the torch path rounds the query to the gate's dtype
           "index_overlap_unfused": index_overlap(idx, want_idx, nb),
           **case.traffic(kept_tokens(kb, case.S, b), meta=idx.numel() * 4 + cnt.numel() * 4,
                          extra=k_gate.numel() * k_gate.element_size()
                          + gate.q_proj.numel() * gate.q_proj.element_size()),
           **case.check(eager_out, ref), "check_against": "reference.sparse_decode_attention "
           "on the step's own index",
           "not_timed": "the K-compression cache's append of the new key (a cat; a pooled "
           "block every b steps)"}
    if case.device.type != "cuda":
        return {**out, "ms": eager, "ms_from": "eager", "graph_error": "CUDA graphs: CUDA only"}
    try:
        g_ms, captured = graph_ms(case, step)
        diff = float((captured.float() - step().float()).abs().max())
        out["kernel_graph_ms"] = graph_ms(case, kernel_fn)[0]
        out["index_graph_ms"] = graph_ms(case, index)[0]
        out["unfused_index_graph_ms"] = graph_ms(case, unfused)[0]
    except Exception as e:  # noqa: BLE001 - a capture failure is a result for the lead
        torch.cuda.synchronize(case.device)
        return {**out, "ms": eager, "ms_from": "eager",
                "graph_error": f"{type(e).__name__}: {str(e).strip()[:600]}",
                "graph_error_at": _library_frame(e)}
    return {**out, "ms": g_ms, "ms_from": "graph", "graph_ms": g_ms,
            "gate_share_graph": (g_ms - kernel) / g_ms,
            "gate_share_graph_vs_kernel_graph": (g_ms - out["kernel_graph_ms"]) / g_ms,
            "graph_vs_eager_max_abs_diff": diff}


def step_plan(cfg: BenchConfig) -> list[tuple[str, float | None]]:
    """(provider, sparsity) rows of one (KV length, batch), flex last (it compiles per shape: a
    run cut short loses it first)."""
    p = set(cfg.providers)
    rows = [(x, None) for x in (*SDPA, "seer_dense") if x in p]
    rows += [(x, s) for s in cfg.sparsities for x in ("seer_kernel", "seer_step") if x in p]
    rows += [("flex_dense", None)] if "flex_dense" in p else []
    return rows + [("flex_sparse", s) for s in cfg.sparsities if "flex_sparse" in p]


def row(case: Case | None, provider: str, sparsity: float | None, why: str | None) -> dict:
    """One row's fields; a case that could not be made skips every row (why)."""
    if case is None:
        raise Skip(why)
    if provider == "seer_step":
        return step_row(case, sparsity)
    if provider in SPARSE:
        return sparse_row(case, provider, sparsity)
    return dense_row(case, provider)


def fits(case_bytes: int, device) -> str | None:
    """Why inputs of case_bytes (K + V) would not fit (x3 for references and the gate's
    pooling), or None."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if 3 * case_bytes > free:
        return f"needs ~{3 * case_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def run_step(cfg: BenchConfig, device, guarded) -> None:
    attn_cfg = attention_config(cfg.preset)
    plan = step_plan(cfg)
    Hkv = attn_cfg.num_key_value_heads
    d = getattr(attn_cfg, "head_dim", None) or attn_cfg.hidden_size // attn_cfg.num_attention_heads
    elt = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    print(f"{len(plan)} rows per (KV length, batch), {len(cfg.kv_lens) * len(cfg.batches)} "
          f"combinations", flush=True)
    for S in cfg.kv_lens:
        for B in cfg.batches:
            base = {"part": "step", "kind": "row", "kv_len": S, "batch": B}

            def keys(p, s, base=base, S=S):
                kb = budget_blocks(s, S, cfg.block_size) if s is not None else None
                return {**base, "provider": p, "sparsity": s,
                        "kept_blocks": kb if kb is not None else num_blocks(S, cfg.block_size),
                        "budget_tokens": kb * cfg.block_size if kb is not None else S}

            why = fits(2 * B * Hkv * S * d * elt, device)
            case = None
            if why is None:
                try:
                    case = Case(cfg, device, attn_cfg, S, B)
                except torch.OutOfMemoryError as e:
                    why = f"inputs: OutOfMemoryError: {str(e)[:200]}"
            for p, s in plan:
                guarded(keys(p, s), lambda p=p, s=s, c=case, why=why: row(c, p, s, why))
            case = None
            free(device)


# ---------------------------------------------------------------------------------------------
# main


def run_bench(cfg: BenchConfig, out_dir: str, tag: str, command: str) -> str:
    device = resolve_device(cfg.device)
    meta = run_meta(device, command)
    t_start = time.perf_counter()
    copy = peers.copy_rate(device)
    meta = {**meta, "dtype": cfg.dtype, "gate_dtype": cfg.gate_dtype or cfg.dtype,
            "block_size": cfg.block_size, "preset": cfg.preset, **copy,
            "timing": ("triton.testing.do_bench median (L2 flushed), "
                       f"rep {cfg.rep_ms} ms, warmup {cfg.warmup_ms} ms")
            if device.type == "cuda" else "wall clock median (CPU)"}
    os.makedirs(out_dir, exist_ok=True)
    res = Results(FILES.stem(out_dir, meta["gpu"], meta["date"], tag), FILES)
    print(f"{meta['gpu']}: part {cfg.part}, preset {cfg.preset}; copy rate "
          f"{copy['copy_gbs']:.0f} GB/s; writing {res.stem}.json/.md", flush=True)

    def rates(rec: dict) -> None:
        if "ms" in rec and "bytes" in rec:
            rec["us"] = rec["ms"] * 1e3
            rec["gbs"] = rec["bytes"] / (rec["ms"] * 1e-3) / 1e9
            rec["copy_share"] = rec["gbs"] / copy["copy_gbs"]

    guarded = row_runner(res, meta, device, report, t_start=t_start, budget_s=cfg.budget_s,
                         oom_status="oom", finish=rates)
    with stop_when_out_of_time(cfg.budget_s):
        if cfg.part == "step":
            run_step(cfg, device, guarded)
        else:
            gen.run_generate(cfg, device, guarded)
    for line in targets(res.records):
        print(line, flush=True)
    print(f"done in {time.perf_counter() - t_start:.0f} s: {res.stem}.json and .md", flush=True)
    return res.stem


def parse(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=" ".join(head.split()), epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("step", "generate"), default="step")
    p.add_argument("--preset", choices=tuple(SHAPES), default=None,
                   help="shapes (default llama3-8b for step, smollm2 for generate)")
    p.add_argument("--kv-lens", type=int, nargs="+", default=None,
                   help="default 8192 32768 131072 (1000 with --device cpu)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="default 1 8 16 (step) / 1 16 (generate); 1 2 with --device cpu")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(BenchConfig.sparsities))
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--block-size", type=int, default=BenchConfig.block_size)
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--gate-dtype", choices=tuple(DTYPES), default=None,
                   help="the decode gate's dtype (default: --dtype; load_gates' own is fp32)")
    p.add_argument("--rep-ms", type=int, default=BenchConfig.rep_ms)
    p.add_argument("--warmup-ms", type=int, default=BenchConfig.warmup_ms)
    p.add_argument("--math-max-len", type=int, default=BenchConfig.math_max_len)
    p.add_argument("--budget-s", type=float, default=BenchConfig.budget_s,
                   help="start no row after this many seconds (0: no limit; default %(default)s:"
                        " one device call is capped at 600 s)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 8000 (300 on cpu)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (8 on cpu)")
    p.add_argument("--labels", nargs="+", default=list(gen.LABELS))
    p.add_argument("--reps", type=int, default=BenchConfig.reps, help="generate calls timed")
    p.add_argument("--decode-gates", default=None, help="a decode gate file (load_gates)")
    p.add_argument("--model-cache", default=None,
                   help="SEERLIB_CACHE folder holding the cached SmolLM2: real weights")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine earlier result files into --out/decode-<gpu>-<date><tag>.*")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device == "cpu"
    for label in a.labels:
        parse_decode_config(label, a.block_size)  # a bad label fails now
    for s in a.sparsities:
        budget_blocks(s, 1 << 20, a.block_size)
    cfg = BenchConfig(
        part=a.part, preset=a.preset or DEFAULT_PRESET[a.part],
        kv_lens=tuple(a.kv_lens or ((1000,) if cpu else BenchConfig.kv_lens)),
        batches=tuple(a.batches or ((1, 2) if cpu else (1, 16) if a.part == "generate"
                                    else BenchConfig.batches)),
        sparsities=tuple(a.sparsities), providers=tuple(dict.fromkeys(a.providers)),
        block_size=a.block_size, device=device,
        dtype=a.dtype or ("fp32" if cpu else "bf16"), gate_dtype=a.gate_dtype, rep_ms=a.rep_ms,
        warmup_ms=a.warmup_ms,
        math_max_len=a.math_max_len, budget_s=a.budget_s,
        prompt_len=a.prompt_len or (300 if cpu else BenchConfig.prompt_len),
        new_tokens=a.new_tokens or (8 if cpu else BenchConfig.new_tokens),
        labels=tuple(a.labels), reps=max(1, a.reps), decode_gates=a.decode_gates,
        model_cache=a.model_cache,
    )
    if cfg.part == "generate" and cfg.preset == "llama3-8b":
        raise ValueError("--part generate builds smollm2 or tiny; llama3-8b is a step shape")
    return cfg, a


def main(argv=None) -> str:
    cfg, a = parse(argv)
    if a.merge:
        stem = merge(a.merge, a.out, FILES, a.tag)
        print(open(stem + ".md").read())
        return stem
    if cfg.device == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on CPU tensors
    args = sys.argv[1:] if argv is None else list(argv)
    stem = run_bench(cfg, a.out, a.tag, "python bench/bench_decode.py " + shlex.join(args))
    print(open(stem + ".md").read())
    return stem


if __name__ == "__main__":
    main()

