"""Decode-phase sparsity (SeerAttention-R): a decode gate, its selection, teacher-forced
evaluation and generation with the sparse decode kernel.

- `gate`: `DecodeGate` / `DecodeGateSet`, the gate per kv group.
- `select`: `select_decode`, a `seerlib.select.Selection` (token budget `tok=N`, threshold or
  density, forced sink / local blocks) at decode time; `decode_index` for the kernel.
- `methods`: `DECODE_METHODS` (dense, gate, quest, sink_window, oracle), `DecodeConfig`,
  `parse_decode_config`.
- `teacher`: `decode_teacher_forced`, a window in one forward as decode steps would see it.
"""

from .gate import DecodeGate, DecodeGateSet
from .methods import DECODE_METHODS, DecodeConfig, parse_decode_config, register_decode_method
from .select import decode_index, select_decode
from .teacher import decode_teacher_forced

__all__ = [
    "DECODE_METHODS",
    "DecodeConfig",
    "DecodeGate",
    "DecodeGateSet",
    "decode_index",
    "decode_teacher_forced",
    "parse_decode_config",
    "register_decode_method",
    "select_decode",
]
