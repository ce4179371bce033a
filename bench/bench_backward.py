"""Forward + backward of block-sparse attention against dense attention's (issue 16).

Times, at each shape and length, one training step's attention: the forward, then dq, dk, dv
from a random output gradient (`torch.autograd.grad`), on random bf16 tensors (timing does not
depend on the values) with a random 90%-sparse block mask (`bench_attention.random_mask`: the
diagonal and each lower block kept with one probability).

Providers, all in one process (ratios pair rows of one run only):
- `seer`: `seerlib.ops.block_sparse_attention(q, k, v, mask, b)` under autograd, as a user calls
  it: both block indexes (the forward's and the transposed one) are built from the mask inside.
- `seer_kernels`: the kernels alone on indexes built once: the forward storing its LSE, then
  `block_sparse_backward`. `seer_fwd` and `seer_bwd` split that in two; `seer_index` times the
  two index builds from the mask that `seer` adds.
- `seer_dense`: `seer_kernels` on the full causal mask (our kernels' dense rate).
- `sdpa_flash`, `sdpa_cudnn`: `F.scaled_dot_product_attention(is_causal=True)` forward +
  backward on that backend (dense).
- `flex`: FlexAttention (compiled) forward + backward on the same block mask; a compile failure
  is recorded as the row's error, with each kernel-option set tried.

TFLOP/s count the kept tiles' work only (forward 2 matmuls, backward 5: the FlashAttention-2
convention), so a sparse row's rate compares with a dense row's.

Checks (recorded beside the timings): the kernels' dq, dk, dv against autograd through
`seerlib.reference` in float32 at `--check-len` tokens; and `seer_dense`'s against SDPA flash's
at the timed length.

`--tune` first sweeps num_warps x num_stages for each of the backward's two launches at each
shape (the dK/dV pass with the dQ pass at its default, then the dQ pass with the best dK/dV),
records every point, and times the seer rows with the best.

    python bench/bench_backward.py --device cuda --tune --out bench/results
CPU smoke run (the kernels under TRITON_INTERPRET=1, CUDA-only rows skipped with the reason):
    TRITON_INTERPRET=1 python bench/bench_backward.py --device cpu --shapes tiny --seq-lens 256
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _decode_peers import time_ms  # noqa: E402
from _results import (  # noqa: E402
    ResultFiles,
    Results,
    Skip,
    free,
    resolve_device,
    row_runner,
    run_meta,
    stop_when_out_of_time,
)
from bench_attention import flex_setup, random_mask, realized_sparsity, rel_err  # noqa: E402

from seerlib import ops  # noqa: E402
from seerlib import reference as ref  # noqa: E402
from seerlib.kernels.block_index import build_block_index, build_key_index  # noqa: E402
from seerlib.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from seerlib.kernels.block_sparse_backward import block_sparse_backward  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One attention layer's shape: q heads, kv heads, head dim."""

    name: str
    q_heads: int
    kv_heads: int
    head_dim: int


SHAPES = {
    "smollm2": Shape("smollm2", 9, 3, 64),  # SmolLM2-135M
    "8b": Shape("8b", 32, 8, 128),  # Llama-3-8B
    "tiny": Shape("tiny", 4, 2, 16),  # CPU smoke runs
}
PROVIDERS = ("seer", "seer_kernels", "seer_fwd", "seer_bwd", "seer_index", "seer_dense",
             "sdpa_flash", "sdpa_cudnn", "flex")
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5, "index": 0.0}  # x the forward's 2 matmuls
# FlexAttention kernel options tried in turn for its backward (None: its defaults)
FLEX_OPTIONS = (None, {"BLOCK_M": 64, "BLOCK_N": 64},
                {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32})
TUNE_WARPS, TUNE_STAGES = (4, 8), (1, 2, 3)
TARGET_X_CUDNN = 5.0  # the issue's target: sparse fwd+bwd >= 5x cuDNN's dense fwd+bwd


def provider_pass(provider: str) -> str:
    return {"seer_fwd": "fwd", "seer_bwd": "bwd", "seer_index": "index"}.get(provider, "fwd+bwd")


def tflops(shape: Shape, S: int, density: float, ms: float, pass_: str, batch: int = 1) -> float:
    """Rate on the kept tiles: causal forward FLOPs x density x PASS_FLOPS[pass_] / time."""
    causal = 4.0 * batch * shape.q_heads * S * S * shape.head_dim / 2
    return causal * density * PASS_FLOPS[pass_] / (ms * 1e-3) / 1e12


