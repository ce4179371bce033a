"""Test set-up shared by every test module.

Triton kernels run on a CPU only under its interpreter, which reads TRITON_INTERPRET when triton is
first imported: set it here, before any test module imports torch or triton.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer): the cached SmolLM2-135M-Instruct, loaded once per session."""
    from seerlib.data import load_model

    return load_model()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
