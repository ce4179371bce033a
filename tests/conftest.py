"""Test set-up shared by every test module.

Triton kernels run on a CPU only under its interpreter, which reads TRITON_INTERPRET when triton is
first imported: set it here, before any test module imports torch or triton.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The model tests of the integration and evaluation run SmolLM2's first layers only (CI time).
SMALL_LAYERS = 4


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer): the cached SmolLM2-135M-Instruct, loaded once per session."""
    from seerlib.data import load_model

    return load_model()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def small(smollm):
    """(model, tokenizer): a copy of SmolLM2 cut to its first SMALL_LAYERS decoder layers."""
    model = copy.deepcopy(smollm[0])
    model.model.layers = model.model.layers[:SMALL_LAYERS]
    model.config.num_hidden_layers = SMALL_LAYERS
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:SMALL_LAYERS]
    return model, smollm[1]
