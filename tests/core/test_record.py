"""The attention recorder: recorded probabilities equal an eager run's, recording changes nothing,
rows under compression equal a masked full cache, teacher forcing equals generation, traces on disk."""

import json
from contextlib import ExitStack

import pytest
import torch
from reference import visible_prompt
from tiny_models import FAMILIES, tiny_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import snapkv
from snapkv.core import compat
from snapkv.core.record import Recorder, estimate_trace_bytes, record_teacher_forced
from snapkv.core.trace import Trace

PROMPT, WINDOW, NEW = 40, 8, 6
SNAP = snapkv.SnapKV(window_size=WINDOW, max_capacity_prompt=20, kernel_size=3)
ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def qwen3():
    return tiny_model("qwen3")


def prompt_ids(batch=2, length=PROMPT, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths=(PROMPT, PROMPT - 7)):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        ids[i, width - length :] = prompt_ids(1, length, seed=10 + i)[0]
        mask[i, width - length :] = 1
    return ids, mask


def greedy(model, ids, steps=NEW, **kwargs):
    return model.generate(ids, max_new_tokens=steps, do_sample=False, **kwargs)


def eager_generate(model, ids, steps=NEW, **kwargs):
    model.set_attn_implementation("eager")
    try:
        return model.generate(ids, max_new_tokens=steps, do_sample=False, output_attentions=True,
                              return_dict_in_generate=True, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")


def eager_rows(attentions, layer, prompt_length):
    """Eager decoding steps -> (batch, heads, steps, prompt_length) rows and mass on generated tokens.
    A sliding-window cache holds only the last slots: slot i of a step with `slots` keys is position
    total - slots + i."""
    rows, masses = [], []
    for step, per_layer in enumerate(attentions[1:]):
        probs = per_layer[layer][:, :, -1]
        total = prompt_length + step + 1
        full = torch.zeros(*probs.shape[:2], total)
        full[..., total - probs.shape[-1] :] = probs
        rows.append(full[..., :prompt_length])
        masses.append(full[..., prompt_length:].sum(-1))
    return torch.stack(rows, 2), torch.stack(masses, 2)


def assert_matches_eager(trace, out, prompt_length, window=WINDOW, rtol=0.0):
    """The trace's window and decoding rows equal eager attention's, to ATOL (and `rtol` for the decoding rows)."""
    for layer in trace.layers:
        prefill = out.attentions[0][layer]
        expected = prefill[:, :, prompt_length - window : prompt_length, :prompt_length]
        assert torch.allclose(trace.observation_attention(layer), expected, atol=ATOL, rtol=0), layer
        rows, mass = eager_rows(out.attentions, layer, prompt_length)
        assert torch.allclose(trace.generation_attention(layer), rows, atol=ATOL, rtol=rtol), layer
        assert torch.allclose(trace.generated_mass(layer), mass, atol=ATOL, rtol=rtol), layer


# -- exactness against eager attention ---------------------------------------------------------------
def test_recorded_rows_equal_eager_probabilities(model):
    ids, mask = left_padded()
    out = eager_generate(model, ids, attention_mask=mask)
    with snapkv.record(model, window_size=WINDOW) as rec:
        tokens = greedy(model, ids, attention_mask=mask)
    assert torch.equal(tokens, out.sequences)
    trace = rec.trace
    assert trace.layers == list(range(model.config.num_hidden_layers))
    assert trace.generation_attention(0).shape == (2, model.config.num_attention_heads, NEW - 1, PROMPT)
    assert trace.kept_positions(0) is None and trace.metadata["policy"] is None
    assert torch.equal(trace.input_ids, tokens[:, :-1])  # the last new token is never fed back
    assert trace.pad_lengths.tolist() == [0, 7]
    if model.config.model_type == "gemma3_text":
        assert trace.metadata["sliding_layers"] == [0, 2]  # sliding-window layers are recorded too
    assert_matches_eager(trace, out, PROMPT)
    # rows sum to one over prompt + generated tokens; padding gets nothing
    total = trace.generation_attention(1).sum(-1) + trace.generated_mass(1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert trace.generation_attention(1)[1, :, :, :7].abs().max() == 0
    assert trace.observation_attention(1, row=1).shape == (model.config.num_attention_heads, WINDOW, PROMPT - 7)


def test_left_padded_rows_equal_rows_recorded_alone(qwen3):
    ids, mask = left_padded()
    with snapkv.record(qwen3, window_size=WINDOW) as rec:
        batched = greedy(qwen3, ids, attention_mask=mask)
    for row in range(2):
        alone_ids = ids[row : row + 1, mask[row].bool()]
        with snapkv.record(qwen3, window_size=WINDOW) as alone:
            tokens = greedy(qwen3, alone_ids)
        assert torch.equal(tokens[0, alone_ids.shape[1] :], batched[row, PROMPT:])
        for layer in rec.trace.layers:
            for getter in ("observation_attention", "generation_attention", "generated_mass"):
                mine = getattr(rec.trace, getter)(layer, row=row)
                assert torch.allclose(mine, getattr(alone.trace, getter)(layer)[0], atol=1e-5, rtol=0), getter


# -- recording changes nothing -----------------------------------------------------------------------
@pytest.mark.parametrize("nesting", ["record", "compress>record", "record>compress"])
def test_recording_changes_no_output(model, nesting):
    ids = prompt_ids()

    def run(*contexts):
        with ExitStack() as stack:
            entered = [stack.enter_context(context) for context in contexts]
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores, 1), entered

    if nesting == "record":
        plain_tokens, plain_logits, _ = run()
        tokens, logits, (recorder,) = run(snapkv.record(model, window_size=WINDOW))
    else:
        plain_tokens, plain_logits, _ = run(snapkv.compress(model, SNAP))
        contexts = [snapkv.compress(model, SNAP), snapkv.record(model, window_size=WINDOW)]
        tokens, logits, entered = run(*(contexts if nesting == "compress>record" else contexts[::-1]))
        recorder = next(e for e in entered if isinstance(e, Recorder))
        assert recorder.trace.metadata["policy"] == repr(SNAP)
    assert torch.equal(tokens, plain_tokens)
    assert torch.allclose(logits, plain_logits, atol=1e-5, rtol=0)
    assert recorder.trace.generated == NEW - 1
    assert model.config._attn_implementation == "sdpa"


def test_nesting_order_records_the_same_trace(qwen3):
    ids, mask = left_padded()
    with snapkv.compress(qwen3, SNAP) as session, snapkv.record(qwen3, window_size=WINDOW) as inner:
        greedy(qwen3, ids, attention_mask=mask)
    for layer, kept in session.kept_positions.items():  # the session counts from each row's first real token
        for row in range(2):
            assert torch.equal(inner.trace.kept_positions(layer, row=row), kept[row][kept[row] >= 0].view(2, -1))
    with snapkv.record(qwen3, window_size=WINDOW) as outer, snapkv.compress(qwen3, SNAP):
        greedy(qwen3, ids, attention_mask=mask)
    assert set(inner.trace.tensors) == set(outer.trace.tensors)
    for name, tensor in inner.trace.tensors.items():
        assert torch.equal(tensor, outer.trace.tensors[name]), name


# -- under compression: rows equal a full cache with the evicted positions masked out ----------------
PROBE: dict = {"visible": {}, "rows": {}}


def masked_probe_attention(module, query, key, value, attention_mask, **kwargs):
    """Full-cache attention that, on decoding steps, hides the positions the compressed cache evicted
    (per query head) and records the float32 probabilities it used."""
    visible = PROBE["visible"].get(module.layer_idx)
    if query.shape[-2] != 1 or visible is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    allowed = torch.ones(query.shape[0], query.shape[1], 1, key.shape[-2], dtype=torch.bool)
    allowed[..., : visible.shape[-1]] = visible[:, :, None, :]
    logits = (query.float() @ key.float().transpose(2, 3)) * kwargs["scaling"]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    PROBE["rows"].setdefault(module.layer_idx, []).append(probs[:, :, 0])  # (batch, heads, prompt + generated)
    return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register("record_masked_probe", masked_probe_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("record_masked_probe", sdpa_mask)


@pytest.mark.parametrize("policy", [SNAP, snapkv.SnapKV(window_size=WINDOW, max_capacity_prompt=20, gqa="expand"),
                                    snapkv.StreamingLLM(max_capacity_prompt=16),
                                    snapkv.AdaKV(window_size=WINDOW, max_capacity_prompt=20, kernel_size=3),
                                    snapkv.PyramidKV(window_size=WINDOW, max_capacity_prompt=20, kernel_size=3),
                                    snapkv.ChunkKV(window_size=WINDOW, max_capacity_prompt=20, chunk_size=4)],
                         ids=["mean", "expand", "streaming", "adakv", "pyramidkv", "chunkkv"])
def test_compressed_rows_equal_masked_full_cache(model, policy):
    ids = prompt_ids()
    with snapkv.compress(model, policy), snapkv.record(model, window_size=WINDOW) as rec:
        tokens = greedy(model, ids)
    trace = rec.trace
    heads = model.config.num_attention_heads
    compressed = trace.metadata["compressed_layers"]
    assert compressed, "nothing was compressed"
    PROBE["visible"].clear(), PROBE["rows"].clear()
    for layer in compressed:
        kept = trace.kept_positions(layer)
        PROBE["visible"][layer] = visible_prompt(kept, PROMPT).repeat_interleave(heads // kept.shape[1], dim=1)
    model.set_attn_implementation("record_masked_probe")
    try:
        cache = model(tokens[:, :PROMPT], use_cache=True).past_key_values
        for i in range(NEW - 1):
            cache = model(tokens[:, PROMPT + i : PROMPT + i + 1], past_key_values=cache, use_cache=True).past_key_values
    finally:
        model.set_attn_implementation("sdpa")
    for layer in compressed:
        steps = PROBE["rows"][layer]
        rows = trace.generation_attention(layer)
        evicted = ~PROBE["visible"][layer][:, :, None, :].expand_as(rows)
        assert rows[evicted].abs().max() == 0
        assert torch.allclose(rows, torch.stack([s[..., :PROMPT] for s in steps], 2), atol=ATOL, rtol=0)
        mass = torch.stack([s[..., PROMPT:].sum(-1) for s in steps], 2)
        assert torch.allclose(trace.generated_mass(layer), mass, atol=ATOL, rtol=0)
    PROBE["visible"].clear(), PROBE["rows"].clear()


# -- teacher forcing ---------------------------------------------------------------------------------
def test_teacher_forced_rows_equal_generated_rows(model):
    ids, mask = left_padded()
    with snapkv.record(model, window_size=WINDOW) as rec:
        tokens = greedy(model, ids, attention_mask=mask)
    forced = record_teacher_forced(model, ids, tokens[:, PROMPT:], window_size=WINDOW, attention_mask=mask,
                                   block_size=4)
    generated = rec.trace
    assert forced.metadata["mode"] == "teacher_forced" and forced.generated == NEW
    assert torch.equal(forced.input_ids, tokens)
    for layer in generated.layers:
        assert torch.allclose(forced.observation_attention(layer), generated.observation_attention(layer),
                              atol=ATOL, rtol=0)
        assert torch.allclose(forced.generation_attention(layer)[:, :, : NEW - 1],
                              generated.generation_attention(layer), atol=ATOL, rtol=0)
        assert torch.allclose(forced.generated_mass(layer)[:, :, : NEW - 1], generated.generated_mass(layer),
                              atol=ATOL, rtol=0)


def test_teacher_forced_without_response_or_generation(qwen3):
    ids = prompt_ids(1, 6)
    trace = record_teacher_forced(qwen3, ids, ids[:, :0], window_size=WINDOW)
    assert trace.observation_attention(0).shape == (1, 4, 6, 6)  # the window is cut to the prompt
    assert trace.generation_attention(0).shape == (1, 4, 0, 6) and trace.generated == 0
    trace = record_teacher_forced(qwen3, ids, prompt_ids(1, 3), window_size=2, generation=False)
    assert sorted(trace.tensors) == sorted([f"observation.{layer}" for layer in range(3)]
                                           + ["input_ids", "attention_mask"])
    with pytest.raises(ValueError, match="generation=False"):
        trace.generation_attention(0)


@pytest.mark.parametrize("cached", [20, PROMPT - WINDOW])  # gemma3's sliding window (16) is shorter than both
def test_teacher_forcing_after_a_cached_prefix_records_the_same(model, cached):
    ids, response = prompt_ids(1), prompt_ids(1, NEW, seed=3)
    whole = record_teacher_forced(model, ids, response, window_size=WINDOW)
    cache = compat.new_cache(model)
    with torch.no_grad():
        compat.prefill(model, ids[:, :cached], cache)
    continued = record_teacher_forced(model, ids, response, window_size=WINDOW, cache=cache, block_size=4)
    assert cache.get_seq_length() == cached  # the caller's cache is left as it was
    assert torch.equal(continued.input_ids, whole.input_ids) and continued.generated == NEW
    for layer in whole.layers:
        for read in ("observation_attention", "generation_attention", "generated_mass"):
            assert torch.allclose(getattr(continued, read)(layer), getattr(whole, read)(layer), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="observation window"):
        record_teacher_forced(model, ids, response, window_size=PROMPT - cached + 1, cache=cache)


@pytest.mark.parametrize("length", [60, 2 * 16 + 1])  # 33: the last chunk of 16 is a single token
def test_chunked_prefill_records_the_same(qwen3, length):
    ids = prompt_ids(length=length)
    if not torch.equal(greedy(qwen3, ids), greedy(qwen3, ids, prefill_chunk_size=16)):
        pytest.skip("this transformers release's own chunked prefill changes the output (seen in 5.2)")
    with snapkv.record(qwen3, window_size=WINDOW) as whole:
        greedy(qwen3, ids)
    with snapkv.record(qwen3, window_size=WINDOW, prefill_chunk_size=16) as chunked:
        greedy(qwen3, ids)
    assert chunked.trace.prompt_length == length and chunked.trace.generated == whole.trace.generated
    for name, tensor in whole.trace.tensors.items():
        assert torch.allclose(tensor.float(), chunked.trace.tensors[name].float(), atol=ATOL, rtol=0), name


def test_forward_records_the_observation_window_and_each_prompt_gets_a_trace(qwen3):
    with snapkv.record(qwen3, window_size=WINDOW, generation=False) as rec:
        qwen3(prompt_ids(1, 30))
        greedy(qwen3, prompt_ids(1, 20, seed=3), steps=3)
    first, second = rec.traces
    assert first.metadata["mode"] == "forward" and first.generated == 0
    assert first.observation_attention(0).shape == (1, 4, WINDOW, 30)
    assert second.metadata["mode"] == "generate" and second.prompt_length == 20
    assert "generation.0" not in second.tensors


# -- reducers ----------------------------------------------------------------------------------------
def test_reducers_keep_what_they_say(qwen3):
    ids = prompt_ids()
    with snapkv.record(qwen3, window_size=WINDOW) as raw:
        greedy(qwen3, ids, steps=8)
    with snapkv.record(qwen3, window_size=WINDOW, reducer="window_sum", reduce_window=3) as sums:
        greedy(qwen3, ids, steps=8)
    with snapkv.record(qwen3, window_size=WINDOW, reducer="topk", top_k=5) as top:
        greedy(qwen3, ids, steps=8)
    assert sums.trace.window_token_counts.tolist() == [3, 3, 1]
    for layer in raw.trace.layers:
        rows = raw.trace.generation_attention(layer)
        expected = torch.stack([rows[:, :, i : i + 3].sum(2) for i in range(0, 7, 3)], 2)
        assert torch.allclose(sums.trace.generation_window_sums(layer), expected, atol=1e-6, rtol=0)
        positions, values = top.trace.generation_topk(layer)
        assert positions.shape == (2, 4, 7, 5) and positions.dtype == torch.long
        assert torch.allclose(values, rows.topk(5, dim=-1).values, atol=1e-6, rtol=0)
        assert torch.allclose(rows.gather(-1, positions), values, atol=1e-6, rtol=0)
        for reduced in (sums.trace, top.trace):
            assert torch.equal(reduced.generated_mass(layer), raw.trace.generated_mass(layer))
            assert torch.equal(reduced.observation_attention(layer), raw.trace.observation_attention(layer))
    with pytest.raises(ValueError, match="reducer='window_sum', which does not keep the generated rows"):
        sums.trace.generation_attention(0)
    with pytest.raises(ValueError, match="use generation_topk"):
        top.trace.generation_attention(0)
    with pytest.raises(ValueError, match="needs a trace recorded with reducer='topk'"):
        raw.trace.generation_topk(0)


# -- memory guard ------------------------------------------------------------------------------------
def forward_counter(model):
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_over_budget_fails_before_any_forward(qwen3):
    ids = prompt_ids()
    need = estimate_trace_bytes(layers=3, heads=4, batch=2, prompt_length=PROMPT, window_size=WINDOW,
                                generated=99)["total"]
    calls, handle = forward_counter(qwen3)
    try:
        over = rf"needs about {need:,} bytes.*max_bytes.*window_size.*generation=False"
        with pytest.raises(ValueError, match=over), \
                snapkv.record(qwen3, window_size=WINDOW, max_bytes=need - 1, max_new_tokens=100):
            greedy(qwen3, ids, steps=100)
        with pytest.raises(ValueError, match="reducer='window_sum'"):
            record_teacher_forced(qwen3, ids, prompt_ids(2, 100), window_size=WINDOW, max_bytes=need - 1)
        assert calls == []
        # the same budget holds with a reducer that keeps less
        with snapkv.record(qwen3, window_size=WINDOW, max_bytes=need - 1, max_new_tokens=100,
                           reducer="window_sum") as rec:
            greedy(qwen3, ids, steps=3)
        assert rec.trace.generation_window_sums(0).shape == (2, 4, 1, PROMPT)
    finally:
        handle.remove()


def test_budget_is_enforced_during_decoding_when_max_new_tokens_was_not_given(qwen3):
    ids = prompt_ids()
    budget = estimate_trace_bytes(layers=3, heads=4, batch=2, prompt_length=PROMPT, window_size=WINDOW,
                                  generated=3)["total"]
    with pytest.raises(ValueError, match="recording generated token 4 .* Pass max_new_tokens="), \
            snapkv.record(qwen3, window_size=WINDOW, max_bytes=budget) as rec:
        greedy(qwen3, ids, steps=10)
    assert rec.traces[-1].generated == 3  # what fitted is kept
    assert qwen3.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kwargs,error,match", [
    ({"reducer": "median"}, ValueError, "reducer must be one of"),
    ({"window_size": 0}, ValueError, "window_size must be >= 1"),
    ({"window_size": 8.0}, TypeError, "window_size must be an int"),
    ({"top_k": 0}, ValueError, "top_k must be >= 1"),
    ({"generation": "yes"}, TypeError, "generation must be True or False"),
    ({"prefill_chunk_size": 1}, ValueError, "prefill_chunk_size must be >= 2"),
])
def test_bad_record_settings_are_rejected(qwen3, kwargs, error, match):
    with pytest.raises(error, match=match), snapkv.record(qwen3, **kwargs):
        pass
    assert qwen3.config._attn_implementation == "sdpa"


def test_right_padding_is_rejected_before_any_forward(qwen3):
    ids, mask = prompt_ids(), torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, -3:] = 0
    calls, handle = forward_counter(qwen3)
    try:
        with pytest.raises(ValueError, match="pads on the right"), snapkv.record(qwen3, window_size=WINDOW):
            qwen3(ids, attention_mask=mask)
    finally:
        handle.remove()
    assert calls == []


