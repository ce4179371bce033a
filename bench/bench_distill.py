"""Gate-distillation throughput of `seerlib.distill`'s own path, on one device or N under torchrun.

A measured step is what the CLI (`python -m seerlib.distill`) does for one global batch of windows:
`build_cache` (the frozen forward, every layer's attention run through `ops.pooled_attention`,
which returns the attention output and the pooled target in one pass; pooled Q/K features and
targets written to disk), then `Distiller.steps()` (cache read, gate forward/backward, KL, AdamW,
recall on the batch). Headline tokens/s = windows x S / (cache time + train time): every token
seen once, as in the reference recipe (0.5 B tokens, no epochs). Both phases are also given alone.

Model: Llama-3-8B layer shapes (hidden 4096, 32 q / 8 kv heads, head dim 128, MLP 14336, rope
theta 5e5) with RANDOM weights (throughput does not depend on them) and only a few layers
(default 4; cost is linear in layers, so a 32-layer 8B costs about 8x the per-window time).
Target-kernel share: layers x the median time of `ops.pooled_attention` on random Q/K/V of the
model's shape (CUDA events), per window, over the measured per-window time; SDPA (flash) at the
same shape is given beside it, i.e. what the forward's attention costs without the target.

Under torchrun with N > 1 processes each rank first measures alone on its own device (the 1-device
baseline, same global batch), then the DDP run; the report gives the scaling efficiency
tokens/s(N) / (N x tokens/s(1)) and the largest difference between the two runs' gates.

Usage (repo root):
    python bench/bench_distill.py --seq-lens 8192 32768                        # 1 GPU
    torchrun --nproc_per_node 2 bench/bench_distill.py --seq-lens 8192 32768   # 2 GPUs, NCCL
    python bench/bench_distill.py --preset tiny --device cpu --seq-lens 1024    # CPU smoke
    torchrun --nproc_per_node 2 bench/bench_distill.py --preset tiny --device cpu --seq-lens 1024
Writes <out>/distill-<gpu or cpu>-<date><tag>.json and .md.
"""

from __future__ import annotations

import os

# NVLink multicast stays off on shared multi-GPU hosts (set before torch / NCCL load).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from seerlib import ops  # noqa: E402
from seerlib.distill import DistillConfig, Distiller  # noqa: E402
from seerlib.gate import GateSet  # noqa: E402
from seerlib.io import atomic_write_text  # noqa: E402
from seerlib.metrics import block_maps  # noqa: E402
from seerlib.targets import WindowCache, build_cache, default_target, target_dtype  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _results beside it
from _results import device_name, versions, write_json  # noqa: E402

PRESETS = {
    # Llama-3-8B layer shapes; vocab cut to 32000 (the lm head is never run by the capture)
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=4,
        rope_theta=500000.0,
        vocab_size=32000,
    ),
    # Llama-3.2-1B shapes (16 layers, head dim 64)
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        num_hidden_layers=16,
        rope_theta=500000.0,
        vocab_size=32000,
    ),
    # CPU smoke size
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=2,
        rope_theta=10000.0,
        vocab_size=256,
    ),
}


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "llama3-8b"
    layers: int | None = None  # override the preset's layer count
    seq_lens: tuple[int, ...] = (8192, 32768)
    tokens_per_step: int = 65536  # global batch = tokens_per_step // S windows (>= N, N | batch)
    steps: int = 2  # measured steps per sequence length (after one warm-up step)
    block_size: int = 64
    target: str | None = None  # default: kernel on CUDA, exact on CPU
    lr: float = 1e-3
    seed: int = 0
    baseline: bool = True  # under N > 1: measure each rank alone first


def log(*a):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, flush=True)


