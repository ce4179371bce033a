"""End-to-end prefill benchmark (issue 13, "Prefill that pays"): a model run through
`seerlib.sparsify` as a user would run it.

What is timed: `model(ids, logits_to_keep=1, use_cache=False)` under `torch.no_grad()`, batch 1,
the median of `--reps` calls (CUDA events on a GPU, wall clock on a CPU) after `--warmup` calls.
Models: transformers' `LlamaForCausalLM` built straight on the device with RANDOM weights (speed
does not depend on them) in SmolLM2-135M's real shapes or Llama-3-8B's layer shapes with few
layers (`--layers`); the gate is an UNTRAINED `GateSet.from_config` (its choices are arbitrary;
timing only).

Rows (`--providers`), all at the same shape and length in one process:
- dense: `sdpa` (the model's own SDPA, backend left to torch), `sdpa_flash` and `sdpa_cudnn`
  (the same under `sdpa_kernel(FLASH_ATTENTION / CUDNN_ATTENTION)`), `flex` (transformers'
  "flex_attention" implementation, dense causal, compiled); the GPU backends are CUDA-only.
- sparse, through `sparsify`: any label or preset at a density: `gate@0.5`, `gate@0.1`,
  `gate@0.05`, `recommended@0.1` (the preset at density 0.1), `sink_window@0.1`.
- `ideal@0.1`: attention through `seerlib.ops.block_sparse_attention` on a block index built once
  before timing (top-k-shaped random mask, the diagonal kept): no gate, no selection, no index
  build in the timed calls: the floor the sparse path could reach.
- `step@0.1` (CUDA only): one attention layer's sparse step (gate, top-k selection, sync-free
  index, kernel) on random inputs of the model's shape, eager and captured in a CUDA graph, with
  the kernel alone on the same index: the gate + selection + index share of the kernel's time.
- `graph:<label>` (CUDA only): the same sparse row with `sparsify(..., cuda_graphs=True)`: each
  layer's selection and sparse attention replayed as a CUDA graph (`seerlib.graphs`).
- `whole:<label>`, `whole:sdpa_cudnn` (CUDA only): the whole forward captured once as one CUDA
  graph (`seerlib.prefill_graph.PrefillGraph`) and replayed, sparse through `sparsify` or dense
  under that SDPA backend; the capture is untimed, the replay's logits are checked against an
  eager call (`graph_vs_eager_max_abs_diff`). No breakdown (a replay runs no Python).
  `whole+compile:<label>`: so, with `compile_selection=True` (a gate layer's pooling and logits
  compiled, its top-k and index one launch).
- `compile:<label>`, `graph+compile:<label>`: with `compile_selection=True` (the gate and the
  selection through torch.compile, compiled in the warm-up); `cstep@0.1`: the layer step so.
- `pstep@0.1`, `pcstep@0.1` (CUDA only): the layer step as `graph:gate` runs it
  (`seerlib.integrate.graphed_gate_step`: pooling into the graph's inputs, the graph of logits,
  selection and index replayed, the kernel outside it), eager or compiled selection.
  Compiled rows get no breakdown (its timers would break the compiled graph).
- `--profile`: one more call of each sparse and ideal row under torch.profiler: the call's wall
  time, the device's busy time (kernel self times summed) and the top operations by device time.
Each row also gets a breakdown from a separate instrumented call (synchronized timers wrapped
around the functions in `PATCH_TARGETS`; exclusive times, so the kernel's share leaves out the
index build it calls): gate, selection, index build, kernel, rest = that call's total - the parts.
A check per run: at the smallest length, the sparse path at density 1 (`gate@1`) against the dense
logits of the last position (max abs diff).

Usage (repo root; one device call must stay under 10 minutes, so split lengths and merge):
    python bench/bench_prefill.py --shapes smollm2 --seq-lens 8192 32768 --out $OUT --tag _a
    python bench/bench_prefill.py --shapes llama3-8b --layers 8 --seq-lens 32768 --tag _c ...
    python bench/bench_prefill.py --merge a.json b.json --out bench/results
    python bench/bench_prefill.py --device cpu --preset tiny --seq-lens 256       # CPU smoke
Writes <out>/prefill-<gpu>-<date><tag>.json (a list of records) and .md, after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seerlib import ops
from seerlib.capture import attention_override
from seerlib.gate import GateSet
from seerlib.graphs import StepGraphs, capture
from seerlib.integrate import graphed_gate_step, sparsify
from seerlib.methods import (
    LayerInputs,
    SparseConfig,
    compiled_layer_block_mask,
    layer_block_mask,
    parse_config,
    preset,
)
from seerlib.prefill_graph import PrefillGraph
from seerlib.reference import num_blocks
from seerlib.select import Selection, achieved_density, density_to_k

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _results beside it
from _results import (  # noqa: E402
    ResultFiles,
    Results,
    Skip,
    free,
    merge,
    resolve_device,
    row_runner,
    run_meta,
    stop_when_out_of_time,
)

# What the breakdown times: (part, module, attribute path), looked up where the sparse path looks
# them up. A target that does not resolve makes its part "n/a" (listed in the record), not a crash.
PATCH_TARGETS = (
    ("gate", "seerlib.ops", "pool_blocks"),  # the gate's block pooling (the kernel on CUDA)
    ("gate", "seerlib.ops", "gate_logits"),  # its projection, RoPE and logits (one launch)
    ("gate", "seerlib.gate", "AttnGate.block_scores"),  # the same, the gate's torch ops
    ("selection", "seerlib.methods", "select_blocks"),  # the gate / oracle methods' selection
    ("selection", "seerlib.ops", "select_index"),  # top-k and index in one launch (kernel path)
    ("selection", "seerlib.patterns", "sink_window"),  # sink_window's mask, via methods.patterns
    ("index", "seerlib.kernels.block_sparse_attention", "build_block_index"),
    ("kernel", "seerlib.kernels.block_sparse_attention", "block_sparse_attention"),  # ops, CUDA
    ("kernel", "seerlib.reference", "block_sparse_attention"),  # ops' reference path (CPU)
)
PARTS = ("gate", "selection", "index", "kernel")

SHAPES = {
    # SmolLM2-135M's real config
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    # Llama-3-8B's layer shapes; layers from --layers; vocab cut to 32000 (logits_to_keep=1)
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32000, rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "tiny": None,  # seerlib.distill.tiny_config(): 2 layers, 4 / 2 heads, d 16 (CPU smoke)
}
CUT_LAYERS = ("llama3-8b",)  # shapes whose layer count --layers sets
DENSE = ("sdpa", "sdpa_flash", "sdpa_cudnn", "flex")
CUDA_ONLY = {
    "sdpa_flash": "SDPA's flash backend runs on CUDA only",
    "sdpa_cudnn": "SDPA's cuDNN backend runs on CUDA only",
    "flex": "measured on CUDA only (compiled FlexAttention on a CPU is not this benchmark's case)",
}
DEFAULT_PROVIDERS = (
    "sdpa", "sdpa_flash", "sdpa_cudnn", "gate@0.5", "gate@0.1", "gate@0.05", "recommended@0.1",
    "sink_window@0.1", "ideal@0.1", "step@0.1", "cstep@0.1", "pstep@0.1", "pcstep@0.1",
    "graph:gate@0.1", "graph:gate@0.05",
    "graph:recommended@0.1", "graph+compile:gate@0.1", "graph+compile:gate@0.05",
    "graph+compile:recommended@0.1", "flex",
)
RATIO_REFS = ("sdpa_flash", "sdpa_cudnn", "sdpa")  # speed-up columns vs_<ref>
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NOTE = ("random weights (speed does not depend on them); the gate is untrained "
        "(GateSet.from_config), so its selections are arbitrary: timing only")


@dataclass(frozen=True)
class BenchConfig:
    shapes: tuple[str, ...] = ("smollm2", "llama3-8b")
    seq_lens: tuple[int, ...] = (8192, 32768, 131072)
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    layers: int = 4
    block_size: int = 64
    reps: int = 3
    warmup: int = 1
    device: str = "cuda"
    dtype: str = "bf16"
    gate_dtype: str | None = None  # default: the model's dtype
    check: bool = True
    breakdown: bool = True
    profile: bool = False  # one extra call of each sparse / ideal row under torch.profiler
    budget_s: float = 0.0  # stop starting rows after this many seconds (0: no limit)
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# model, inputs, timing


def parse_shape(spec: str, layers: int) -> tuple[str, int | None]:
    """"smollm2" -> ("smollm2", None: its own count); "llama3-8b" -> (.., layers); "name:L"."""
    name, _, n = spec.partition(":")
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; expected one of {tuple(SHAPES)} "
                         "(or name:layers)")
    if n:
        return name, int(n)
    return name, layers if name in CUT_LAYERS else None


def build_model(name: str, layers: int | None, cfg: BenchConfig, max_len: int):
    """A random LlamaForCausalLM of shape `name`, built on the device in cfg.dtype, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: seconds to import

    more = {"num_hidden_layers": layers} if layers else {}
    if name == "tiny":
        from seerlib.distill import tiny_config  # lazy, as transformers

        mcfg = tiny_config(max_position_embeddings=max(4096, max_len), **more)
    else:
        mcfg = LlamaConfig(**{**SHAPES[name], **more},
                           max_position_embeddings=max(131072, max_len))
    mcfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[cfg.dtype])  # no float32 copy of the weights on the way
    try:
        with torch.device(cfg.device):
            model = LlamaForCausalLM(mcfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(DTYPES[cfg.dtype]).eval().requires_grad_(False)


def describe(model) -> str:
    c = model.config
    return (f"hidden {c.hidden_size}, MLP {c.intermediate_size}, "
            f"{c.num_attention_heads} q / {c.num_key_value_heads} kv heads, head dim {c.head_dim}, "
            f"vocab {c.vocab_size}")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fwd, device: torch.device, reps: int, warmup: int) -> dict:
    """Median ms of `fwd()` over `reps` calls after `warmup` calls, and the peak memory."""
    for _ in range(warmup):
        fwd()
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fwd()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fwd()
            samples.append((time.perf_counter() - t0) * 1e3)
    out = {"ms": statistics.median(samples), "ms_samples": samples}
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["base_mem_gb"] = base / 2**30
    return out


