import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's page and API default to our CPU engine (the measured default, OpenVINO when its venv is built,
# is checked in tests/test_intel_engines.py).
os.environ.setdefault("Q8CHAT_BACKEND", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels are tested in its interpreter here; the switch must be set before any module
    # (the app, the GPU engine) first imports gpu_backend.kernels, or their @jit functions are compiled
    # for a GPU that is not there.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def allow_test_model_folders(tmp_path_factory):
    """Model paths are confined to allowed folders (models.registry); the tests, as the operator, allow the
    temporary folders they write models into."""
    from models.registry import allow_model_dir

    allow_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def embedded_folder():
    """The embedded SmolLM2 converted to BF16 safetensors (once per cache folder)."""
    from models.registry import DEFAULT_MODEL, resolve

    return resolve(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def cpu_engine(embedded_folder):
    """The app's own CPU engine for the embedded model, shared by every test that chats."""
    from models.registry import DEFAULT_MODEL
    from ui.shared import service

    return service.engine("cpu", DEFAULT_MODEL, "bf16")
