import pytest


@pytest.fixture(scope="session")
def smollm():
    """The default model and tokenizer (SmolLM2-135M-Instruct), loaded once per test session."""
    import snapkv

    return snapkv.load_model()
