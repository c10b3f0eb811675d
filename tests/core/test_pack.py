"""KV packs on tiny random decoders: exactness against recomputing, the disk round trip and every error path."""

import importlib
import json

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

import snapkv
from snapkv.core import compat
from snapkv.core.cache import CompressedLayer

pack_module = importlib.import_module("snapkv.core.pack")  # `snapkv.core.pack` is the function
trace_module = importlib.import_module("snapkv.core.trace")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest

CONTEXT, STEPS = 60, 6
POLICIES = [
    snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3),
    snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3, gqa="expand"),
    snapkv.H2O(max_capacity_prompt=20, window_size=8),
    snapkv.StreamingLLM(max_capacity_prompt=20),
    snapkv.PyramidKV(window_size=8, max_capacity_prompt=24, kernel_size=3, beta=4),
    snapkv.AdaKV(window_size=8, max_capacity_prompt=24, kernel_size=3),  # ragged: heads keep different counts
]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def ids(length, batch=1, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(generate, input_ids, **kwargs):
    out = generate(input_ids, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                   return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def in_session(model, policy, context, question, *, chunk_size=None):
    """The reference of a compressed pack: the policy's own session prefills the context, compresses at its end
    (`compress_before_next_forward`), then `generate` runs on context + question."""
    cache = compat.new_cache(model)
    with snapkv.compress(model, policy, prefill_chunk_size=chunk_size) as session:
        compat.prefill(model, context, cache, chunk_size=chunk_size)
        session.compress_before_next_forward()
        return greedy(lambda i, **kw: compat.generate(model, i, cache, **kw), torch.cat([context, question], 1))


def layer_tensors(cache):
    return [{name: t.clone() for name, t in pack_module.layer_state(layer)[1].items()} for layer in cache.layers]


# -- exactness ------------------------------------------------------------------------------------------------
def test_full_pack_equals_recomputing_and_never_changes(model):
    context = ids(CONTEXT)
    packed = snapkv.pack(model, context)
    before = layer_tensors(packed.cache)
    for seed in range(3):
        question = ids(5 + seed, seed=seed + 1)
        tokens, logits = greedy(model.generate, torch.cat([context, question], 1))
        tokens_p, logits_p = greedy(packed.generate, question)
        assert torch.equal(tokens, tokens_p)
        assert torch.allclose(logits, logits_p, atol=1e-5, rtol=0)
    after = layer_tensors(packed.cache)
    assert all(torch.equal(a[name], b[name]) for a, b in zip(before, after) for name in a)
    assert packed.context_length == CONTEXT and packed.cache.get_seq_length() == CONTEXT and not packed.compressed


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p)[:40])
def test_compressed_pack_equals_policy_in_session(model, policy):
    context, question = ids(CONTEXT), ids(7, seed=1)
    packed = snapkv.pack(model, context, policy)
    assert packed.compressed and packed.policy == policy
    tokens, logits = in_session(model, policy, context, question)
    tokens_p, logits_p = greedy(packed.generate, question)
    assert torch.equal(tokens, tokens_p)
    assert torch.allclose(logits, logits_p, atol=1e-5, rtol=0)
    again, _ = greedy(packed.generate, question)  # the pack is unchanged by a question
    assert torch.equal(again, tokens_p)


@pytest.mark.parametrize("policy", POLICIES[:3], ids=lambda p: repr(p)[:40])
def test_chunked_prefill_pack_equals_the_session_in_chunks_and_in_one_forward(llama, policy):
    context, question = ids(CONTEXT), ids(4, seed=2)
    packed = snapkv.pack(llama, context, policy, prefill_chunk_size=16)
    tokens_p, logits_p = greedy(packed.generate, question)
    for chunk_size in (16, None):
        tokens, logits = in_session(llama, policy, context, question, chunk_size=chunk_size)
        assert torch.equal(tokens, tokens_p)
        assert torch.allclose(logits, logits_p, atol=1e-5, rtol=0)
    whole = snapkv.pack(llama, context, policy)
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(packed.cache.layers, whole.cache.layers))


def test_compressed_pack_keeps_budget_slots_with_their_positions(llama):
    policy = POLICIES[0]
    packed = snapkv.pack(llama, ids(CONTEXT), policy)
    for layer in packed.cache.layers:
        assert isinstance(layer, CompressedLayer) and layer.keys.shape[-2] == 24 and layer.appended == 0
        assert layer.prompt_length == CONTEXT and layer.positions.shape == (1, 2, 24)
        assert bool((layer.positions[..., -8:] == torch.arange(CONTEXT - 8, CONTEXT)).all())  # the window is kept
    assert packed.nbytes == 3 * (2 * (2 * 24 * 16 * 4) + 2 * 24 * 8)  # layers x (keys + values, positions)