# ---------------------------------------------------------------------------------------------
# the breakdown


class PartTimer:
    """Exclusive synchronized time per part: a timed call inside another (the index build inside
    the kernel wrapper) is subtracted from the outer one."""

    def __init__(self, device):
        self.device = device
        self.ms = {p: 0.0 for p in PARTS}
        self.calls = {p: 0 for p in PARTS}
        self.missing: dict[str, list[str]] = {}
        self.present: set[str] = set()  # parts with at least one target patched
        self._stack: list[float] = []  # time of timed calls nested in each open call

    def wrap(self, part, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                total = (time.perf_counter() - t0) * 1e3
                inner = self._stack.pop()
                self.ms[part] += total - inner
                self.calls[part] += 1
                if self._stack:
                    self._stack[-1] += total

        return timed


@contextlib.contextmanager
def instrumented(device):
    """Wrap every PATCH_TARGETS function with a PartTimer's timer; restored on exit."""
    timer, patched = PartTimer(device), []
    for part, module, attr in PATCH_TARGETS:
        try:
            owner = importlib.import_module(module)  # the module itself, not a re-export
            *path, name = attr.split(".")
            for p in path:
                owner = getattr(owner, p)
            original = getattr(owner, name)
        except (ImportError, AttributeError) as e:
            timer.missing.setdefault(part, []).append(f"{module}.{attr} ({type(e).__name__})")
            continue
        owned = name in vars(owner)
        setattr(owner, name, timer.wrap(part, original))
        timer.present.add(part)
        patched.append((owner, name, original, owned))
    try:
        yield timer
    finally:
        for owner, name, original, owned in reversed(patched):
            if owned:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def profiled(fwd, device, top: int = 25) -> dict:
    """One call under torch.profiler: wall ms, the device's busy ms (the kernels' self time
    summed) and the `top` operations by device time (name, calls, device ms, host ms)."""
    # lazy: the profiler is loaded only for --profile
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        sync(device)
        t0 = time.perf_counter()
        fwd()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3
    rows = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {"wall_ms": wall, "device_busy_ms": busy,
            "top": [{"name": e.key[:90], "calls": e.count,
                     "device_ms": e.self_device_time_total / 1e3,
                     "host_ms": e.self_cpu_time_total / 1e3} for e in rows]}


def breakdown(fwd, device) -> dict:
    """One instrumented call: ms per part (n/a when none of its targets exists), rest, calls."""
    with instrumented(device) as timer:
        sync(device)
        t0 = time.perf_counter()
        fwd()
        sync(device)
        total = (time.perf_counter() - t0) * 1e3
    out = {"total_ms": total}
    for p in PARTS:
        out[f"{p}_ms"] = timer.ms[p] if p in timer.present else "n/a"
    out["rest_ms"] = total - sum(timer.ms[p] for p in PARTS if p in timer.present)
    out["calls"] = timer.calls
    if timer.missing:
        out["missing_targets"] = timer.missing
    return out


# ---------------------------------------------------------------------------------------------
# rows


@dataclass
class Run:
    """What every row of one (shape, length) shares."""

    cfg: BenchConfig
    device: torch.device
    model: torch.nn.Module
    gates: GateSet
    ids: torch.Tensor

    @torch.no_grad()
    def forward(self):
        return self.model(input_ids=self.ids, logits_to_keep=1, use_cache=False)

    def measure(self, warmup=None) -> dict:
        w = self.cfg.warmup if warmup is None else warmup
        return measure(self.forward, self.device, self.cfg.reps, w)


def sparse_config(provider: str, block_size: int) -> SparseConfig:
    """"recommended@0.1" -> the preset at density 0.1; any other label through parse_config."""
    head, _, density = provider.partition("@")
    try:
        cfg = preset(head, block_size=block_size)
    except ValueError:
        return parse_config(provider, block_size=block_size)
    return cfg.at(density=float(density)) if density else cfg


def _backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "sdpa":
        return contextlib.nullcontext()
    return sdpa_kernel({"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name])


def _repeated_kv_sdpa(module, query, key, value, attention_mask, *, default, **kwargs):
    """SDPA with K/V repeated to the query heads (for a backend that refuses enable_gqa)."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)  # (B, Hkv, S, d) -> Hq
    out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=kwargs.get("scaling"))
    return out.transpose(1, 2).contiguous(), None  # (B, S, Hq, d)


def dense_row(run: Run, provider: str) -> dict:
    modes, provider = split_modes(provider)
    if provider in CUDA_ONLY and run.device.type != "cuda":
        raise Skip(CUDA_ONLY[provider])
    if "whole" in modes:
        if run.device.type != "cuda" or provider == "flex":
            raise Skip("one graph of the whole forward: SDPA rows on CUDA only")
        with _backend(provider):
            return {**whole_graph(run), "path": "PrefillGraph"}
    if provider == "flex":
        model = run.model
        previous = model.config._attn_implementation
        model.set_attn_implementation("flex_attention")
        try:
            return {**run.measure(), "attention": "transformers flex_attention (compiled)"}
        finally:
            model.set_attn_implementation(previous)
    with _backend(provider):
        try:
            run.forward()  # the first warm-up call, and the probe of enable_gqa
            return {**run.measure(max(0, run.cfg.warmup - 1)), "gqa": "enable_gqa"}
        except RuntimeError as e:
            if isinstance(e, torch.OutOfMemoryError) or provider == "sdpa":
                raise
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"    {provider}: enable_gqa failed ({why}); repeating K/V", flush=True)
        with attention_override(run.model, _repeated_kv_sdpa):
            return {**run.measure(), "gqa": f"repeated_kv (enable_gqa failed: {why})"}


# "graph+compile:gate@0.1": cuda_graphs and compile_selection; "whole:gate@0.1" or
# "whole:sdpa_cudnn": the whole forward captured as one CUDA graph (PrefillGraph) and replayed
MODES = ("graph", "compile", "whole")


def split_modes(provider: str) -> tuple[set[str], str]:
    """"graph+compile:gate@0.1" -> ({"graph", "compile"}, "gate@0.1")."""
    head, sep, label = provider.partition(":")
    if not sep:
        return set(), provider
    modes = set(head.split("+"))
    if not modes <= set(MODES):
        raise ValueError(f"unknown mode in {provider!r}; modes: {MODES}")
    if "whole" in modes and "graph" in modes:
        raise ValueError(f"{provider!r}: 'whole' (one graph of the forward) takes no per-layer "
                         "graphs; 'whole+compile' compiles the gate's logits inside it")
    return modes, label


def whole_graph(run: Run) -> dict:
    """The forward captured once as one CUDA graph (`seerlib.prefill_graph.PrefillGraph`, its
    warm-up and capture untimed) and timed as replays; its logits checked against an eager call."""
    t0 = time.perf_counter()
    graph = PrefillGraph(run.model, run.ids, warmup=max(run.cfg.warmup, 2), logits_to_keep=1)
    capture_s = time.perf_counter() - t0
    eager = run.forward().logits.float()
    out = measure(lambda: graph(run.ids), run.device, run.cfg.reps, 1)
    out["graph_vs_eager_max_abs_diff"] = float((graph(run.ids).float() - eager).abs().max())
    out["capture_s"] = capture_s
    if run.cfg.profile:
        out["profile"] = profiled(lambda: graph(run.ids), run.device)
    graph = None  # the graph's memory pool goes back before the next row
    free(run.device)
    return out


def sparse_row(run: Run, provider: str) -> dict:
    modes, label = split_modes(provider)
    if modes & {"graph", "whole"} and run.device.type != "cuda":
        raise Skip("CUDA graphs (graph:..., whole:...) run on CUDA only")
    scfg = sparse_config(label, run.cfg.block_size)
    gates = run.gates if scfg.spec.needs_gate else None
    with sparsify(run.model, scfg, gates=gates, block_size=run.cfg.block_size,
                  cuda_graphs="graph" in modes, compile_selection="compile" in modes) as sp:
        if "whole" in modes:
            out = {**whole_graph(run), "path": "PrefillGraph",
                   "achieved_density": sp.stats.achieved_density, "stats": sp.stats.as_dict()}
            return {**out, "config": scfg.label,
                    "gate": "untrained" if gates is not None else None}
        # a compiled selection compiles in its first call: warm up at least twice
        out = run.measure(max(run.cfg.warmup, 2) if "compile" in modes else None)
        if run.cfg.breakdown and "compile" not in modes:  # the timers would break the graph
            out["breakdown"] = breakdown(run.forward, run.device)
        if run.cfg.profile:
            out["profile"] = profiled(run.forward, run.device)
        out["achieved_density"] = sp.stats.achieved_density
        out["stats"] = sp.stats.as_dict()
    return {**out, "config": scfg.label, "gate": "untrained" if gates is not None else None}


def topk_mask(B, H, nb, density, device, seed=0) -> torch.Tensor:
    """(B, H, nb, nb) bool: the diagonal plus random earlier blocks, as many per row as top-k at
    `density` keeps (`seerlib.select.density_to_k`, at most the row's i + 1)."""
    k = density_to_k(density, nb)
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(B, H, nb, nb, device=device, generator=g)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    scores = scores.masked_fill(~causal, -1.0) + 2.0 * torch.eye(nb, device=device)
    top = scores.topk(min(k, nb), dim=-1).indices  # (B, H, nb, k)
    mask = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=device).scatter_(-1, top, True)
    return mask & causal


def ideal_row(run: Run, provider: str) -> dict:
    _, _, arg = provider.partition("@")
    density = float(arg or 0.1)
    c, b, S = run.model.config, run.cfg.block_size, run.ids.shape[1]
    nb = num_blocks(S, b)
    mask = topk_mask(1, c.num_attention_heads, nb, density, run.device, seed=S)
    extra = {}
    if run.device.type == "cuda" and run.ids.device.type == "cuda" and run.cfg.dtype != "fp32":
        # the kernel path: a BlockIndex built once (lazy import: triton, CUDA runs only)
        from seerlib.kernels.block_index import build_block_index

        build_block_index(mask, 1, c.num_attention_heads, S, b)
        sync(run.device)
        t0 = time.perf_counter()
        index = build_block_index(mask, 1, c.num_attention_heads, S, b)
        sync(run.device)
        extra = {"index": "BlockIndex, built once", "index_build_ms": (time.perf_counter() - t0)
                 * 1e3, "rows_per_tile": index.rows_per_tile}
    else:
        index, extra = mask, {"index": "bool mask (ops' reference path takes no BlockIndex)"}

    def attend(module, query, key, value, attention_mask, *, default, **kwargs):
        B, Hq, S, d = query.shape
        out = None
        if query.is_cuda:  # the kernel writes (B, S, Hq, d) itself, as the sparse path's does
            out = torch.empty(B, S, Hq, d, dtype=query.dtype, device=query.device).transpose(1, 2)
        out = ops.block_sparse_attention(query, key, value, index, b, scale=kwargs.get("scaling"),
                                         out=out)
        return out.transpose(1, 2).contiguous(), None  # (B, Hq, S, d) -> (B, S, Hq, d)

    with attention_override(run.model, attend):
        out = run.measure()
        if run.cfg.breakdown:
            out["breakdown"] = breakdown(run.forward, run.device)
        if run.cfg.profile:
            out["profile"] = profiled(run.forward, run.device)
    return {**out, **extra, "achieved_density": achieved_density(mask)}


def step_row(run: Run, provider: str) -> dict:
    """One attention layer's sparse step (gate -> selection -> index -> kernel, `sync_free`) on
    random pre/post-RoPE inputs of the model's shape: eager, then captured in a CUDA graph and
    replayed, and the kernel alone on the same selection's index built once. "cstep@D": the
    gate and selection through torch.compile (`compiled_layer_block_mask`)."""
    if run.device.type != "cuda":
        raise Skip("the layer step is timed on CUDA (CUDA graphs)")
    _, _, arg = provider.partition("@")
    c, b, S, dev = run.model.config, run.cfg.block_size, run.ids.shape[1], run.device
    Hq, Hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    dt = DTYPES[run.cfg.dtype]
    g = torch.Generator(device=dev).manual_seed(S)
    q, q_pre = (torch.randn(1, Hq, S, d, device=dev, dtype=dt, generator=g) for _ in range(2))
    k, v, k_pre = (torch.randn(1, Hkv, S, d, device=dev, dtype=dt, generator=g)
                   for _ in range(3))
    scfg = SparseConfig("gate", Selection(density=float(arg or 0.1)), block_size=b)
    layer = LayerInputs(q, k, v, b, scale=d ** -0.5, gate=run.gates[0], q_pre=q_pre, k_pre=k_pre)

    head = provider.split("@")[0]
    block_mask = compiled_layer_block_mask() if head == "cstep" else layer_block_mask

    def step():
        mask = block_mask(scfg, layer)
        return ops.block_sparse_attention(q, k, v, mask, b, scale=d ** -0.5, sync_free=True)

    reps, warm = max(run.cfg.reps, 10), max(run.cfg.warmup, 3)
    if head in ("pstep", "pcstep"):
        return pooled_step(run, head, step, layer, scfg, reps, warm)
    eager = measure(step, dev, reps, warm)
    graph, captured = capture(step, dev, warmup=3)
    replay = measure(graph.replay, dev, reps, warm)
    mask, kernel = kernel_alone(layer, scfg, dev, reps, warm)
    graph.replay()
    diff = float((captured.float() - step().float()).abs().max())
    return {"ms": replay["ms"], "eager_ms": eager["ms"], "graph_ms": replay["ms"],
            "kernel_ms": kernel["ms"],
            "overhead_share": (eager["ms"] - kernel["ms"]) / kernel["ms"],
            "graph_overhead_share": (replay["ms"] - kernel["ms"]) / kernel["ms"],
            "graph_vs_eager_max_abs_diff": diff,
            "achieved_density": achieved_density(mask),
            "peak_mem_gb": eager.get("peak_mem_gb")}


def kernel_alone(layer: LayerInputs, scfg: SparseConfig, dev, reps, warm):
    """(the layer's mask, the timing of the kernel alone on its index, built once beforehand)."""
    from seerlib.kernels.block_index import build_block_index  # lazy: triton, CUDA runs only

    B, Hq, S, _ = layer.q.shape
    b = scfg.block_size
    mask = layer_block_mask(scfg, layer)
    index = build_block_index(mask, B, Hq, S, b, 1, sync_free=True)
    kernel = measure(lambda: ops.block_sparse_attention(layer.q, layer.k, layer.v, index, b,
                                                        scale=layer.scale), dev, reps, warm)
    return mask, kernel


def pooled_step(run: Run, head: str, step, layer: LayerInputs, scfg: SparseConfig, reps,
                warm) -> dict:
    """The sparse path's own graphed gate step (`seerlib.integrate.graphed_gate_step`: pooling
    into the graph's statics, the graph of logits + selection + index replayed, the kernel on
    the layer's q, k, v); "pcstep": its selection compiled. Beside the kernel alone, on the same
    selection's index, and checked against the eager `step`."""
    dev = run.device

    def graphed(keep_mask: bool):
        graphs = StepGraphs()
        return lambda: graphed_gate_step(graphs, 0, layer.gate, scfg.selection, layer.q,
                                         layer.k, layer.v, layer.q_pre, layer.k_pre,
                                         scfg.block_size, scale=layer.scale,
                                         compiled=head == "pcstep", keep_mask=keep_mask)[0]

    pstep = graphed(False)  # top-k per row: the selection and index in one launch
    timed = measure(pstep, dev, reps, warm)  # the first call captures (warm-up included)
    # keep_mask: the (nb, nb) mask path (select_blocks, then the index builder), as before
    # ops.select_index, timed in the same run
    masked = graphed(True)
    unfused = measure(masked, dev, reps, warm)
    mask, kernel = kernel_alone(layer, scfg, dev, reps, warm)
    diff = float((pstep().transpose(1, 2).float() - step().float()).abs().max())
    diff_masked = float((masked().float() - pstep().float()).abs().max())
    return {"ms": timed["ms"], "graph_ms": timed["ms"], "kernel_ms": kernel["ms"],
            "graph_overhead_share": (timed["ms"] - kernel["ms"]) / kernel["ms"],
            "select_index_fused": ops.select_index_fused(scfg.selection),
            "mask_path_graph_ms": unfused["ms"], "mask_path_vs_fused_max_abs_diff": diff_masked,
            "graph_vs_eager_max_abs_diff": diff, "path": "graphed_gate_step",
            "achieved_density": achieved_density(mask), "peak_mem_gb": timed.get("peak_mem_gb")}


def check_row(run: Run) -> dict:
    """gate@1 (the whole sparse path, every block kept) against the dense logits, last position."""
    dense = run.forward().logits[:, -1].float()
    scfg = SparseConfig("gate", Selection(density=1.0), block_size=run.cfg.block_size)
    with sparsify(run.model, scfg, gates=run.gates, block_size=run.cfg.block_size) as sp:
        got = run.forward().logits[:, -1].float()
        density = sp.stats.achieved_density
    diff, scale = float((got - dense).abs().max()), float(dense.abs().max())
    extra = {}
    if run.device.type == "cuda":  # the CUDA-graph path: the same logits as the eager one
        with sparsify(run.model, scfg, gates=run.gates, block_size=run.cfg.block_size,
                      cuda_graphs=True):
            run.forward()  # captures
            graphed = run.forward().logits[:, -1].float()
        extra = {"graph_max_abs_diff": float((graphed - dense).abs().max()),
                 "graph_vs_eager_max_abs_diff": float((graphed - got).abs().max())}
    # fp32: the paths agree to rounding; bf16/fp16: a loose sanity bound relative to the logits
    fp32 = run.cfg.dtype == "fp32"
    limit = 1e-3 if fp32 else 5e-2 * max(scale, 1e-6)
    return {"max_abs_diff": diff, "ref_max_abs": scale, "limit": limit, "ok": diff <= limit,
            "argmax_match": bool((got.argmax(-1) == dense.argmax(-1)).all()),
            "achieved_density": density, "against": "sdpa (the model's own attention)", **extra}


def row_kind(provider: str) -> str:
    if provider in DENSE or provider.partition(":")[2] in DENSE:
        return "dense"
    head = provider.split("@")[0]
    return {"ideal": "ideal", "step": "step", "cstep": "step", "pstep": "step",
            "pcstep": "step"}.get(head, "sparse")


def row_order(providers) -> list[str]:
    """Dense SDPA rows first (the ratios need them), then sparse and ideal, flex last (it
    compiles for a minute per length: a run cut short loses it first)."""
    rank = {"dense": 0, "sparse": 1, "ideal": 1, "step": 1}
    return sorted(providers, key=lambda p: (2 if p == "flex" else rank[row_kind(p)]))


# ---------------------------------------------------------------------------------------------
# records and tables


def add_ratios(records: list[dict]) -> None:
    """vs_<ref> = ref ms / row ms for the dense refs of the same run, shape and length."""
    refs = {}
    for r in records:
        if r.get("kind") == "row" and r["status"] == "ok" and r["provider"] in RATIO_REFS:
            refs[(r["run_id"], r["shape"], r["layers"], r["seq_len"], r["provider"])] = r["ms"]
    for r in records:
        if r.get("kind") != "row" or r["status"] != "ok" or row_kind(r["provider"]) == "step":
            continue  # a layer step is one layer, not the model: no model-level ratio
        for p in RATIO_REFS:
            ms = refs.get((r["run_id"], r["shape"], r["layers"], r["seq_len"], p))
            if ms is not None:
                r[f"vs_{p}"] = ms / r["ms"]


def fmt_ms(ms) -> str:
    if ms is None:
        return "-"
    if not isinstance(ms, (int, float)):
        return str(ms)
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _latest(records, kind="row"):
    """{(shape, layers, seq_len, provider): record}, a later record replacing an earlier one."""
    return {(r["shape"], r["layers"], r["seq_len"], r["provider"]): r
            for r in records if r.get("kind") == kind}


def markdown(records: list[dict]) -> str:
    rows = _latest(records)
    first = records[0] if records else {}
    vals = lambda key: ", ".join(sorted({str(r.get(key)) for r in records}))  # noqa: E731
    clock = "CUDA events" if first.get("device") == "cuda" else "wall clock"
    lines = [
        f"# Prefill benchmark: {vals('gpu')}, {vals('date')}",
        "",
        f"`model(ids, logits_to_keep=1, use_cache=False)` under `torch.no_grad()`, batch 1, "
        f"{first.get('dtype', '')} (gates {first.get('gate_dtype', '')}); median of "
        f"{vals('reps')} calls after {vals('warmup')} warm-up ({clock}). "
        f"Models: {NOTE}. Sparse rows run through `seerlib.sparsify` (block "
        f"{vals('block_size')}); `ideal@D` is the sparse kernel on a block index built once "
        "(no gate, selection or index build in the timed call). "
        f"torch {vals('torch')}, triton {vals('triton')}, transformers {vals('transformers')}.",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in sorted({r["command"] for r in records})),
        "",
    ]
    shapes = list(dict.fromkeys((s, n) for s, n, _, _ in rows))
    for shape, layers in shapes:
        mine = {k: r for k, r in rows.items() if k[:2] == (shape, layers)}
        lens = sorted({k[2] for k in mine})
        provs = [p for p in dict.fromkeys(k[3] for k in mine) if row_kind(p) != "step"]
        ok = [r for r in mine.values() if r["status"] == "ok"]
        ref = next((p for p in ("sdpa_cudnn", "sdpa_flash", "sdpa")
                    if any(f"vs_{p}" in r for r in ok)), None)
        words = {"sdpa_cudnn": "cuDNN", "sdpa_flash": "flash", "sdpa": "sdpa"}
        model = next(iter(mine.values())).get("model", "")
        lines += [
            f"## {shape}, {layers} layers ({model})",
            "",
            "Cells: median ms" + (f" (speed-up vs {words[ref]}: {ref} ms / row ms)" if ref else ""),
            "",
            "| provider | " + " | ".join(str(S) for S in lens) + " |",
            "|---|" + "---|" * len(lens),
        ]
        notes = []
        for p in provs:
            cells = []
            for S in lens:
                r = mine.get((shape, layers, S, p))
                if r is None:
                    cells.append("-")
                elif r["status"] == "ok":
                    x = f" ({r[f'vs_{ref}']:.2f}× vs {words[ref]})" if f"vs_{ref}" in r else ""
                    cells.append(f"{fmt_ms(r['ms'])}{x}")
                else:
                    cells.append(r["status"])
                    why = r.get("reason") or r.get("error")
                    notes.append(f"- {p} at {S}: {r['status']}: {why}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += ["", *notes, ""] if notes else [""]
    lines += [
        "## Breakdown (a separate instrumented call, synchronized around each part)",
        "",
        "Parts are exclusive ms of that call (kernel without the index build it runs); rest = "
        "the call's total - the parts (model, hooks, stats); `-`: not called; `n/a`: the patch "
        "target is missing. Speed-ups use the timed median.",
        "",
        "| shape | layers | S | provider | median ms | density | gate | selection | index | kernel "
        "| rest | instrumented total | peak GiB | vs flash | vs cuDNN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, layers, S, p), r in sorted(rows.items(), key=lambda kv: kv[0][:3]):
        if r["status"] != "ok" or row_kind(p) in ("dense", "step") or p.startswith("whole:"):
            continue
        bd = r.get("breakdown", {})
        part = lambda n, bd=bd: (  # noqa: E731
            "-" if bd.get("calls", {}).get(n) == 0 else fmt_ms(bd.get(f"{n}_ms", "-")))
        vs = lambda k, r=r: f"{r[k]:.2f}×" if k in r else "-"  # noqa: E731
        mem = f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "-"
        lines.append(
            f"| {shape} | {layers} | {S} | {p} | {fmt_ms(r['ms'])} | "
            f"{r.get('achieved_density', float('nan')):.3f} | {part('gate')} | "
            f"{part('selection')} | {part('index')} | {part('kernel')} | "
            f"{fmt_ms(bd.get('rest_ms', '-'))} | {fmt_ms(bd.get('total_ms', '-'))} | {mem} | "
            f"{vs('vs_sdpa_flash')} | {vs('vs_sdpa_cudnn')} |"
        )
    steps = [(key, r) for key, r in sorted(rows.items(), key=lambda kv: kv[0][:3])
             if row_kind(key[3]) == "step" and r["status"] == "ok"]
    if steps:
        # the mask path's column only where a record has it (runs since 12-07's select_index)
        masked = any("mask_path_graph_ms" in r for _, r in steps)
        lines += [
            "",
            "## One layer's sparse step (gate, selection, index, kernel; random inputs)",
            "",
            "Eager and captured in a CUDA graph (replayed); the kernel alone on the same "
            "selection's index, built once. Overhead = (step - kernel) / kernel.",
            "",
        ]
        if masked:
            lines += ["Mask path: the pooled step (pstep) through the (nb, nb) mask and the "
                      "index builder, as before `ops.select_index` took top-k in one launch, "
                      "in the same run.", ""]
        lines += [
            "| shape | S | provider | density | eager ms | graph ms | "
            + ("graph ms, mask path | " if masked else "")
            + "kernel ms | overhead eager | overhead graph | graph = eager (max abs diff) |",
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if masked else ""),
        ]
        for (shape, _layers, S, p), r in steps:
            eager = r.get("overhead_share")  # pstep rows have no eager timing
            mask_col = f"{fmt_ms(r.get('mask_path_graph_ms'))} | " if masked else ""
            lines.append(
                f"| {shape} | {S} | {p} | {r['achieved_density']:.3f} | "
                f"{fmt_ms(r.get('eager_ms'))} | {fmt_ms(r['graph_ms'])} | {mask_col}"
                f"{fmt_ms(r['kernel_ms'])} | "
                f"{'-' if eager is None else f'{eager:.0%}'} | "
                f"{r['graph_overhead_share']:.0%} | {r['graph_vs_eager_max_abs_diff']:.1e} |")
    wholes = [(key, r) for key, r in sorted(rows.items(), key=lambda kv: kv[0][:3])
              if key[3].startswith("whole:") and r["status"] == "ok"]
    if wholes:  # only where a record has such a row (runs since 12-08)
        lines += [
            "",
            "## One CUDA graph of the whole forward (`PrefillGraph`)",
            "",
            "Captured once (warm-up and capture untimed), then replayed; the replay's logits "
            "against an eager call of the same configuration. Device busy: the kernels' summed "
            "time in one profiled replay (`--profile`).",
            "",
            "| shape | layers | S | provider | replay ms | capture s | device busy ms "
            "| graph = eager (max abs diff) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (shape, layers, S, p), r in wholes:
            busy = r.get("profile", {}).get("device_busy_ms")
            lines.append(f"| {shape} | {layers} | {S} | {p} | {fmt_ms(r['ms'])} | "
                         f"{r['capture_s']:.1f} | {fmt_ms(busy)} | "
                         f"{r['graph_vs_eager_max_abs_diff']:.1e} |")
    checks = _latest(records, "check")
    if checks:
        lines += [
            "",
            "## Check: the sparse path at density 1 (gate@1) vs dense logits (last position)",
            "",
            "| shape | layers | S | max abs diff | max abs logit | limit | ok | argmax equal |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (shape, layers, S, _), c in checks.items():
            if c["status"] != "ok":
                lines.append(f"| {shape} | {layers} | {S} | {c['status']}: {c.get('error')} "
                             "| | | | |")
                continue
            lines.append(f"| {shape} | {layers} | {S} | {c['max_abs_diff']:.2e} | "
                         f"{c['ref_max_abs']:.2e} | {c['limit']:.1e} | {c['ok']} | "
                         f"{c['argmax_match']} |")
    return "\n".join(lines) + "\n"


KEY = ("run_id", "kind", "shape", "layers", "seq_len", "provider")
FILES = ResultFiles("prefill", KEY, markdown, add_ratios)


# ---------------------------------------------------------------------------------------------
# main


def run_bench(cfg: BenchConfig, out_dir: str, tag: str, command: str) -> str:
    device = resolve_device(cfg.device)
    meta = {**run_meta(device, command),
            "dtype": cfg.dtype, "gate_dtype": cfg.gate_dtype or cfg.dtype,
            "block_size": cfg.block_size, "reps": cfg.reps, "warmup": cfg.warmup, "weights": NOTE}
    os.makedirs(out_dir, exist_ok=True)
    res = Results(FILES.stem(out_dir, meta["gpu"], meta["date"], tag), FILES)
    t_start = time.perf_counter()
    check_len = min(cfg.seq_lens)
    order = row_order(cfg.providers)
    print(f"{meta['gpu']}: {cfg.shapes} at {cfg.seq_lens}; rows {order}; writing "
          f"{res.stem}.json/.md", flush=True)
    guarded = row_runner(res, meta, device, report, t_start=t_start, budget_s=cfg.budget_s)

    with stop_when_out_of_time(cfg.budget_s):
        for spec in cfg.shapes:
            name, layers = parse_shape(spec, cfg.layers)
            try:
                model = build_model(name, layers, cfg, max(cfg.seq_lens))
                gates = GateSet.from_config(model.config, block_size=cfg.block_size)
                gates = gates.to(device=device, dtype=DTYPES[cfg.gate_dtype or cfg.dtype]).eval()
                gates.requires_grad_(False)
            except Exception as e:  # noqa: BLE001
                err = f"model build: {type(e).__name__}: {e}"[:1000]
                print(err, flush=True)
                for S in cfg.seq_lens:
                    for p in order:
                        res.add({**meta, "kind": "row", "shape": name, "layers": layers,
                                 "seq_len": S, "provider": p, "status": "failed", "error": err})
                continue
            layers = model.config.num_hidden_layers
            shape = {"shape": name, "layers": layers, "model": describe(model)}
            took = time.perf_counter() - t_start
            print(f"{name}, {layers} layers: {describe(model)} ({took:.0f} s)", flush=True)
            for S in cfg.seq_lens:
                g = torch.Generator().manual_seed(cfg.seed + S)
                ids = torch.randint(0, model.config.vocab_size, (1, S), generator=g).to(device)
                bench_length(Run(cfg, device, model, gates, ids), order, S == check_len,
                             {**shape, "seq_len": S}, guarded)
                del ids
                free(device)
            del model, gates
            free(device)
    print(f"done in {time.perf_counter() - t_start:.0f} s: {res.stem}.json and .md", flush=True)
    return res.stem


def bench_length(run: Run, order: list[str], check: bool, base: dict, guarded) -> None:
    """Every row at one (shape, length): dense SDPA rows, the check, then the rest in order."""
    dense = [p for p in order if row_kind(p) == "dense" and p != "flex"]
    for p in dense:
        guarded({**base, "kind": "row", "provider": p}, lambda p=p: dense_row(run, p))
    if check and run.cfg.check:
        guarded({**base, "kind": "check", "provider": "gate@1"}, lambda: check_row(run))
    for p in order:
        if p not in dense:
            fn = {"dense": dense_row, "sparse": sparse_row, "ideal": ideal_row,
                  "step": step_row}[row_kind(p)]
            guarded({**base, "kind": "row", "provider": p}, lambda p=p, fn=fn: fn(run, p))


def report(r: dict, elapsed: float) -> None:
    head = (f"[{elapsed:6.0f} s] {r['shape']} L={r['layers']} S={r['seq_len']:>6} "
            f"{r['provider']:>16}")
    if r["status"] != "ok":
        print(f"{head}: {r['status']}: {r.get('reason') or r.get('error')}", flush=True)
        return
    if r["kind"] == "check":
        print(f"{head}: check max abs diff {r['max_abs_diff']:.2e} (limit {r['limit']:.1e}, "
              f"{'ok' if r['ok'] else 'FAIL'}), density {r['achieved_density']:.3f}", flush=True)
        return
    line = f"{head}: {fmt_ms(r['ms'])} ms"
    if "achieved_density" in r:
        line += f" density {r['achieved_density']:.3f}"
    if "peak_mem_gb" in r:
        line += f" peak {r['peak_mem_gb']:.1f} GiB"
    bd = r.get("breakdown")
    if bd:
        line += " | " + " ".join(f"{p} {fmt_ms(bd[f'{p}_ms'])}" for p in (*PARTS, "rest"))
    print(line + f" ({r['row_s']:.1f} s)", flush=True)
    pr = r.get("profile")
    if pr:
        print(f"    profiled call: wall {pr['wall_ms']:.2f} ms, device busy "
              f"{pr['device_busy_ms']:.2f} ms", flush=True)
        for e in pr["top"]:
            print(f"    {e['device_ms']:9.3f} ms {e['calls']:5d}x  host {e['host_ms']:8.3f} ms  "
                  f"{e['name']}", flush=True)


def parse(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=" ".join(head.split()), epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", "--preset", nargs="+", default=list(BenchConfig.shapes),
                   help=f"model shapes among {tuple(SHAPES)}; 'name:L' sets the layer count")
    p.add_argument("--layers", type=int, default=BenchConfig.layers,
                   help=f"layer count of {CUT_LAYERS} (default %(default)s)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="default 8192 32768 131072 (256 with --device cpu)")
    p.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS),
                   help=f"rows: {DENSE}, ideal@D, or any sparsify label/preset at a density")
    p.add_argument("--block-size", type=int, default=BenchConfig.block_size)
    p.add_argument("--reps", type=int, default=BenchConfig.reps)
    p.add_argument("--warmup", type=int, default=BenchConfig.warmup)
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--gate-dtype", choices=tuple(DTYPES), default=None,
                   help="the gates' parameter dtype (default: the model's; load_gates gives fp32)")
    p.add_argument("--no-check", action="store_true", help="skip the gate@1 vs dense check")
    p.add_argument("--no-breakdown", action="store_true", help="skip the instrumented calls")
    p.add_argument("--profile", action="store_true",
                   help="profile one more call of each sparse and ideal row (torch.profiler)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no row after this many seconds (0: no limit)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine earlier result files into --out/prefill-<gpu>-<date><tag>.*")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seq_lens = a.seq_lens or ([256] if device == "cpu" else list(BenchConfig.seq_lens))
    for prov in a.providers:
        if row_kind(prov) == "sparse":
            # a bad label fails now, not after the models are built
            sparse_config(split_modes(prov)[1], a.block_size)
    cfg = BenchConfig(
        shapes=tuple(a.shapes), seq_lens=tuple(seq_lens), providers=tuple(a.providers),
        layers=a.layers, block_size=a.block_size, reps=a.reps, warmup=max(1, a.warmup),
        device=device, dtype=a.dtype or ("fp32" if device == "cpu" else "bf16"),
        gate_dtype=a.gate_dtype,
        check=not a.no_check, breakdown=not a.no_breakdown, profile=a.profile,
        budget_s=a.budget_s,
    )
    for s in cfg.shapes:
        parse_shape(s, cfg.layers)
    return cfg, a


def main(argv=None) -> str:
    cfg, a = parse(argv)
    if a.merge:
        stem = merge(a.merge, a.out, FILES, a.tag)
        print(open(stem + ".md").read())
        return stem
    args = sys.argv[1:] if argv is None else list(argv)
    stem = run_bench(cfg, a.out, a.tag, "python bench/bench_prefill.py " + shlex.join(args))
    print(open(stem + ".md").read())
    return stem


if __name__ == "__main__":
    main()