# -- traces on disk ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(qwen3):
    ids, mask = left_padded()
    with snapkv.compress(qwen3, SNAP), snapkv.record(qwen3, window_size=WINDOW) as rec:
        greedy(qwen3, ids, attention_mask=mask)
    return rec.trace


def test_save_load_round_trip(recorded, tmp_path):
    recorded.save(tmp_path / "trace")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]  # no staging folder left
    loaded = Trace.load(tmp_path / "trace")
    assert loaded.metadata == recorded.metadata
    assert set(loaded.tensors) == set(recorded.tensors)
    for name, tensor in recorded.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor) and loaded.tensors[name].dtype == tensor.dtype, name
    meta = loaded.metadata
    assert meta["format_version"] == 1 and meta["window_size"] == WINDOW and meta["reducer"] == "raw"
    assert meta["policy"] == repr(SNAP) and meta["torch_version"] == torch.__version__
    assert loaded.kept_positions(1, row=1).min() >= 0
    with pytest.raises(FileExistsError, match="overwrite=True"):
        recorded.save(tmp_path / "trace")
    recorded.save(tmp_path / "trace", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]


def test_text_and_tokenizer_metadata(qwen3):
    class Tokenizer:
        name_or_path = "toy-tokenizer"

        def decode(self, ids):
            return " ".join(map(str, ids))

    ids, mask = left_padded()
    with snapkv.record(qwen3, window_size=WINDOW, tokenizer=Tokenizer()) as rec:
        greedy(qwen3, ids, attention_mask=mask, steps=2)
    text = rec.trace.text
    assert rec.trace.metadata["tokenizer"] == "toy-tokenizer"
    assert len(text) == 2 and len(text[1].split()) == PROMPT - 7 + 1