@pytest.mark.parametrize("policy", [None, POLICIES[0], POLICIES[-1]], ids=["full", "snapkv", "adakv"])
def test_left_padded_question_batch_equals_questions_one_by_one(llama, policy):
    packed = snapkv.pack(llama, ids(CONTEXT), policy)
    questions = [ids(length, seed=10 + length)[0] for length in (3, 7, 5)]
    width = 7
    batch = torch.stack([torch.cat([torch.zeros(width - len(q), dtype=torch.long), q]) for q in questions])
    mask = torch.stack([(torch.arange(width) >= width - len(q)).long() for q in questions])
    tokens, logits = greedy(packed.generate, batch, attention_mask=mask)
    for row, question in enumerate(questions):
        alone, alone_logits = greedy(packed.generate, question[None])
        assert torch.equal(tokens[row, CONTEXT + width - len(question):], alone[0, CONTEXT:])
        assert torch.allclose(logits[row], alone_logits[0], atol=1e-5, rtol=0)


def test_sampling_with_a_seed_equals_recomputing(llama):
    context, question = ids(CONTEXT), ids(5, seed=3)
    packed = snapkv.pack(llama, context)
    torch.manual_seed(7)
    sampled = llama.generate(torch.cat([context, question], 1), max_new_tokens=12, do_sample=True, top_k=0)
    torch.manual_seed(7)
    assert torch.equal(packed.generate(question, max_new_tokens=12, do_sample=True, top_k=0), sampled)


# -- disk ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [None, POLICIES[0], POLICIES[1], POLICIES[-1]],
                         ids=["full", "snapkv", "expand", "adakv-ragged"])
def test_save_and_load_rebuild_the_same_cache(model, policy, tmp_path):
    context, question = ids(CONTEXT), ids(5, seed=5)
    packed = snapkv.pack(model, context, policy)
    path = packed.save(tmp_path / "pack")
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", "tensors.safetensors"]
    loaded = snapkv.KVPack.load(path, model)
    assert [type(layer) for layer in loaded.cache.layers] == [type(layer) for layer in packed.cache.layers]
    for mine, theirs in zip(packed.cache.layers, loaded.cache.layers):
        _, tensors, settings = pack_module.layer_state(mine)
        _, loaded_tensors, loaded_settings = pack_module.layer_state(theirs)
        assert settings == loaded_settings and tensors.keys() == loaded_tensors.keys()
        assert all(torch.equal(tensors[name], loaded_tensors[name]) for name in tensors)
        assert mine.get_seq_length() == theirs.get_seq_length()
    assert torch.equal(loaded.context_ids, context) and loaded.policy == packed.policy
    assert greedy(loaded.generate, question)[0].equal(greedy(packed.generate, question)[0])
    metadata = json.loads((path / "metadata.json").read_text())
    assert metadata["context_length"] == CONTEXT and metadata["context_ids"] == context[0].tolist()
    assert metadata["environment"]["torch_version"] == torch.__version__


def test_a_compressed_layer_class_without_its_own_state_is_refused():
    class Flat(CompressedLayer):
        pass

    layer = Flat(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, dtype=torch.long), 5, 1)
    with pytest.raises(TypeError, match="Flat defines no state"):
        pack_module.layer_state(layer)


def test_save_refuses_an_existing_folder_unless_told(llama, tmp_path):
    packed = snapkv.pack(llama, ids(CONTEXT))
    path = packed.save(tmp_path / "pack")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        packed.save(path)
    snapkv.pack(llama, ids(CONTEXT + 4)).save(path, overwrite=True)
    assert snapkv.KVPack.load(path, llama).context_length == CONTEXT + 4
    assert [p.name for p in tmp_path.iterdir()] == ["pack"]


def test_a_failed_save_leaves_nothing_behind_and_the_old_pack_intact(llama, tmp_path, monkeypatch):
    packed = snapkv.pack(llama, ids(CONTEXT))

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(trace_module, "save_file", write_half_then_fail)  # write_folder's writer
    with pytest.raises(OSError, match="disk full"):
        packed.save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    path = packed.save(tmp_path / "old")
    monkeypatch.setattr(trace_module, "save_file", write_half_then_fail)  # write_folder's writer
    with pytest.raises(OSError, match="disk full"):
        snapkv.pack(llama, ids(CONTEXT + 4)).save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert snapkv.KVPack.load(path, llama).context_length == CONTEXT


# -- load errors ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    return snapkv.pack(llama, ids(CONTEXT), POLICIES[0]).save(tmp_path_factory.mktemp("packs") / "pack")


