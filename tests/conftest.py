import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """In-process runs use tiny models: one intra-op thread is faster and avoids oversubscribing a
    small machine. Subprocess tests (kill/resume) keep torch's default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