def test_load_errors_say_what_is_wrong(recorded, tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace folder"):
        Trace.load(tmp_path / "absent")
    path = recorded.save(tmp_path / "trace")
    tensors = path / "tensors.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Trace.load(path)
    tensors.unlink()
    with pytest.raises(FileNotFoundError, match="tensors.safetensors is missing"):
        Trace.load(path)
    path = recorded.save(tmp_path / "trace", overwrite=True)
    meta = json.loads((path / "metadata.json").read_text())
    meta["format_version"] = 99
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99.*reads format_version 1"):
        Trace.load(path)
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Trace.load(path)
    with pytest.raises(ValueError, match="layer 7 was not recorded"):
        recorded.observation_attention(7)


# -- the real model ----------------------------------------------------------------------------------
def chat_ids(tokenizer, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


SMOL_QUESTION = ("The capital of France is Paris and the capital of Italy is Rome. A list of numbers: 3, 14, 15, 92, "
                 "65, 35, 89, 79. Which city is the capital of Italy? Answer in one short sentence.")


@pytest.mark.slow
def test_smollm_recorded_rows_equal_eager_probabilities(smollm):
    model, tokenizer = smollm
    ids = chat_ids(tokenizer, SMOL_QUESTION)
    n = ids.shape[1]
    out = eager_generate(model, ids)
    with snapkv.record(model, window_size=16, tokenizer=tokenizer) as rec:
        tokens = greedy(model, ids)
    assert torch.equal(tokens, out.sequences)
    assert rec.trace.metadata["model_id"] == model.config._name_or_path
    assert rec.trace.text[0].startswith("<|im_start|>")
    assert_matches_eager(rec.trace, out, n, window=16)


@pytest.mark.slow
def test_smollm_recording_changes_nothing_and_teacher_forcing_matches(smollm):
    model, tokenizer = smollm
    ids = chat_ids(tokenizer, SMOL_QUESTION)
    n = ids.shape[1]
    policy = snapkv.SnapKV(window_size=16, max_capacity_prompt=48, kernel_size=5)
    assert n > 48
    plain = greedy(model, ids, steps=12)
    with snapkv.record(model, window_size=16) as rec:
        recorded = greedy(model, ids, steps=12)
    assert torch.equal(plain, recorded)
    with snapkv.compress(model, policy):
        compressed = greedy(model, ids, steps=12)
    with snapkv.record(model, window_size=16) as rec_c, snapkv.compress(model, policy):
        compressed_recorded = greedy(model, ids, steps=12)
    assert torch.equal(compressed, compressed_recorded)
    kept = rec_c.trace.kept_positions(0)
    assert kept.shape == (1, 3, 48)
    evicted = torch.ones(1, 3, n, dtype=torch.bool).scatter_(2, kept, False).repeat_interleave(3, dim=1)
    rows = rec_c.trace.generation_attention(0)
    assert rows[evicted[:, :, None, :].expand_as(rows)].abs().max() == 0
    forced = record_teacher_forced(model, ids, plain[:, n:], window_size=16)
    steps = rec.trace.generated
    assert steps == plain.shape[1] - n - 1 and forced.generated == steps + 1
    for layer in rec.trace.layers:
        assert torch.allclose(forced.generation_attention(layer)[:, :, :steps], rec.trace.generation_attention(layer),
                              atol=ATOL, rtol=0)
        assert torch.allclose(forced.observation_attention(layer), rec.trace.observation_attention(layer),
                              atol=ATOL, rtol=0)


def test_prefill_holds_only_the_window_of_queries(qwen3):
    # a slice of the prompt's queries would keep all of them alive while the prompt is recorded
    with snapkv.record(qwen3, window_size=WINDOW) as rec:
        qwen3(prompt_ids(1), use_cache=True)
        windows = list(rec._prompt.query_window.values())
    assert windows and all(w.shape[-2] == WINDOW for w in windows)
    assert all(w.untyped_storage().nbytes() == w.numel() * w.element_size() for w in windows)
