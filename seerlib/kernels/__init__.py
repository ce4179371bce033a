"""Triton kernels, installed as `seerlib.kernels` (never a top-level `kernels` module).

`pooled_attention` (FlashAttention forward + block max-pooled map, also plain `attention`),
`block_sparse_attention` (causal attention over a CSR list of kept key blocks) and the builder of
that list, `build_block_index` (a `BlockIndex` from a bool block mask), and its backward
(`block_sparse_attention_trainable`, with `build_key_index`, the transposed list it reads). They
take CUDA bf16/fp16 tensors, or CPU float32 under TRITON_INTERPRET=1; the library calls them through
`seerlib.ops`, which picks them or the reference.
"""

from .block_index import BlockIndex, build_block_index, build_key_index, choose_rows_per_tile
from .block_sparse_attention import block_sparse_attention
from .block_sparse_backward import block_sparse_attention_trainable, block_sparse_backward
from .pooled_attention import attention, pooled_attention

__all__ = [
    "attention",
    "pooled_attention",
    "block_sparse_attention",
    "block_sparse_attention_trainable",
    "block_sparse_backward",
    "build_key_index",
    "BlockIndex",
    "build_block_index",
    "choose_rows_per_tile",
]
