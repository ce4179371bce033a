"""Self-distillation of the gates from the model's own attention (SEERATTENTION.md §4).

The base model is frozen and neither the gates' inputs (pre-RoPE Q, K) nor their target (the pooled
attention map of post-RoPE Q, K) depend on the gates, so the model runs once per text window:
`build_cache` stores, per window and layer, the block-pooled Q/K features (avg, max and min, so any
pooling config trains from one cache) and the pooled attention map. Training then runs over the
cache for as many epochs as needed, with no model in the loop.

- Loss per layer: KL(row-normalized pooled map ‖ softmax(gate logits)) averaged over batches, heads
  and query-block rows, the first quarter of the rows left out; summed over layers.
- AdamW (no weight decay), linear warm-up then cosine decay; only gate parameters train.
- `Distiller(...).steps()` yields one metrics dict per step (a notebook can draw them live); the CLI
  `python -m seerlib.distill` runs the same loop single-process or under `torchrun`
  (DistributedDataParallel, gloo on CPU, NCCL on GPU), with checkpoints and `--resume`.
- A run that diverges (a non-finite loss or gradient) stops with `DivergedError` before the step
  is applied; the CLI then exits non-zero and saves nothing.
- The CLI writes to a fresh timestamped path unless `--out` is given, and never replaces or empties
  an earlier run's files (gates, checkpoint, loss log) unless told to continue it (`--resume`).

Ground-truth sources and the cache of per-window features and targets: `seerlib.targets`.
Modules: `train` (DistillConfig, Distiller), `cli` (`main`, argument types, the tiny model).
"""

from seerlib.distill.cli import (
    default_out,
    int_at_least,
    main,
    number_in,
    refuse_earlier_run,
    tiny_config,
    tiny_model,
)
from seerlib.distill.train import (
    TINY_MODEL,
    DistillConfig,
    Distiller,
    DivergedError,
    lr_lambda,
    window_order,
)

__all__ = ["TINY_MODEL", "DistillConfig", "DivergedError", "Distiller", "default_out",
           "int_at_least", "lr_lambda", "main", "number_in", "refuse_earlier_run", "tiny_config",
           "tiny_model", "window_order"]
