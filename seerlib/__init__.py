"""seerlib: learned block-sparse attention (SeerAttention) for transformers models.

Light to import: submodules load on first use, so `import seerlib` touches neither CUDA nor
transformers. Public names resolve lazily from their home modules (see `_EXPORTS`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "load_model": "seerlib.data",
    "token_windows": "seerlib.data",
    "load_text": "seerlib.data",
    "capture_qkv": "seerlib.capture",
    "AttnGate": "seerlib.gate",
    "GateSet": "seerlib.gate",
    "Selection": "seerlib.select",
    "select_blocks": "seerlib.select",
    "achieved_density": "seerlib.select",
    "forced_rule": "seerlib.select",
    "SparseConfig": "seerlib.methods",
    "PRESETS": "seerlib.methods",
    "preset": "seerlib.methods",
    "parse_config": "seerlib.methods",
    "register_method": "seerlib.methods",
    "METHODS": "seerlib.methods",
    "load_gates": "seerlib.io",
    "save_gates": "seerlib.io",
    "recall": "seerlib.metrics",
    "sparsify": "seerlib.integrate",
    "to_flex_block_mask": "seerlib.flex",
    "perplexity": "seerlib.eval",
    "passkey": "seerlib.eval",
    "passkey_accuracy": "seerlib.eval",
    "evaluate": "seerlib.eval",
    "load_results": "seerlib.eval",
    "pooled_attention": "seerlib.ops",
    "block_sparse_attention": "seerlib.ops",
    "attention": "seerlib.ops",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seerlib' has no attribute {name!r}")
