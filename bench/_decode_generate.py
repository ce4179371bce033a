"""`bench_decode.py --part generate`: generation throughput, dense and with decode sparsity.

`model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)` of a (B, P) prompt
(equal lengths, no padding: what `sparse_generation` takes), batch by batch:
- `dense`: the model's own SDPA at every step;
- each label of `--labels` through `seerlib.decode.generate.sparse_generation(model, label,
  decode_gates=...)`: decode steps read the label's token budget; the prefill stays dense.
Per row: the prefill (a generate of one new token, which the prefill's logits give), the whole
generate, and decode tokens/s = (N - 1) B / (total - prefill); kept share of the visible blocks
(`GenerationStats`) and the share of new tokens equal to the dense row's (1.0 when a budget
covers the context; with random weights a sparse row may part from dense at its first step).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from seerlib.decode import DecodeGateSet, parse_decode_config
from seerlib.decode.generate import sparse_generation

# SmolLM2-135M's real config (Llama)
SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LABELS = ("gate@tok=1024", "gate@tok=512", "quest@tok=1024", "sink_window@tok=1024")
RANDOM = "RANDOM weights (speed does not depend on them; the tokens are noise)"


def build_model(cfg, device: torch.device):
    """(model, weights note, tokenizer or None): the cached SmolLM2 with --model-cache, else a
    random LlamaForCausalLM of the preset built on the device, in cfg.dtype, eval mode."""
    dtype = DTYPES[cfg.dtype]
    if cfg.model_cache:
        if cfg.preset != "smollm2":
            raise ValueError(f"--model-cache holds SmolLM2; --preset is {cfg.preset!r}")
        from seerlib.data import load_model  # lazy: transformers takes seconds to import

        os.environ["SEERLIB_CACHE"] = cfg.model_cache  # where seerlib.data looks for the cache
        model, tok = load_model(dtype=dtype, device=device)
        return model, f"SmolLM2-135M-Instruct, real weights from {cfg.model_cache}", tok
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: seconds to import

    if cfg.preset == "tiny":
        from seerlib.distill import tiny_config  # lazy, as transformers

        mcfg = tiny_config(max_position_embeddings=max(4096, cfg.prompt_len + cfg.new_tokens))
    else:
        mcfg = LlamaConfig(**SMOLLM2)
    mcfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of the weights on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(mcfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval().requires_grad_(False), RANDOM, None


def prompt(cfg, model, tok, batch: int, device) -> tuple[torch.Tensor, str]:
    """(ids (B, P), what they are): the cached evaluation text with the real model when its text
    cache is there, else random token ids."""
    P = cfg.prompt_len
    if tok is not None:
        from seerlib.data import DataError, tokens  # lazy, as load_model

        try:
            text = tokens(tok, "eval")
            if text.numel() >= P:
                return text[:P].expand(batch, P).contiguous().to(device), "KJV evaluation text"
        except DataError:
            pass
    g = torch.Generator().manual_seed(cfg.seed + P)
    ids = torch.randint(0, model.config.vocab_size, (1, P), generator=g)
    return ids.expand(batch, P).contiguous().to(device), "random token ids"


def decode_gates(cfg, model, device):
    """The decode gates: `--decode-gates` loaded with `load_gates(phase="decode")`, else an
    untrained DecodeGateSet for the model; (gates, note)."""
    dtype = DTYPES[cfg.gate_dtype] if cfg.gate_dtype else model.dtype
    if cfg.decode_gates:
        from seerlib.io import load_gates  # lazy: only a run with a gate file reads one

        g = load_gates(cfg.decode_gates, model, block_size=cfg.block_size, phase="decode",
                       dtype=dtype)
        return g.to(device), f"trained ({cfg.decode_gates})"
    g = DecodeGateSet.from_config(model.config, block_size=cfg.block_size)
    return g.to(device=device, dtype=dtype).eval().requires_grad_(False), "untrained"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_generate(model, ids, new_tokens: int, reps: int, device) -> tuple[float, torch.Tensor]:
    """(median seconds over reps, new tokens (B, N) of the last call)."""
    mask = torch.ones_like(ids)
    times, out = [], None
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out[:, ids.shape[1]:]


def generate_row(cfg, model, ids, device, stats=None) -> dict:
    """Warm-up (2 new tokens), the prefill alone (1 new token), the whole generate."""
    N = cfg.new_tokens
    if N < 2:
        raise ValueError(f"--new-tokens must be >= 2 (one decode step at least); got {N}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_generate(model, ids, 2, 1, device)
    prefill, _ = timed_generate(model, ids, 1, cfg.reps, device)
    if stats is not None:
        stats.reset()
    total, new = timed_generate(model, ids, N, cfg.reps, device)
    B = ids.shape[0]
    out = {"prefill_s": prefill, "total_s": total, "decode_s": total - prefill,
           "decode_tok_s": (N - 1) * B / (total - prefill) if total > prefill else float("nan"),
           "tokens": new.tolist()}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run_generate(cfg, device, guarded) -> None:
    """Every row of every batch through `guarded(base record, fn)`."""
    model, weights, tok = build_model(cfg, device)
    limit = model.config.max_position_embeddings
    if cfg.prompt_len + cfg.new_tokens > limit:
        raise ValueError(f"prompt {cfg.prompt_len} + {cfg.new_tokens} new tokens pass the "
                         f"model's {limit} positions")
    gates, gate_note = decode_gates(cfg, model, device)
    c = model.config
    shape = (f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} q / "
             f"{c.num_key_value_heads} kv heads, head dim {getattr(c, 'head_dim', None)}, vocab "
             f"{c.vocab_size}")
    print(f"generate: {shape}; {weights}; decode gate {gate_note}", flush=True)
    for B in cfg.batches:
        ids, what = prompt(cfg, model, tok, B, device)
        base = {"part": "generate", "kind": "row", "batch": B, "prompt_len": cfg.prompt_len,
                "new_tokens": cfg.new_tokens, "model": shape, "weights": weights,
                "prompt": what}
        guarded({**base, "provider": "dense"}, lambda ids=ids: {
            **generate_row(cfg, model, ids, device), "attention": "the model's sdpa"})
        for label in cfg.labels:
            def row(label=label, ids=ids):
                needs = parse_decode_config(label, cfg.block_size).spec.needs_gate
                with sparse_generation(model, label, decode_gates=gates if needs else None,
                                       block_size=cfg.block_size) as sg:
                    out = generate_row(cfg, model, ids, device, sg.stats)
                    return {**out, "kept_share": sg.stats.kept_share, "steps": sg.stats.steps,
                            "gate": gate_note if needs else None}

            guarded({**base, "provider": label}, row)
        del ids
        if device.type == "cuda":
            torch.cuda.empty_cache()