def copy_of(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_load_into_another_architecture_names_the_differing_config(saved):
    with pytest.raises(ValueError, match=r"another model .*num_key_value_heads \(pack: 2, model: 4\)"):
        config = tiny_model("llama").config
        config.num_key_value_heads = 4
        from transformers import AutoModelForCausalLM

        snapkv.KVPack.load(saved, AutoModelForCausalLM.from_config(config))
    with pytest.raises(ValueError, match="model_type \\(pack: 'llama', model: 'qwen3'\\)"):
        snapkv.KVPack.load(saved, tiny_model("qwen3"))


def test_a_pack_stores_the_one_weights_fingerprint(saved, llama):
    from snapkv.core.environment import weights_fingerprint

    metadata = json.loads((saved / trace_module.METADATA_FILE).read_text())
    assert metadata["model"]["weights_fingerprint"] == weights_fingerprint(llama)


def test_load_into_other_weights_of_the_same_architecture_is_refused(saved):
    with pytest.raises(ValueError, match="same architecture but other weights"):
        snapkv.KVPack.load(saved, tiny_model("llama", seed=1))


def test_load_into_another_dtype_names_both(saved):
    with pytest.raises(ValueError, match="holds float32 keys and values but the model runs in float64: load the "
                                         "model with dtype='float32'"):
        snapkv.KVPack.load(saved, tiny_model("llama").to(torch.float64))


def test_load_refuses_an_unknown_format_version(saved, tmp_path, llama):
    path = copy_of(saved, tmp_path)
    metadata = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps(metadata | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99, but this snapkv reads format_version 1"):
        snapkv.KVPack.load(path, llama)


@pytest.mark.parametrize("name", ["tensors.safetensors", "metadata.json"])
def test_load_of_a_truncated_file_says_so(saved, tmp_path, llama, name):
    path = copy_of(saved, tmp_path)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        snapkv.KVPack.load(path, llama)


def test_load_of_a_missing_or_foreign_folder(saved, tmp_path, llama):
    with pytest.raises(FileNotFoundError, match="no KV pack folder"):
        snapkv.KVPack.load(tmp_path / "absent", llama)
    path = copy_of(saved, tmp_path)
    (path / "tensors.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="tensors.safetensors is missing"):
        snapkv.KVPack.load(path, llama)
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "metadata.json").write_text(json.dumps({"format_version": 1, "layers": [0]}))
    (trace / "tensors.safetensors").write_bytes((saved / "tensors.safetensors").read_bytes())
    with pytest.raises(ValueError, match="is not a KV pack"):
        snapkv.KVPack.load(trace, llama)


class Vocabulary:
    def __init__(self, name, vocab):
        self.name_or_path, self.vocab = name, vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_load_with_another_tokenizer_is_refused(llama, tmp_path):
    mine = Vocabulary("tiny", {f"t{i}": i for i in range(128)})
    path = snapkv.pack(llama, ids(CONTEXT), tokenizer=mine).save(tmp_path / "pack")
    assert snapkv.KVPack.load(path, llama, tokenizer=mine).metadata["tokenizer"]["vocab_size"] == 128
    other = Vocabulary("tiny", {f"t{i}": (i + 1) % 128 for i in range(128)})
    with pytest.raises(ValueError, match="another tokenizer"):
        snapkv.KVPack.load(path, llama, tokenizer=other)


# -- argument errors, before any work ---------------------------------------------------------------------------
def test_pack_arguments_are_checked(llama):
    with pytest.raises(ValueError, match="one context"):
        snapkv.pack(llama, ids(CONTEXT, batch=2))
    with pytest.raises(TypeError, match="LongTensor"):
        snapkv.pack(llama, ids(CONTEXT)[0].tolist())
    with pytest.raises(ValueError, match="integer token ids"):
        snapkv.pack(llama, ids(CONTEXT).float())
    with pytest.raises(ValueError, match="6 tokens but the policy's window_size is 8"):
        snapkv.pack(llama, ids(6), POLICIES[0])
    with pytest.raises(TypeError, match="snapkv policy"):
        snapkv.pack(llama, ids(CONTEXT), "snapkv")
    with pytest.raises(ValueError, match="prefill_chunk_size \\(4\\) must be at least window_size \\(8\\)"):
        snapkv.pack(llama, ids(CONTEXT), POLICIES[0], prefill_chunk_size=4)


def test_generate_arguments_are_checked(llama):
    packed = snapkv.pack(llama, ids(CONTEXT))
    question = ids(4)
    with pytest.raises(TypeError, match="the pack supplies the context"):
        packed.generate(question, past_key_values=compat.new_cache(llama))
    with pytest.raises(ValueError, match="shape \\(1, 3\\) but question_ids \\(1, 4\\)"):
        packed.generate(question, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="pads on the right"):
        packed.generate(ids(4, batch=2), attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="empty"):
        packed.generate(question[:, :0])


def test_padded_questions_on_a_sliding_window_model_are_refused():
    packed = snapkv.pack(tiny_model("gemma3"), ids(CONTEXT))
    with pytest.raises(ValueError, match="sliding-window layers"):
        packed.generate(ids(4, batch=2), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
