"""`bench_decode.py`'s records and markdown: ratios within a run, the step tables per batch, the
sparse step's split, the checks, the generation table and issue 15's targets as measured figures;
`FILES` names them for `_results` (written after every row, `--merge`).

Records are `bench_decode.py`'s dicts; a later record of the same row replaces an earlier one.
"""

from __future__ import annotations

from _decode_peers import SDPA  # bench/ is on sys.path: bench_decode.py put it there
from _results import ResultFiles

ORDER = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "seer_dense", "flex_dense",
         "seer_kernel", "flex_sparse", "seer_step")
# issue 15: (batch, KV length, sparsity, speed-up target, the gate share's ceiling or None)
TARGETS = ((16, 32768, 0.9, 6.0, 0.20), (1, 131072, 0.9, 2.5, None))


def label(r: dict) -> str:
    s = r.get("sparsity")
    return r["provider"] if s is None else f"{r['provider']}@{s:g}"


def _latest(records, part: str) -> dict:
    """{(batch, kv_len or prompt_len, provider, sparsity): record}, later ones replacing."""
    out = {}
    for r in records:
        if r.get("part") == part and r.get("kind") == "row":
            out[(r["batch"], r.get("kv_len", r.get("prompt_len")), r["provider"],
                 r.get("sparsity"))] = r
    return out


def _us(ms) -> str:
    return f"{ms * 1e3:.1f}" if isinstance(ms, (int, float)) else "-"


def _rank(key) -> tuple:
    _, _, p, s = key
    return (ORDER.index(p) if p in ORDER else len(ORDER), s or 0.0)


def step_tables(rows: dict) -> list[str]:
    lines = []
    for B in sorted({k[0] for k in rows}):
        mine = {k: r for k, r in rows.items() if k[0] == B}
        lens = sorted({k[1] for k in mine})
        provs = list(dict.fromkeys((k[2], k[3]) for k in sorted(mine, key=_rank)))
        lines += [f"### batch {B}", "",
                  "Cells: µs (speed-up vs the fastest SDPA row of the column, GB/s moved)", "",
                  "| row | " + " | ".join(str(S) for S in lens) + " |",
                  "|---|" + "---|" * len(lens)]
        notes = []
        for p, s in provs:
            cells = []
            for S in lens:
                r = mine.get((B, S, p, s))
                if r is None:
                    cells.append("-")
                elif r["status"] == "ok":
                    vs = f"{r['vs_sdpa_best']:.2f}×, " if "vs_sdpa_best" in r else ""
                    cells.append(f"{r['us']:.1f} ({vs}{r['gbs']:.0f} GB/s)")
                else:
                    cells.append(r["status"])
                    notes.append(f"- {label(r)} at {S}: {r['status']}: "
                                 f"{r.get('reason') or r.get('error')}")
            name = p if s is None else f"{p}@{s:g}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", *notes, ""] if notes else [""]
    return lines


