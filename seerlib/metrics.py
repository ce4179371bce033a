"""How well a block selection or a gate matches the model's own attention.

- `block_mass(q, k, block_size)`: the exact share of attention mass in each (query block, key
  block) tile, averaged over the tile's query rows: (B, Hq, nb, nb), rows sum to 1.
- `recall(weights, block_mask)`: the share of each row's attention mass that the kept blocks hold.
- `kl_div(target, logits)`: KL(target ‖ softmax(logits)) per row, the distillation loss.
- `recall_table(...)` / `python -m seerlib.metrics`: the README's recall table (gate vs baselines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from seerlib.reference import check_block_mask, check_block_size, check_qkv, num_blocks

__all__ = [
    "block_maps",
    "block_mass",
    "kl_div",
    "normalize_rows",
    "recall",
    "recall_markdown",
    "recall_table",
]


def normalize_rows(weights: torch.Tensor) -> torch.Tensor:
    """Row-normalize a (..., nb, nb) non-negative map; rows summing to 0 stay 0."""
    w = weights.float()
    s = w.sum(dim=-1, keepdim=True)
    return w / torch.where(s > 0, s, torch.ones_like(s))


def block_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact block maps of the attention probabilities, without the attention output.

    One pass over the scores gives both: the tile-summed mass (what a block selection keeps) and the
    tile max (the distillation ground truth, equal to `reference.pooled_attention`'s map). Only the
    keys up to each query chunk's end are scored under causal masking, and no P @ V is done, so it
    is about twice as fast on a CPU as the full reference.

    Args:
        q: (B, Hq, S, d) post-RoPE queries; k: (B, Hkv, S, d) post-RoPE keys.
        block_size: tile size b.
        causal: causal attention.
        scale: score scale, 1 / sqrt(d) by default.
    Returns:
        mass: (B, Hq, nb, nb) float32; mass[b, h, i, j] = mean over the query rows r of block i of
            the probability mass row r puts on key block j (rows sum to 1).
        pooled: (B, Hq, nb, nb) float32; the largest probability inside each tile (not normalized).
    """
    B, Hq, Hkv, S, d = check_qkv(q, k, k)
    b = check_block_size(block_size)
    nb = num_blocks(S, b)
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mass = torch.zeros(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
    pooled = torch.zeros(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
    kf = k.float().unsqueeze(2)  # (B, Hkv, 1, S, d)
    pos = torch.arange(S, device=q.device)
    rows = max(b, (1 << 23) // max(1, B * Hq * S) // b * b)
    for r0 in range(0, S, rows):
        r1 = min(S, r0 + rows)
        kend = r1 if causal else S  # keys past the chunk's last query are all masked
        nk = num_blocks(kend, b)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, group, r1 - r0, d) * scale
        s = torch.matmul(qc, kf[..., :kend, :].transpose(-1, -2))  # (B, Hkv, G, R, kend)
        s = s.reshape(B, Hq, r1 - r0, kend)
        if causal:
            s.masked_fill_(pos[None, :kend] > pos[r0:r1, None], float("-inf"))
        s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
        s.div_(s.sum(dim=-1, keepdim=True))  # probabilities (B, Hq, R, kend)
        pad_q = (-(r1 - r0)) % b
        p = torch.nn.functional.pad(s, (0, nk * b - kend, 0, pad_q))  # zeros change no sum or max
        R = p.shape[2]
        # (B, Hq, R, nk*b) -> (B, Hq, R/b, b, nk, b)
        p = p.reshape(B, Hq, R // b, b, nk, b)
        qb = slice(r0 // b, r0 // b + R // b)
        mass[:, :, qb, :nk] = p.sum(dim=(3, 5))
        pooled[:, :, qb, :nk] = p.amax(dim=(3, 5))
    rows_per_block = torch.bincount(pos // b, minlength=nb).float()
    return mass / rows_per_block[None, None, :, None], pooled


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention mass per tile, averaged over each query block's rows: (B, Hq, nb, nb).

    See `block_maps` (q (B, Hq, S, d), k (B, Hkv, S, d) post-RoPE); rows sum to 1.
    """
    return block_maps(q, k, block_size, causal, scale)[0]


def recall(
    weights: torch.Tensor,
    block_mask: torch.Tensor,
    per_head: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """The share of each row's attention mass that the kept blocks hold.

    Args:
        weights: (B, H, nb, nb) non-negative block weights: `block_mass` (exact attention mass) or
            a pooled map from `pooled_attention` (a proxy). Rows are normalized to sum 1 first
            unless `normalize=False`.
        block_mask: (B, H, nb, nb) bool, True = kept.
        per_head: return (B, H), the mean over query-block rows per head; else the scalar mean.
        normalize: row-normalize the weights.
    Returns:
        float32 tensor: (B, H) if per_head else a 0-D mean over batches, heads and rows.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        raise ValueError(
            f"weights must be (B, H, nb, nb); got {getattr(weights, 'shape', weights)}"
        )
    B, H, nb, nb2 = weights.shape
    if nb != nb2:
        raise ValueError(f"weights must be square in its last two dims; got {tuple(weights.shape)}")
    check_block_mask(block_mask, B, H, nb)
    w = normalize_rows(weights) if normalize else weights.float()
    row = (w * block_mask).sum(dim=-1)  # (B, H, nb)
    per = row.mean(dim=-1)
    return per if per_head else per.mean()


def kl_div(
    target: torch.Tensor,
    logits: torch.Tensor,
    skip_rows: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL(target ‖ softmax(logits)) over key blocks.

    Args:
        target: (B, H, nb, nb) row-normalized target distribution (zeros above the diagonal).
        logits: (B, H, nb, nb) logits, -inf above the diagonal.
        skip_rows: leave out the first this-many query-block rows.
        reduction: "mean" (over batches, heads and kept rows) or "none" -> (B, H, nb - skip_rows).
    Returns:
        float32 tensor.
    """
    if target.shape != logits.shape:
        raise ValueError(
            f"target has shape {tuple(target.shape)}; logits have {tuple(logits.shape)}"
        )
    t = target[..., skip_rows:, :].float()
    logp = torch.log_softmax(logits[..., skip_rows:, :].float(), dim=-1)
    # 0 * log 0 = 0, and never 0 * (-inf)
    terms = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t))
    kl = terms.sum(dim=-1)
    if reduction == "none":
        return kl
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    return kl.mean()


# ---------------------------------------------------------------- the recall table

DEFAULT_DENSITIES = (0.5, 0.3, 0.1)


def recall_table(
    model,
    windows: torch.Tensor,
    gates: dict,
    block_size: int = 64,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    log=None,
) -> dict:
    """Mean recall of attention mass of gates and baseline patterns on text windows.

    For every window and layer, the exact block mass (`block_maps`, post-RoPE Q/K of the model)
    is the weight; each method's block mask at each density keeps a share of it (`recall`), averaged
    over layers, heads and query-block rows, then over windows. Methods: every gate set in `gates`
    (top-k of its logits by `select_blocks`), "oracle" (top-k of the pooled ground truth),
    "sink_window" (block 0 plus the latest blocks), "vertical_slash" (MInference-like).

    Args:
        model: the frozen transformers model.
        windows: (N, S) token ids.
        gates: {name: GateSet} with the model's block size.
        block_size: b.
        densities: target densities.
        log: optional callable for a progress line per window.
    Returns:
        {"recall": {method: {density: mean}}, "achieved_density": {method: {density: mean}},
         "per_layer": {method: {density: [mean per layer]}}, "windows", "seq_len", "block_size"}.
    """
    from seerlib.capture import capture_qkv
    from seerlib.patterns import oracle, sink_window, vertical_slash
    from seerlib.select import achieved_density, select_blocks

    for name, g in gates.items():
        if g.block_size != block_size:
            raise ValueError(
                f"gate set {name!r} has block size {g.block_size}; expected {block_size}"
            )
    device = next(model.parameters()).device
    methods = [*gates, "oracle", "sink_window", "vertical_slash"]
    keys = [str(d) for d in densities]
    rec = {m: {d: [] for d in keys} for m in methods}  # per (window, layer) values
    dens = {m: {d: [] for d in keys} for m in methods}
    n_layers = None
    for w in range(len(windows)):
        qkv = capture_qkv(model, windows[w : w + 1].to(device))
        n_layers = len(qkv)
        for i, t in qkv.items():
            mass, pooled = block_maps(t.q, t.k, block_size)
            nb = mass.shape[-1]
            logits = {name: g[i].to(device)(t.q_pre, t.k_pre) for name, g in gates.items()}
            for d, key in zip(densities, keys, strict=True):
                masks = {name: select_blocks(lg, density=d) for name, lg in logits.items()}
                masks["oracle"] = oracle(pooled, d)
                masks["sink_window"] = sink_window(nb, d, 1, 1, mass.shape[1], device)
                masks["vertical_slash"] = vertical_slash(t.q, t.k, d, block_size)
                for m in methods:
                    rec[m][key].append(float(recall(mass, masks[m])))
                    dens[m][key].append(achieved_density(masks[m]))
        del qkv
        if log:
            log(
                f"window {w + 1}/{len(windows)}: "
                + ", ".join(
                    f"{m} {sum(rec[m][keys[-1]]) / len(rec[m][keys[-1]]):.3f}" for m in methods
                )
                + f" (recall at {keys[-1]})"
            )

    def mean(xs):
        return sum(xs) / len(xs)

    def per_layer(xs):
        return [mean(xs[j::n_layers]) for j in range(n_layers)]

    return {
        "recall": {m: {d: mean(rec[m][d]) for d in keys} for m in methods},
        "achieved_density": {m: {d: mean(dens[m][d]) for d in keys} for m in methods},
        "per_layer": {m: {d: per_layer(rec[m][d]) for d in keys} for m in methods},
        "windows": len(windows),
        "seq_len": int(windows.shape[1]),
        "block_size": block_size,
    }


def recall_markdown(table: dict, labels: dict | None = None) -> str:
    """The recall table as markdown: one row per method, one column per density."""
    labels = labels or {}
    keys = list(next(iter(table["recall"].values())))
    head = "| method | " + " | ".join(f"density {d}" for d in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for m, row in table["recall"].items():
        cells = [f"{row[d]:.3f} ({table['achieved_density'][m][d]:.2f})" for d in keys]
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nMean recall of attention mass (achieved density in parentheses), "
        f"{table['windows']} windows of {table['seq_len']} tokens, block {table['block_size']}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m seerlib.metrics`: the recall table of a gate file against the baselines."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m seerlib.metrics", description=main.__doc__)
    p.add_argument("--gates", required=True, help="trained gate file (save_gates)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--windows", type=int, default=8, help="windows of the eval split")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--densities", default="0.5,0.3,0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained gate")
    p.add_argument("--out", required=True, help="output stem: writes <out>.json and <out>.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from seerlib.data import MODEL_NAME, load_model, token_windows
    from seerlib.gate import GateSet
    from seerlib.io import load_gates, read_metadata

    model, tok = load_model(device=args.device)
    trained = load_gates(args.gates, model, block_size=args.block_size, model_name=MODEL_NAME)
    meta = read_metadata(args.gates)
    torch.manual_seed(args.seed)
    untrained = GateSet.from_config(
        model.config,
        block_size=args.block_size,
        q_pool=trained.q_pool,
        k_pool=trained.k_pool,
        d_gate=trained.d_gate,
    )
    windows = token_windows(tok, "eval", args.seq_len, args.windows)
    densities = [float(x) for x in args.densities.split(",")]
    with torch.no_grad():
        table = recall_table(
            model,
            windows,
            {"gate": trained.to(args.device), "untrained_gate": untrained.to(args.device)},
            args.block_size,
            densities,
            log=lambda s: print(s, flush=True),
        )
    table["gate_file"] = str(args.gates)
    table["gate_steps"], table["gate_tokens_seen"] = meta.get("steps"), meta.get("tokens_seen")
    table["command"] = "python -m seerlib.metrics " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    labels = {
        "gate": "SeerAttention gate (shipped)",
        "untrained_gate": "untrained gate",
        "oracle": "oracle top-k (pooled ground truth)",
        "sink_window": "sink + window",
        "vertical_slash": "vertical-slash (last-block estimate)",
    }
    md = recall_markdown(table, labels)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
