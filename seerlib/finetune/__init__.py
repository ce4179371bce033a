"""Fine-tuning with sparsity in the loop (SeerAttention's long-context fine-tune, §4 of
SEERATTENTION.md): the model trains on long text windows with the LM loss while its attention
runs through the gate's block selection and the block-sparse kernel, and the gate trains on the
distillation loss, both in one step.

Per training window:
- the forward runs through `sparsify(model, config, gates=...)` (attention "sparse": the gate's
  selection on detached logits, then `ops.block_sparse_attention`, differentiable on every
  backend: the Triton backward on CUDA, the torch reference on CPU) or through the model's own
  attention (attention "dense", the dense fine-tune to compare with dense-then-distill). The
  selection itself (top-k indices) has no gradient: the LM loss trains the model only.
- the gate loss, as `seerlib.distill` computes it: per layer KL(target ‖ softmax(gate logits)),
  first quarter of query-block rows left out, summed over layers. The gate reads the layer's
  pre-RoPE Q/K, detached; the target is the row-normalized max-pooled attention map of the
  *current* model's post-RoPE Q/K, detached (`ops.pooled_attention`, or `metrics.block_maps`
  exact). Computing it costs one dense attention pass per layer on top of the sparse forward
  (it is skipped when the gate is frozen). The two losses share no graph (the gate's inputs are
  detached), so their sum needs no weighting; each part has its own learning rate.
- `train`: "model", "gate" or "both"; the frozen part gets no gradient and no optimizer state.
  "gate" with attention "dense" is online distillation on the model as it is (e.g. on the YaRN
  model at 32k, which the feature cache of `seerlib.distill` does not extend).
- precision "amp": fp32 weights (AdamW's master copy) under bf16 autocast, the attention inputs
  cast to bf16 so that the Triton kernels take them; "fp32": no autocast. Gradient checkpointing
  (`gradient_checkpointing=True`) recomputes each decoder layer in the backward pass, through
  the same attention path (the selection is recomputed from the same gate, so it is the same
  blocks); the sparsity stats are read before the backward, so recomputation is not counted.

Outputs of the CLI (`python -m seerlib.finetune`): the gates (`seerlib.io.save_gates`, config
hash of the extended model), the model's changed tensors as a diff against the base
(`seerlib.finetune.diff`: base sha256, config hash, YaRN factor, steps; atomic), and a loss log
(jsonl: LM loss, gate loss per layer and summed, achieved density, tokens/s, eval LM loss). An
earlier run's files are never replaced unless `--resume` continues that run.

A run can span several calls: `--checkpoint-every N` writes `<out>.ckpt.safetensors`
(`seerlib.finetune.checkpoint`: the trained tensors, the AdamW and LR-scheduler state, the step,
the generator states, the loss log's length, the run's options) every N steps and at the end;
`--resume` (with the same `--out` and options; `--steps` may grow) continues from it, bit for bit:
the loss log is appended to (the lines of steps after the checkpoint, which run again, dropped)
and the final gates and model diff are those of an uninterrupted run.

Modules: `train` (FinetuneConfig, FineTuner), `diff` (model diffs), `checkpoint` (resumable
runs), `cli` (`main`).
"""

from seerlib.finetune.checkpoint import load_finetune_checkpoint, save_finetune_checkpoint
from seerlib.finetune.cli import main
from seerlib.finetune.diff import apply_model_diff, base_snapshot, changed_tensors, save_model_diff
from seerlib.finetune.train import FinetuneConfig, FineTuner

__all__ = ["FineTuner", "FinetuneConfig", "apply_model_diff", "base_snapshot", "changed_tensors",
           "load_finetune_checkpoint", "main", "save_finetune_checkpoint", "save_model_diff"]
