"""The sparse decode kernel (seerlib/kernels/sparse_decode.py) against `seerlib.reference` on a GPU,
in bf16 and fp16: the shapes of tests/test_sparse_decode.py (which run on the CPU interpreter) plus
long caches, every split size, variable kv lengths and poisoned outputs.

The reference runs in float32 on the same bf16 inputs; the tolerance is bf16's (outputs are
convex combinations of the values, so |err| <= a few ulps of max |v|).

With `--softcap C [C ...]` every case runs with attention-logit soft-capping (Gemma2) at each cap
instead, q scaled by 4 so that the cap binds; each record also says how far the capped reference is
from the plain one (`cap_effect`), so a kernel that ignored the cap would fail.

Usage (repo root, a CUDA machine): python bench/check_sparse_decode.py --out DIR [--softcap 2 50]
Writes DIR/check-sparse-decode[-softcap]-<gpu>-<date>.json (one record per case) and exits 1 on a
failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

from seerlib import reference
from seerlib.decode.select import decode_index
from seerlib.kernels.sparse_decode import decode_attention, sparse_decode_attention

# (B, Hq, Hkv, S, d, b, share kept)
CASES = [
    (1, 4, 4, 97, 64, 16, 0.5),
    (2, 9, 3, 1025, 64, 64, 0.3),
    (2, 8, 2, 1025, 128, 64, 0.3),
    (3, 12, 3, 200, 128, 32, 0.6),
    (1, 32, 8, 32768, 128, 64, 0.1),
    (16, 32, 8, 8192, 128, 64, 0.1),
    (4, 9, 3, 8193, 64, 64, 0.05),
    (2, 32, 8, 131072, 128, 64, 0.05),
]
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def one_case(B, Hq, Hkv, S, d, b, share, dtype, seed, softcap=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, Hq, 1, d, device="cuda", generator=g) * (4 if softcap else 1)).to(dtype)
    k = torch.randn(B, Hkv, S, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, d, device="cuda", generator=g).to(dtype)
    lens = torch.randint(max(1, S // 2), S + 1, (B,), device="cuda", generator=g)
    lens[0] = S
    nb = -(-S // b)
    keep = torch.rand(B, Hkv, nb, device="cuda", generator=g) < share
    keep[..., -1] = True
    idx, cnt = decode_index(keep)
    want = reference.sparse_decode_attention(q.float(), k.float(), v.float(), idx, cnt, b,
                                             kv_lens=lens, softcap=softcap).to(dtype)
    plain = reference.sparse_decode_attention(q.float(), k.float(), v.float(), idx, cnt, b,
                                              kv_lens=lens).to(dtype)
    extra = {} if softcap is None else {
        "softcap": softcap, "cap_effect": (plain.float() - want.float()).abs().max().item()}
    rec = []
    for per in (None, 1, 7, nb):
        out = torch.full_like(q, float("nan"))
        got = sparse_decode_attention(q, k, v, idx, cnt, b, lens, out=out, blocks_per_split=per,
                                      softcap=softcap)
        err = (got.float() - want.float()).abs().max().item()
        rec.append({"op": "sparse", "blocks_per_split": per, "max_abs_err": err,
                    "finite": bool(torch.isfinite(got).all()), **extra})
    dense = decode_attention(q, k, v, lens, softcap=softcap)
    want_d = reference.decode_attention(q.float(), k.float(), v.float(), kv_lens=lens,
                                        softcap=softcap)
    rec.append({"op": "dense", "blocks_per_split": None,
                "max_abs_err": (dense.float() - want_d).abs().max().item(),
                "finite": bool(torch.isfinite(dense).all()), **extra})
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--softcap", type=float, nargs="+", default=None,
                    help="run every case soft-capped at each of these caps instead")
    args = ap.parse_args(argv)
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    records, ok = [], True
    for dtype in (torch.bfloat16, torch.float16):
        for i, (B, Hq, Hkv, S, d, b, share) in enumerate(CASES):
            for cap in args.softcap or [None]:
                for r in one_case(B, Hq, Hkv, S, d, b, share, dtype, seed=i, softcap=cap):
                    # a soft-capped case must also differ from the plain one by more than tol
                    binds = cap is None or r["cap_effect"] > TOL[dtype]
                    passed = r["finite"] and r["max_abs_err"] <= TOL[dtype] and binds
                    ok &= passed
                    records.append({"B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "d": d,
                                    "block_size": b, "share": share,
                                    "dtype": str(dtype).split(".")[-1], **r, "tol": TOL[dtype],
                                    "passed": passed})
                    print(json.dumps(records[-1]), flush=True)
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": date,
            "all_passed": ok}
    os.makedirs(args.out, exist_ok=True)
    kind = "check-sparse-decode" + ("-softcap" if args.softcap else "")
    path = os.path.join(args.out, f"{kind}-{gpu.replace(' ', '-')}-{date}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({**meta, "records": records}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(meta))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