def build_model(cfg: BenchConfig, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(PRESETS[cfg.preset])
    if cfg.layers:
        shape["num_hidden_layers"] = cfg.layers
    mcfg = LlamaConfig(**shape, max_position_embeddings=max(131072, max(cfg.seq_lens)))
    mcfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)  # every rank builds the same random model
    with torch.device(device):
        model = LlamaForCausalLM(mcfg)
    return model.to(dtype).eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device):
    sync(device)
    if dist.is_initialized():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def time_op(fn, device, reps: int = 5) -> float:
    """Milliseconds of fn() after two warm-up calls: the median of `reps` CUDA-event timings on a
    GPU, the minimum of `reps` wall-clock timings on a (shared, noisy) CPU."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) if device.type == "cuda" else min(times)


def attention_timings(model, S: int, cfg: BenchConfig, target: str, device) -> dict:
    """Per-layer ms of the target op and of SDPA alone, on random Q/K/V of the model's shape.

    The target op is `ops.pooled_attention` for "kernel" (it is also the forward's attention)
    and `metrics.block_maps` for "exact" (run beside the model's SDPA).
    """
    c = model.config
    Hq, Hkv, d, b = c.num_attention_heads, c.num_key_value_heads, c.head_dim, cfg.block_size
    kd = target_dtype(target, device, next(model.parameters()).dtype)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, Hq, S, d, device=device, dtype=kd, generator=g)
    k = torch.randn(1, Hkv, S, d, device=device, dtype=kd, generator=g)
    v = torch.randn(1, Hkv, S, d, device=device, dtype=kd, generator=g)
    if target == "kernel":
        op, name = (lambda: ops.pooled_attention(q, k, v, b)), "ops.pooled_attention"
        backend = "triton" if ops._use_kernels(q, None, b) else "reference"
    else:
        op, name, backend = (lambda: block_maps(q, k, b)), "metrics.block_maps", "torch"
    return {
        "target_op": name,
        "target_backend": backend,
        "target_ms": time_op(op, device),
        "sdpa_ms": time_op(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            device,
        ),
    }


@contextlib.contextmanager
def timed_target(device, acc: list):
    """Time every target op the distillation path calls (synchronized; the path copies each
    layer's pooled map to the CPU right after anyway, so the syncs cost about nothing)."""
    import seerlib.targets as sd  # the module whose names the distillation path calls

    originals = (ops.pooled_attention, sd.block_maps)

    def wrap(fn):
        def timed(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            r = fn(*a, **k)
            sync(device)
            acc.append(time.perf_counter() - t0)
            return r

        return timed

    ops.pooled_attention, sd.block_maps = (wrap(f) for f in originals)
    try:
        yield
    finally:
        ops.pooled_attention, sd.block_maps = originals


@torch.no_grad()
def target_agreement(model, S: int, cfg: BenchConfig, device) -> dict:
    """The "kernel" target against the "exact" one on one random window of S tokens.

    Returns the largest |difference| of the row-normalized targets over all layers, and the mean
    KL(exact || kernel) over the rows the loss uses (first quarter of query blocks left out).
    """
    from seerlib.metrics import kl_div, normalize_rows
    from seerlib.targets import capture_features

    ids = torch.randint(0, model.config.vocab_size, (1, S), generator=torch.Generator())
    ids = ids.to(device)
    exact = capture_features(model, ids, cfg.block_size, "exact")
    kernel = capture_features(model, ids, cfg.block_size, "kernel")
    worst, kls = 0.0, []
    for key in exact:
        if key.endswith(".pooled"):
            e, k = normalize_rows(exact[key]), normalize_rows(kernel[key])
            worst = max(worst, float((e - k).abs().max()))
            skip = e.shape[-2] // 4
            # kernel zeros where exact is positive would make the KL infinite: floor them
            kls.append(float(kl_div(e, torch.log(k.clamp_min(1e-30)), skip_rows=skip)))
    c = model.config
    probe = torch.empty(
        1,
        c.num_attention_heads,
        1,
        c.head_dim,
        dtype=target_dtype("kernel", device, next(model.parameters()).dtype),
        device=device,
    )
    return {
        "seq_len": S,
        "kernel_backend": "triton"
        if ops._use_kernels(probe, None, cfg.block_size)
        else "reference",
        "max_abs_diff": worst,
        "mean_kl": sum(kls) / len(kls),
    }


def peak_mem_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process peak


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def reduce_max(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure(model, S: int, cfg: BenchConfig, target: str, device, work: Path) -> dict:
    """One sequence length: warm-up step, then `cfg.steps` measured steps of the CLI's path.

    Uses torch.distributed when initialized (each rank builds its share of the windows and trains
    its share of every global batch under DDP), else this process alone does the whole batch.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    G = max(world, cfg.tokens_per_step // S)
    G -= G % world
    n = G * cfg.steps
    vocab = model.config.vocab_size
    windows = torch.randint(0, vocab, (n + world, S), generator=torch.Generator().manual_seed(S))
    b = cfg.block_size
    folder, warm = work / f"s{S}", work / f"s{S}-warm"
    if rank == 0:
        for f in (folder, warm):
            shutil.rmtree(f, ignore_errors=True)
    barrier(device)

    def train(cache_folder, n_windows, steps, batch):
        torch.manual_seed(cfg.seed)
        gates = GateSet.from_config(model.config, block_size=b)
        dcfg = DistillConfig(
            block_size=b, steps=steps, batch_size=batch, lr=cfg.lr, warmup=1, seed=cfg.seed
        )
        d = Distiller(gates, WindowCache(cache_folder, n_windows), dcfg, device=device)
        losses = [m["loss"] for m in d.steps()]
        return gates, losses

    # warm-up: kernel compilation, cuBLAS/NCCL set-up, allocator growth
    build_cache(model, windows[n:], warm, b, indices=[rank], log=None, target=target)
    barrier(device)
    train(warm, world, 1, world)
    barrier(device)

    reset_peak(device)
    target_times: list[float] = []
    t0 = time.perf_counter()
    with timed_target(device, target_times):
        build_cache(
            model, windows[:n], folder, b, indices=range(rank, n, world), log=None, target=target
        )
    barrier(device)
    t_cache = time.perf_counter() - t0
    mem_cache = peak_mem_gb(device)
    reset_peak(device)
    t0 = time.perf_counter()
    gates, losses = train(folder, n, cfg.steps, G)
    barrier(device)
    t_train = time.perf_counter() - t0
    mem_train = peak_mem_gb(device)
    t_target = reduce_max(sum(target_times), device)
    t_cache, t_train = reduce_max(t_cache, device), reduce_max(t_train, device)
    mem_cache, mem_train = reduce_max(mem_cache, device), reduce_max(mem_train, device)
    barrier(device)
    if rank == 0:
        for f in (folder, warm):
            shutil.rmtree(f, ignore_errors=True)
    tokens = n * S
    return {
        "seq_len": S,
        "world": world,
        "global_batch": G,
        "steps": cfg.steps,
        "windows": n,
        "tokens": tokens,
        "cache_s": t_cache,
        "train_s": t_train,
        "tok_s": tokens / (t_cache + t_train),
        "cache_tok_s": tokens / t_cache,
        "train_tok_s": tokens / t_train,
        "ms_per_window_per_rank": 1e3 * (t_cache + t_train) / (n / world),
        "target_s": t_target,
        "target_calls_per_rank": len(target_times),
        "target_share": t_target / (t_cache + t_train),
        "peak_mem_gb_cache": mem_cache,
        "peak_mem_gb_train": mem_train,
        "losses": losses,
        "_gates": {k: v.detach().float().cpu() for k, v in gates.state_dict().items()},
    }


def gate_diff(a: dict, b: dict) -> tuple[float, bool]:
    """Largest |a - b| over all gate tensors, and whether they match at rtol 1e-4, atol 1e-6."""
    worst, ok = 0.0, True
    for k in a:
        worst = max(worst, float((a[k] - b[k]).abs().max()))
        ok &= torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
    return worst, ok


def command_line(world: int) -> str:
    args = shlex.join(sys.argv[1:])
    if world > 1:
        return f"torchrun --nproc_per_node {world} bench/bench_distill.py {args}"
    return f"python bench/bench_distill.py {args}"


def markdown(meta: dict, rows: list[dict]) -> str:
    world = meta["world"]
    lines = [
        f"# Gate distillation throughput: {meta['device']} x{world}, {meta['date']}",
        "",
        f"Model: {meta['model']} with **random weights** (throughput does not depend on them), "
        f"{meta['layers']} layers only; block {meta['block_size']}; target `{meta['target']}` "
        f"(`{meta['target_op']}`, {meta['target_dtype']}, {meta['target_backend']}); "
        f"torch {meta['torch']}, "
        f"transformers {meta['transformers']}.",
        "",
        "Path measured: `seerlib.targets.build_cache` (frozen forward "
        + (
            "with `pooled_attention` as the attention"
            if meta["target"] == "kernel"
            else "with SDPA plus `block_maps` for the exact target"
        )
        + ", pooled features + targets written to disk) then `Distiller.steps()` "
        "(cache read, gate forward/backward, KL, AdamW, recall). tokens/s = windows x S / "
        "(cache + train time), each token seen once; `cache` and `train` are the phases alone. "
        "Target share = time inside the target op during the measured run (synchronized around "
        "each call, slowest rank) / measured time. `target op` and `SDPA` ms/layer are the op "
        "and SDPA alone on random inputs of the model's shape (median of 5; minimum on a CPU). "
        "With target `kernel` the target op is also the forward's attention, so the target's "
        "own extra cost is about (target op - SDPA) per layer.",
        "",
    ]
    head = (
        "| S | processes | global batch | steps | tokens/s | cache tokens/s | train tokens/s | "
        "ms/window/rank | peak mem GiB (cache / train) | target op ms/layer | "
        "SDPA ms/layer | target share |"
    )
    if world > 1:
        head += " 1-proc tokens/s | scaling efficiency | gate max abs diff vs 1 proc |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        cells = [
            r["seq_len"],
            r["world"],
            r["global_batch"],
            r["steps"],
            f"{r['tok_s']:,.0f}",
            f"{r['cache_tok_s']:,.0f}",
            f"{r['train_tok_s']:,.0f}",
            f"{r['ms_per_window_per_rank']:.0f}",
            f"{r['peak_mem_gb_cache']:.1f} / {r['peak_mem_gb_train']:.1f}",
            f"{r['target_ms']:.2f}",
            f"{r['sdpa_ms']:.2f}",
            f"{100 * r['target_share']:.0f}%",
        ]
        if world > 1:
            cells += [
                f"{r['baseline_tok_s']:,.0f}",
                f"{100 * r['scaling_efficiency']:.0f}%",
                f"{r['gate_max_abs_diff']:.1e} ({'match' if r['gates_match'] else 'DIFFER'})",
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    agree = meta.get("target_agreement")
    if agree:
        lines += [
            "",
            f"Kernel target (`ops.pooled_attention`, {agree['kernel_backend']} backend here) vs "
            f"exact target on one window of {agree['seq_len']} tokens (all layers, "
            f"row-normalized): max abs diff {agree['max_abs_diff']:.1e}, mean KL(exact || kernel) "
            f"{agree['mean_kl']:.1e} over the loss's rows.",
        ]
    lines += ["", "Command:", "", f"    {meta['command']}", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    return "\n".join(lines)


def parse(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3-8b", choices=list(PRESETS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--target", choices=["kernel", "exact"], default=None)
    p.add_argument("--no-baseline", action="store_true", help="under N > 1: skip the 1-proc run")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--backend", default=None, choices=["nccl", "gloo"])
    p.add_argument("--work-dir", default="/tmp/seerlib-bench-distill")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="")
    p.add_argument("--note", default="", help="a line for the markdown (e.g. where it ran)")
    p.add_argument(
        "--check-target",
        type=int,
        default=0,
        metavar="S",
        help="also compare the kernel target with the exact one on one window of S tokens",
    )
    a = p.parse_args(argv)
    cfg = BenchConfig(
        preset=a.preset,
        layers=a.layers,
        seq_lens=tuple(a.seq_lens),
        tokens_per_step=a.tokens_per_step,
        steps=a.steps,
        block_size=a.block_size,
        target=a.target,
        baseline=not a.no_baseline,
    )
    return cfg, a


def main(argv=None) -> int:
    cfg, a = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local}" if kind == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    target = cfg.target or default_target(device)
    cfg = replace(cfg, target=target)
    work = Path(a.work_dir)
    model = build_model(cfg, device)
    c = model.config
    log(
        f"{device_name(device)} x{world}: {cfg.preset} ({c.num_hidden_layers} layers, random "
        f"weights), target {target}"
    )
    timings = {S: attention_timings(model, S, cfg, target, device) for S in cfg.seq_lens}
    agreement = target_agreement(model, a.check_target, cfg, device) if a.check_target else None
    if agreement:
        log(f"kernel vs exact target: {agreement}")

    baseline = {}
    if world > 1 and cfg.baseline:  # every rank alone on its own device, before the group exists
        for S in cfg.seq_lens:
            baseline[S] = measure(model, S, cfg, target, device, work / f"alone-r{rank}")
            log(f"S={S} 1 proc: {baseline[S]['tok_s']:,.0f} tokens/s")
    if world > 1:
        dist.init_process_group(a.backend or ("nccl" if device.type == "cuda" else "gloo"))
    rows = []
    for S in cfg.seq_lens:
        r = measure(model, S, cfg, target, device, work / "run")
        t = timings[S]
        r.update(t)
        if S in baseline:
            base = baseline[S]
            mean_base = base["tok_s"]
            if dist.is_initialized():
                x = torch.tensor([base["tok_s"]], dtype=torch.float64, device=device)
                dist.all_reduce(x)
                mean_base = float(x) / world
            r["baseline_tok_s"] = mean_base
            r["baseline_rank0"] = {k: v for k, v in base.items() if not k.startswith("_")}
            r["scaling_efficiency"] = r["tok_s"] / (world * mean_base)
            r["gate_max_abs_diff"], r["gates_match"] = gate_diff(base["_gates"], r["_gates"])
        del r["_gates"]
        log(
            f"S={S} x{world}: {r['tok_s']:,.0f} tokens/s (cache {r['cache_tok_s']:,.0f}, train "
            f"{r['train_tok_s']:,.0f}), peak {r['peak_mem_gb_cache']:.1f}/"
            f"{r['peak_mem_gb_train']:.1f} GiB, target share {100 * r['target_share']:.0f}% "
            f"(target {t['target_ms']:.2f} ms/layer, sdpa {t['sdpa_ms']:.2f})"
            + (
                f", efficiency {100 * r['scaling_efficiency']:.0f}%, gate diff "
                f"{r['gate_max_abs_diff']:.1e}"
                if "scaling_efficiency" in r
                else ""
            )
        )
        rows.append(r)

    if rank == 0:
        date = datetime.date.today().isoformat()
        meta = {
            "device": device_name(device),
            "world": world,
            "date": date,
            "model": f"{cfg.preset} shapes (hidden {c.hidden_size}, {c.num_attention_heads} q / "
            f"{c.num_key_value_heads} kv heads, head dim {c.head_dim}, MLP {c.intermediate_size})",
            "layers": c.num_hidden_layers,
            "random_weights": True,
            "block_size": cfg.block_size,
            "target": target,
            "target_dtype": str(target_dtype(target, device, next(model.parameters()).dtype)),
            "target_op": timings[cfg.seq_lens[0]]["target_op"],
            "target_backend": timings[cfg.seq_lens[0]]["target_backend"],
            **versions(("transformers",)),  # torch and transformers
            "config": asdict(cfg),
            "command": command_line(world),
            "env": {
                k: os.environ.get(k)
                for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")
            },
            "note": a.note,
            "target_agreement": agreement,
        }
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"distill-{meta['device']}-{date}{a.tag}"
        write_json(stem.with_suffix(".json"), {"meta": meta, "rows": rows})
        atomic_write_text(stem.with_suffix(".md"), markdown(meta, rows))
        log(f"wrote {stem}.json and .md")
        shutil.rmtree(work, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