def grads(fn, q, k, v, dout):
    """(out, dq, dk, dv) of `fn(q, k, v)` against `dout`."""
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def sdpa_fwd_bwd(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel  # lazy: CUDA rows only

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def fn(q, k, v):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return fn


class Case:
    """The tensors of one (shape, length): q, k, v (requiring grad), dout, the mask and its
    indexes, and the backward's launch settings."""

    def __init__(self, shape: Shape, S: int, sparsity: float, block: int, device, seed: int = 0):
        self.shape, self.S, self.block, self.device = shape, S, block, device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(h):
            x = torch.randn(1, h, S, shape.head_dim, device=device, dtype=dtype, generator=g)
            return x.requires_grad_()

        self.q, self.k, self.v = rand(shape.q_heads), rand(shape.kv_heads), rand(shape.kv_heads)
        self.dout = torch.randn_like(self.q)
        nb = -(-S // block)
        self.mask = random_mask(1, shape.q_heads, nb, sparsity, device, seed=seed)
        self.density = 1.0 - realized_sparsity(self.mask)
        self.full = torch.ones(nb, nb, dtype=torch.bool, device=device).tril_().expand(
            1, shape.q_heads, nb, nb).contiguous()
        self.indexes = {name: self.build(m) for name, m in (("sparse", self.mask),
                                                           ("dense", self.full))}
        self.launch_dkdv: dict | None = None
        self.launch_dq: dict | None = None

    def build(self, mask):
        """Both indexes, as the autograd forward builds them (the key index sync-free)."""
        H, S, b = self.shape.q_heads, self.S, self.block
        return (build_block_index(mask, 1, H, S, b),
                build_key_index(mask, 1, H, S, b, sync_free=True))

    def forward(self, which: str):
        """Kernel forward on a prebuilt index: (out, lse), no autograd."""
        index, _ = self.indexes[which]
        q, k, v = (t.detach() for t in (self.q, self.k, self.v))
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        return block_sparse_attention(q, k, v, index, self.block, lse=lse), lse

    def backward(self, which: str, out, lse):
        index, key_index = self.indexes[which]
        q, k, v = (t.detach() for t in (self.q, self.k, self.v))
        return block_sparse_backward(q, k, v, out, lse, self.dout, index, key_index, self.block,
                                     None, launch_dkdv=self.launch_dkdv, launch_dq=self.launch_dq)

    def kernels(self, which: str):
        out, lse = self.forward(which)
        return (out, *self.backward(which, out, lse))


def provider_fn(case: Case, provider: str, flex_opts=None):
    """A no-argument callable that runs `provider` once, and the density of its tiles."""
    cuda = case.device.type == "cuda"
    if provider in ("sdpa_flash", "sdpa_cudnn", "flex") and not cuda:
        raise Skip(f"{provider} is timed on CUDA only")
    q, k, v, dout = case.q, case.k, case.v, case.dout
    if provider == "seer":
        return (lambda: grads(lambda *t: ops.block_sparse_attention(*t, case.mask, case.block),
                              q, k, v, dout)), case.density
    if provider == "seer_kernels":
        return (lambda: case.kernels("sparse")), case.density
    if provider == "seer_fwd":
        return (lambda: case.forward("sparse")), case.density
    if provider == "seer_bwd":
        out, lse = case.forward("sparse")
        return (lambda: case.backward("sparse", out, lse)), case.density
    if provider == "seer_index":  # what `seer` adds to `seer_kernels`: both indexes from the mask
        return (lambda: case.build(case.mask)), case.density
    if provider == "seer_dense":
        return (lambda: case.kernels("dense")), 1.0
    if provider.startswith("sdpa_"):
        fn = sdpa_fwd_bwd(provider.removeprefix("sdpa_"))
        return (lambda: grads(fn, q, k, v, dout)), 1.0
    if provider == "flex":
        make, run = flex_setup()
        block_mask = make(case.mask, case.S, case.block)

        def flex(*t):
            return run(*t, block_mask, case.block, kernel_options=flex_opts)

        return (lambda: grads(flex, q, k, v, dout)), case.density
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def timed(case: Case, provider: str, reps: int, flex_opts=None) -> dict:
    fn, density = provider_fn(case, provider, flex_opts)
    dev = case.device
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    fn()  # compiles (flex), warms up
    peak = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = time_ms(fn, dev, reps=reps, warmup=max(10, reps // 4))
    pass_ = provider_pass(provider)
    return {"pass": pass_, "ms": ms, "density": density, "peak_mem_mb": peak,
            "tflops": tflops(case.shape, case.S, density, ms, pass_)}


def flex_row(case: Case, reps: int) -> dict:
    """FlexAttention with each option set in FLEX_OPTIONS until one compiles and runs."""
    errors = []
    for opts in FLEX_OPTIONS:
        try:
            return {**timed(case, "flex", reps, opts), "flex_kernel_options": opts,
                    "flex_errors": errors}
        except Skip:
            raise
        except Exception as e:  # noqa: BLE001 - a compile failure is the result
            errors.append({"kernel_options": opts, "error": f"{type(e).__name__}: {e}"[:600]})
            torch._dynamo.reset()
            free(case.device)
    raise RuntimeError("FlexAttention forward+backward failed with every option set: "
                       + " | ".join(f"{e['kernel_options']}: {e['error'][:200]}" for e in errors))


def tune(case: Case, reps: int, add) -> None:
    """Sweep num_warps x num_stages per backward launch; keep the best on `case`."""
    if case.device.type != "cuda":
        raise Skip("launch settings are tuned on CUDA only (the interpreter ignores them)")
    out, lse = case.forward("sparse")
    points = [{"num_warps": w, "num_stages": s} for w in TUNE_WARPS for s in TUNE_STAGES]

    def sweep(which):
        best = None
        for p in points:
            setattr(case, which, p)
            try:
                ms = time_ms(lambda: case.backward("sparse", out, lse), case.device, reps=reps)
            except Exception as e:  # noqa: BLE001 - a launch that does not fit is a result
                add({"tune": which, **p, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            add({"tune": which, **p, "bwd_ms": ms})
            if best is None or ms < best[0]:
                best = (ms, p)
        setattr(case, which, best[1] if best else None)

    sweep("launch_dkdv")
    sweep("launch_dq")


def check_rows(case: Case, check_len: int) -> list[dict]:
    """The kernels' grads against the float32 reference (at check_len tokens) and seer_dense's
    against SDPA flash's (at the case's length, CUDA)."""
    rows = []
    S = min(check_len, case.S)
    small = Case(case.shape, S, 1.0 - case.density, case.block, case.device, seed=1)
    got = small.kernels("sparse")

    def reference(q, k, v, mask=small.mask, block=small.block):
        return ref.block_sparse_attention(q, k, v, mask, block)

    want = grads(reference, *(t.detach().float().requires_grad_() for t in (small.q, small.k,
                                                                           small.v)),
                 small.dout.float())
    rows.append({"check": "kernels vs float32 reference", "seq_len": S,
                 **{f"rel_err_{n}": rel_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"),
                                                                     got, want, strict=True)}})
    del small, got, want
    free(case.device)
    if case.device.type == "cuda":
        got = case.kernels("dense")
        want = grads(sdpa_fwd_bwd("flash"), case.q, case.k, case.v, case.dout)
        rows.append({"check": "seer_dense vs SDPA flash", "seq_len": case.S,
                     **{f"rel_err_{n}": rel_err(a, b)
                        for n, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}})
    limit = 2e-2 if case.device.type == "cuda" else 1e-4
    for r in rows:
        errs = [v for key, v in r.items() if key.startswith("rel_err_")]
        r.update(limit=limit, ok=all(e <= limit for e in errs))
    return rows


# ---------------------------------------------------------------------------------------------
# result files


def add_ratios(records: list[dict]) -> None:
    """x_cudnn, x_flash: that dense row's fwd+bwd ms over this row's, same shape and length."""
    dense = {(r.get("shape"), r.get("seq_len"), r["provider"]): r["ms"] for r in records
             if r.get("status") == "ok" and r.get("provider", "").startswith("sdpa_")}
    for r in records:
        if r.get("status") != "ok" or r.get("pass") != "fwd+bwd":
            continue
        for peer, name in (("sdpa_cudnn", "x_cudnn"), ("sdpa_flash", "x_flash")):
            ms = dense.get((r.get("shape"), r.get("seq_len"), peer))
            r[name] = ms / r["ms"] if ms else None


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(records: list[dict]) -> str:
    if not records:
        return "(no rows yet)\n"
    m = records[0]
    lines = [f"# Block-sparse attention forward + backward, {m['gpu']}, {m['date']}", "",
             f"torch {m['torch']}, triton {m['triton']}; bf16 on CUDA (float32 on a CPU), causal, "
             f"block {m['block_size']}, batch 1, random tensors, random block mask "
             f"(bench_attention.random_mask). Timing: do_bench median. TFLOP/s on kept tiles "
             "(fwd 2 matmuls, bwd 5). x cuDNN / x flash: that SDPA backend's dense fwd+bwd ms "
             "over the row's, same run.", "", f"Command: `{m['command']}`", "",
             "| shape | tokens | provider | pass | density | ms | TFLOP/s | x cuDNN | x flash "
             "| peak MB | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "provider" not in r or (r["provider"] == "tune" and r["status"] == "ok"):
            continue
        why = "" if r["status"] == "ok" else ": " + (r.get("error") or r.get("reason", ""))[:160]
        lines.append(
            f"| {r['shape']} | {r['seq_len']} | {r['provider']} | {r.get('pass', '-')} | "
            f"{_fmt(r.get('density'), '.3f')} | {_fmt(r.get('ms'), '.3f')} | "
            f"{_fmt(r.get('tflops'), '.0f')} | {_fmt(r.get('x_cudnn'), '.2f')} | "
            f"{_fmt(r.get('x_flash'), '.2f')} | {_fmt(r.get('peak_mem_mb'), '.0f')} | "
            f"{r['status']}{why} |")
    targets = [r for r in records if r.get("provider") == "seer" and r.get("x_cudnn")]
    if targets:
        lines += ["", f"Target: `seer` fwd+bwd >= {TARGET_X_CUDNN:.0f}x cuDNN's dense fwd+bwd.", ""]
        for r in targets:
            met = "met" if r["x_cudnn"] >= TARGET_X_CUDNN else "missed"
            lines.append(f"- {r['shape']} at {r['seq_len']}: {r['x_cudnn']:.2f}x ({met})")
    checks = [r for r in records if "check" in r]
    if checks:
        lines += ["", "| check | shape | tokens | out | dq | dk | dv | limit | ok |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in checks:
            errs = " | ".join(_fmt(r.get(f"rel_err_{n}"), ".1e") for n in ("out", "dq", "dk", "dv"))
            lines.append(f"| {r['check']} | {r['shape']} | {r['seq_len']} | {errs} | "
                         f"{r.get('limit')} | {r.get('ok', r['status'])} |")
    tunes = [r for r in records if "tune" in r]
    if tunes:
        lines += ["", "| tuned launch | shape | tokens | num_warps | num_stages | bwd ms |",
                  "|---|---|---|---|---|---|"]
        for r in tunes:
            lines.append(f"| {r['tune']} | {r['shape']} | {r['seq_len']} | {r['num_warps']} | "
                         f"{r['num_stages']} | {_fmt(r.get('bwd_ms'), '.3f')} |")
    return "\n".join(lines) + "\n"


FILES = ResultFiles("backward", ("shape", "seq_len", "provider", "check", "tune", "num_warps",
                                 "num_stages"), markdown, add_ratios)


# ---------------------------------------------------------------------------------------------
# the run


def run(args) -> str:
    device = resolve_device(args.device)
    meta = {**run_meta(device, " ".join(shlex.quote(a) for a in sys.argv)),
            "block_size": args.block, "sparsity": args.sparsity}
    os.makedirs(args.out, exist_ok=True)
    res = Results(FILES.stem(args.out, meta["gpu"], meta["date"], args.tag), FILES)
    t_start = time.perf_counter()

    def report(rec, t):
        what = rec.get("provider") or rec.get("check") or rec.get("tune")
        print(f"[{t:6.0f}s] {rec.get('shape')} S={rec.get('seq_len')} {what}: {rec['status']} "
              f"{_fmt(rec.get('ms') or rec.get('bwd_ms'), '.3f')} ms "
              f"{rec.get('error', rec.get('reason', ''))[:200]}", flush=True)

    guarded = row_runner(res, meta, device, report, t_start=t_start, budget_s=args.budget_s)
    with stop_when_out_of_time(args.budget_s):
        for name in args.shapes:
            for S in args.seq_lens:
                base = {"shape": name, "seq_len": S}
                case = Case(SHAPES[name], S, args.sparsity, args.block, device)
                if args.tune:
                    tuned = []
                    guarded({**base, "provider": "tune"},
                            lambda case=case, add=tuned.append: tune(case, args.reps, add) or {})
                    for t in tuned:
                        res.add({**meta, **base, "status": "ok", **t})
                launch = {"launch_dkdv": case.launch_dkdv, "launch_dq": case.launch_dq}
                for p in args.providers:
                    if p == "flex":
                        guarded({**base, "provider": p},
                                lambda case=case: flex_row(case, args.reps))
                    else:
                        extra = launch if p.startswith("seer") else {}
                        guarded({**base, "provider": p, **extra},
                                lambda case=case, p=p: timed(case, p, args.reps))
                if args.check_len:
                    for c in check_rows(case, args.check_len):
                        res.add({**meta, **base, "status": "ok", **c})
                del case
                free(device)
    print(f"wrote {res.stem}.json and .md", flush=True)
    return res.stem


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", nargs="+", default=["smollm2", "8b"], choices=sorted(SHAPES))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[32768])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--tune", action="store_true", help="sweep the backward's launch settings")
    p.add_argument("--check-len", type=int, default=4096,
                   help="tokens of the float32 reference check (0: no checks)")
    p.add_argument("--reps", type=int, default=100, help="do_bench rep (ms of device time)")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no row after this (0: none)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1); got {args.sparsity}")
    if any(S < 1 for S in args.seq_lens) or args.block < 16 or args.block & (args.block - 1):
        p.error("--seq-lens must be positive and --block a power of two >= 16")
    return args


def main(argv=None) -> str:
    return run(parse(argv))


if __name__ == "__main__":
    main()