def step_split(rows: dict) -> list[str]:
    steps = [r for k, r in sorted(rows.items(), key=lambda kv: kv[0][:2])
             if k[2] == "seer_step" and r["status"] == "ok"]
    if not steps:
        return []
    lines = ["## The sparse step: gate + selection + index + kernel", "",
             "The untrained decode gate against a K-compression cache filled before timing, "
             "`select_decode`, `decode_index`, the kernel; eager and as one CUDA graph. Kernel = "
             "the kernel alone on the step's index. Gate share = (step - kernel) / step.", "",
             "| batch | S | sparsity | budget | eager µs | graph µs | kernel µs | share eager "
             "| share graph | graph = eager | graph error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        g = r.get("gate_share_graph")
        diff = r.get("graph_vs_eager_max_abs_diff")
        err = (r.get("graph_error", "") + (f" (at {r['graph_error_at']})"
                                            if "graph_error_at" in r else "")).replace("|", "/")
        lines.append(f"| {r['batch']} | {r['kv_len']} | {r['sparsity']:g} | {r['budget_tokens']} "
                     f"| {_us(r['eager_ms'])} | {_us(r.get('graph_ms'))} | {_us(r['kernel_ms'])} "
                     f"| {r['gate_share_eager']:.0%} | {'-' if g is None else f'{g:.0%}'} | "
                     f"{'-' if diff is None else f'{diff:.1e}'} | {err[:300] or '-'} |")
    return lines + [""]


def checks(rows: dict) -> list[str]:
    ok = [r for k, r in sorted(rows.items(), key=lambda kv: (kv[0][:2], _rank(kv[0])))
          if r["status"] == "ok" and "max_abs_diff" in r]
    if not ok:
        return []
    lines = ["## Checks: batch row 0 against `seerlib.reference` (float32)", "",
             "| batch | S | row | against | max abs diff | limit (relative to max abs ref) | ok |",
             "|---|---|---|---|---|---|---|"]
    for r in ok:
        lines.append(f"| {r['batch']} | {r['kv_len']} | {label(r)} | {r['check_against']} | "
                     f"{r['max_abs_diff']:.1e} | {r['check_limit']:.1e} | {r['check_ok']} |")
    return lines + [""]


def generate_table(rows: dict) -> list[str]:
    if not rows:
        return []
    first = next(iter(rows.values()))
    lines = ["## Generation", "",
             f"`model.generate`, greedy, prompt {first['prompt_len']} tokens ({first['prompt']}),"
             f" {first['new_tokens']} new tokens (min = max). Model: {first['model']}; "
             f"{first['weights']}. Decode tok/s = (new tokens - 1) · batch / (total - prefill).",
             "", "| batch | row | prefill s | total s | decode tok/s | vs dense | kept share | "
             "same tokens as dense | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for (B, _, p, _), r in sorted(rows.items(), key=lambda kv: kv[0][0]):
        if r["status"] != "ok":
            lines.append(f"| {B} | {p} | {r['status']} | | | | | | |")
            notes.append(f"- {p} at batch {B}: {r.get('reason') or r.get('error')}")
            continue
        f = lambda key, fmt, r=r: "-" if r.get(key) is None else format(r[key], fmt)  # noqa: E731
        lines.append(f"| {B} | {p} | {r['prefill_s']:.3f} | {r['total_s']:.3f} | "
                     f"{r['decode_tok_s']:.0f} | {f('vs_dense', '.2f')} | "
                     f"{f('kept_share', '.3f')} | {f('same_tokens_as_dense', '.3f')} | "
                     f"{f('peak_mem_gb', '.1f')} |")
    return lines + ["", *notes, ""]


def targets(records: list[dict]) -> list[str]:
    """Issue 15's targets as measured figures (or "not measured") from the step records."""
    rows = _latest(records, "step")
    if not rows:
        return []
    out = ["Issue 15 targets, measured:"]
    for B, S, s, want, share_max in TARGETS:
        step = rows.get((B, S, "seer_step", s))
        kernel = rows.get((B, S, "seer_kernel", s))
        head = f"- batch {B}, KV {S}, sparsity {s:g}:"
        if not step or step["status"] != "ok" or "vs_sdpa_best" not in step:
            out.append(f"{head} not measured (no ok seer_step row with an SDPA row beside it)")
            continue
        sdpa = rows.get((B, S, step["sdpa_best"], None))
        x = step["vs_sdpa_best"]
        line = (f"{head} seer_step ({step['ms_from']}) {step['ms']:.4f} ms vs fastest SDPA "
                f"({step['sdpa_best']}) {sdpa['ms']:.4f} ms: {x:.2f}× (target ≥ {want:g}×: "
                f"{'met' if x >= want else 'NOT met'})")
        if kernel and kernel["status"] == "ok":
            line += f"; seer_kernel alone {kernel['ms']:.4f} ms, {kernel['vs_sdpa_best']:.2f}×"
        if share_max is not None:
            share = step.get("gate_share_graph", step["gate_share_eager"])
            line += (f"; gate + selection + index share {share:.0%} (target ≤ {share_max:.0%}: "
                     f"{'met' if share <= share_max else 'NOT met'})")
        out.append(line)
    return out


def markdown(records: list[dict]) -> str:
    first = records[0] if records else {}
    vals = lambda key: ", ".join(sorted({str(r.get(key)) for r in records}))  # noqa: E731
    copy = ", ".join(f"{r:.0f}" for r in sorted({r["copy_gbs"] for r in records
                                                  if "copy_gbs" in r}))
    lines = [f"# Decode benchmark: {vals('gpu')}, {vals('date')}", "",
             f"{first.get('dtype', '')}, block {vals('block_size')}; timing: {vals('timing')}. "
             f"Device copy rate (read + written, same run): {copy} GB/s. torch {vals('torch')}, "
             f"triton {vals('triton')}, transformers {vals('transformers')}.", "",
             "Commands: " + "; ".join(f"`{c}`" for c in sorted({r["command"] for r in records})),
             ""]
    steps = _latest(records, "step")
    if steps:
        lines += ["## Decode attention step (q_len 1)", "",
                  f"Preset {vals('preset')}; random normal q, K, V. Sparse rows: the newest "
                  "block and budget - 1 random earlier blocks per (batch, kv head), indexed once "
                  "before timing (seer_step selects its own, see below). GB/s = K/V of the "
                  "blocks read + q + out + index bytes (seer_step: + the gate keys and the gate's "
                  "query projection) over the median time; not counted: the split-KV partials. "
                  "SDPA rows that needed repeated K/V count the repeated bytes.", "",
                  *step_tables(steps), *step_split(steps), *checks(steps)]
        t = targets(records)
        lines += [t[0], "", *t[1:], ""] if t else []
    return "\n".join(lines + generate_table(_latest(records, "generate"))) + "\n"


def same_tokens(a, b) -> float | None:
    """Share of equal entries of two (B, N) token lists, None when either is missing."""
    if a is None or b is None or len(a) != len(b):
        return None
    if any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        return None
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True)
             for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else None


def add_ratios(records: list[dict]) -> None:
    """vs_sdpa_best = the fastest SDPA row's ms / this row's ms (same run, batch, KV length);
    vs_dense for generation rows = this row's decode tokens/s / the dense row's."""
    best, dense = {}, {}
    for r in records:
        if r.get("status") != "ok":
            continue
        if r.get("part") == "step" and r["provider"] in SDPA:
            key = (r["run_id"], r["batch"], r["kv_len"])
            if key not in best or r["ms"] < best[key][0]:
                best[key] = (r["ms"], r["provider"])
        if r.get("part") == "generate" and r["provider"] == "dense":
            dense[(r["run_id"], r["batch"])] = r
    for r in records:
        if r.get("status") != "ok":
            continue
        if r.get("part") == "step" and (r["run_id"], r["batch"], r["kv_len"]) in best:
            ms, name = best[(r["run_id"], r["batch"], r["kv_len"])]
            r["vs_sdpa_best"], r["sdpa_best"] = ms / r["ms"], name
            if "eager_ms" in r:
                r["eager_vs_sdpa_best"] = ms / r["eager_ms"]
        d = dense.get((r["run_id"], r.get("batch")))
        if r.get("part") == "generate" and d is not None:
            r["vs_dense"] = r["decode_tok_s"] / d["decode_tok_s"]
            r["same_tokens_as_dense"] = same_tokens(r.get("tokens"), d.get("tokens"))


KEY = ("run_id", "part", "kind", "provider", "batch", "kv_len", "sparsity", "prompt_len")
FILES = ResultFiles("decode", KEY, markdown, add_ratios)


def report(r: dict, elapsed: float) -> None:
    s = f"@{r['sparsity']}" if r.get("sparsity") is not None else ""
    where = (f"B={r['batch']:>2} S={r['kv_len']:>6}" if r["part"] == "step"
             else f"B={r['batch']:>2} prompt={r['prompt_len']}")
    head = f"[{elapsed:6.0f} s] {where} {r['provider'] + s:>22}"
    if r["status"] != "ok":
        print(f"{head}: {r['status']}: {r.get('reason') or r.get('error')}", flush=True)
        return
    if r["part"] == "generate":
        print(f"{head}: prefill {r['prefill_s']:.2f} s, total {r['total_s']:.2f} s, decode "
              f"{r['decode_tok_s']:.0f} tok/s ({r['row_s']:.0f} s)", flush=True)
        return
    line = (f"{head}: {r['us']:9.1f} µs {r['gbs']:7.0f} GB/s ({r['copy_share']:.0%} of copy)"
            f" check {r['max_abs_diff']:.1e}{'' if r['check_ok'] else ' FAIL'}")
    if "gate_share_eager" in r:
        line += (f" | eager {r['eager_ms'] * 1e3:.1f} µs, kernel {r['kernel_ms'] * 1e3:.1f} µs, "
                 f"graph {r['graph_ms'] * 1e3:.1f} µs" if "graph_ms" in r
                 else f" | graph: {r.get('graph_error', '')[:120]}")
    print(line + f" ({r['row_s']:.1f} s)", flush=True)
