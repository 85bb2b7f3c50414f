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


# The slowest files (seconds of one quiet `make test PYTEST_ARGS=--durations=0` each: benchmarks/results/
# suite_time.md), longest first. With --dist loadfile --no-loadscope-reorder (the Makefile's) the workers take
# files in this order, so the files left at the end are short and both workers finish at about the same time.
SLOW_FIRST = ["test_ddp_train.py", "test_rank_death.py", "test_finetune.py", "test_train.py", "test_report.py",
              "test_data.py", "test_methods_common.py", "test_lightning.py", "test_hf_ddp.py", "test_plugins.py",
              "test_sweep_report.py", "test_golden.py", "test_compile_cache.py", "test_finetune_logs.py",
              "test_safety.py", "test_eval_cmd.py", "test_models.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
