"""Exactness contracts of the compression engine, on tiny random decoders of every supported family."""

import pytest
import torch
from reference import masked_decode_logits
from tiny_models import FAMILIES, greedy, prompt_ids, tiny_model
from transformers import AttentionInterface

import snapkv
from snapkv.core import compat
from snapkv.core.cache import ARENA_ALIGN, ARENA_BYTES, CompressedLayer, SlotArena
from snapkv.core.compress import attach
from snapkv.core.hook import snapkv_attention

PROMPT = 60


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


VOTING = (snapkv.SnapKV, snapkv.AdaKV, snapkv.PyramidKV, snapkv.ChunkKV)  # policies with SnapKV's arguments


def test_budget_covering_prompt_changes_nothing(model):
    ids = prompt_ids()
    tokens, logits = greedy(model, ids)
    for kind in VOTING:
        for budget in (PROMPT, PROMPT + 50):
            with snapkv.compress(model, kind(window_size=8, max_capacity_prompt=budget, kernel_size=3)):
                tokens_c, logits_c = greedy(model, ids)
            assert torch.equal(tokens, tokens_c), kind.__name__
            assert torch.allclose(logits, logits_c, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"


# -- contract 2: compressed decoding == full-cache decoding with evicted positions masked out -----------


@pytest.mark.parametrize("policy", [
    snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3, gqa="mean"),
    snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=5, pooling="avgpool", gqa="expand"),
    snapkv.SnapKV(window_size=8, max_capacity_prompt=(20, 30, 40), kernel_size=3, gqa="max"),
    snapkv.StreamingLLM(max_capacity_prompt=20),
    snapkv.RandomEviction(max_capacity_prompt=20, window_size=8),
    snapkv.H2O(max_capacity_prompt=20, window_size=8),
    snapkv.AdaKV(window_size=8, max_capacity_prompt=24, kernel_size=3),
    snapkv.AdaKV(window_size=8, max_capacity_prompt=24, kernel_size=1, gqa="expand", alpha_safeguard=0.0),
    snapkv.PyramidKV(window_size=8, max_capacity_prompt=24, kernel_size=3, beta=4),
    snapkv.ChunkKV(window_size=8, max_capacity_prompt=24, kernel_size=3, chunk_size=5),
], ids=["snapkv-mean", "snapkv-expand-avg", "snapkv-per-layer-max", "streaming", "random", "h2o", "adakv",
        "adakv-expand-nofloor", "pyramidkv", "chunkkv"])
def test_compressed_decoding_equals_masked_full_cache(model, policy):
    ids = prompt_ids()
    with snapkv.compress(model, policy) as session:
        tokens, logits = greedy(model, ids)
    assert session.kept_positions, "nothing was compressed"
    reference = masked_decode_logits(model, tokens, PROMPT, session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-4, rtol=0)


SNAP = snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3)


@pytest.mark.parametrize("policy", [SNAP, snapkv.AdaKV(window_size=8, max_capacity_prompt=24, kernel_size=3),
                                    snapkv.PyramidKV(window_size=8, max_capacity_prompt=24, kernel_size=3, beta=4),
                                    snapkv.ChunkKV(window_size=8, max_capacity_prompt=24, chunk_size=5)],
                         ids=["snapkv", "adakv", "pyramidkv", "chunkkv"])
def test_left_padded_batch_equals_rows_alone(model, policy):
    lengths = (60, 45, 20)  # the last row is shorter than the budget: kept whole, nothing else
    rows = [prompt_ids(1, n, seed=n) for n in lengths]
    width = max(lengths)
    ids = torch.cat([torch.cat([torch.zeros(1, width - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = torch.cat([torch.cat([torch.zeros(1, width - r.shape[1], dtype=torch.long),
                                 torch.ones_like(r)], 1) for r in rows])
    with snapkv.compress(model, policy) as session:
        batched, batched_logits = greedy(model, ids, attention_mask=mask)
        batched_kept = dict(session.kept_positions)
    for i, row in enumerate(rows):
        with snapkv.compress(model, policy) as session:
            alone, alone_logits = greedy(model, row)
        assert torch.equal(batched[i, width:], alone[0, row.shape[1]:])
        assert torch.allclose(batched_logits[i], alone_logits[0], atol=1e-4, rtol=0)
        for layer, kept in batched_kept.items():
            for head, alone_head in zip(kept[i], session.kept_positions[layer][0], strict=True):
                assert torch.equal(head[head >= 0], alone_head[alone_head >= 0])


def test_no_state_leaks_between_calls_or_after_the_block(model):
    first, second = prompt_ids(1, 60, seed=1), prompt_ids(1, 50, seed=2)
    with snapkv.compress(model, SNAP) as session:
        greedy(model, first)
        tokens_second, _ = greedy(model, second)
        kept_second = dict(session.kept_positions)
    with snapkv.compress(model, SNAP) as fresh:
        tokens_fresh, _ = greedy(model, second)
    assert torch.equal(tokens_second, tokens_fresh)
    assert kept_second.keys() == fresh.kept_positions.keys()
    for layer in kept_second:
        assert torch.equal(kept_second[layer], fresh.kept_positions[layer])
    plain, plain_logits = greedy(model, first)
    assert model.config._attn_implementation == "sdpa"
    cache = model(first, use_cache=True).past_key_values
    assert cache.get_seq_length() == 60 and all(layer.keys.shape[-2] <= 60 for layer in cache.layers)


@pytest.mark.parametrize("length", [PROMPT, 2 * 16 + 1])  # 33: the last chunk of 16 is a single token
def test_chunked_prefill_gives_the_same_result(model, length):
    ids = prompt_ids(length=length)
    if not torch.equal(greedy(model, ids)[0], greedy(model, ids, prefill_chunk_size=16)[0]):
        pytest.skip("this transformers release's own chunked prefill changes the output (seen in 5.2)")
    with snapkv.compress(model, SNAP) as whole:
        tokens, logits = greedy(model, ids)
    with snapkv.compress(model, SNAP, prefill_chunk_size=16) as chunked:
        tokens_c, logits_c = greedy(model, ids)
    assert torch.equal(tokens, tokens_c)
    assert torch.allclose(logits, logits_c, atol=1e-4, rtol=0)
    for layer in whole.kept_positions:
        assert torch.equal(whole.kept_positions[layer], chunked.kept_positions[layer])


def test_sampling_under_compression_is_reproducible(model):
    ids = prompt_ids()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        with snapkv.compress(model, SNAP):
            runs.append(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20))
    assert runs[0].shape == (2, PROMPT + 6) and torch.equal(runs[0], runs[1])


def test_manual_forward_loop_compresses_at_first_decoding_step(model):
    ids = prompt_ids(1)
    with snapkv.compress(model, SNAP):
        tokens, logits = greedy(model, ids, steps=3)
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        manual = [out.logits[:, -1]]
        for step in range(2):
            out = model(tokens[:, PROMPT + step : PROMPT + step + 1], past_key_values=cache, use_cache=True)
            manual.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(manual, 1), logits, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == PROMPT + 2  # logical length: rotary positions continue correctly
    assert all(layer.keys.shape[-2] == 24 + 2 for layer, sliding in zip(cache.layers, cache.is_sliding)
               if not sliding)


def test_a_whole_prompt_forward_compresses_each_layer_before_the_next_one_runs(model):
    """One forward of the whole prompt: when a layer's attention runs, every earlier full-attention layer already
    holds only its kept slots (one layer's full cache alive at a time); chunked prefill keeps the full cache
    until the first decoding step. Both give the same kept positions and logits (the contracts above)."""
    ids = prompt_ids(1)
    layers = model.model.layers
    for chunk, compressed_during_prefill in ((None, True), (32, False)):
        cache, seen = compat.new_cache(model), []

        def check(index, cache=cache, seen=seen):
            seen.append([isinstance(cache.layers[j], CompressedLayer) for j in range(index)
                         if j < len(cache.layers) and not cache.is_sliding[j]])

        handles = [layer.register_forward_pre_hook(lambda module, args, i=i: check(i))
                   for i, layer in enumerate(layers)]
        try:
            with torch.no_grad(), snapkv.compress(model, SNAP, prefill_chunk_size=chunk) as session:
                logits = compat.prefill(model, ids, cache, chunk_size=chunk)
                step = compat.forward(model, logits[:, -1:].argmax(-1), cache).logits
        finally:
            for handle in handles:
                handle.remove()
        prefill_views = seen[: len(layers)]
        assert all(all(earlier) == compressed_during_prefill for earlier in prefill_views if earlier)
        assert any(earlier for earlier in prefill_views)  # some layer had earlier full-attention layers
        if chunk is None:
            eager_kept, eager_step = dict(session.kept_positions), step
    assert session.kept_positions.keys() == eager_kept.keys()
    for layer, positions in session.kept_positions.items():
        assert torch.equal(positions, eager_kept[layer])
    assert torch.allclose(eager_step, step, atol=1e-5, rtol=0)


def test_unsupported_attention_raises_instead_of_silently_not_compressing():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="no attention call"):
        with snapkv.compress(model, SNAP):
            model.config._attn_implementation = "eager"  # as if the model ignored the interface
            model.generate(prompt_ids(), max_new_tokens=2, do_sample=False)
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window_size=32, max_capacity_prompt=16), ValueError, r"max_capacity_prompt \(16\) must exceed"),
    (dict(window_size=32, max_capacity_prompt=32), ValueError, "must exceed window_size"),
    (dict(kernel_size=4), ValueError, "kernel_size must be odd"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(pooling="median"), ValueError, "pooling must be one of"),
    (dict(gqa="sum"), ValueError, "gqa must be one of"),
    (dict(max_capacity_prompt=1024.0), TypeError, "max_capacity_prompt must be an int"),
    (dict(max_capacity_prompt=[512, 256.5]), TypeError, "max_capacity_prompt must be an int"),
    (dict(window_size="32"), TypeError, "window_size must be an int"),
])
def test_bad_policy_settings_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        snapkv.SnapKV(**kwargs)


def test_bad_session_input_fails_before_any_model_work():
    model = tiny_model("llama")
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="the prompt has 6 tokens but window_size is 8"):
        with snapkv.compress(model, SNAP):
            model.generate(prompt_ids(1, 6), max_new_tokens=2)
    with pytest.raises(ValueError, match="lists 2 budgets but the model has 3 layers"):
        with snapkv.compress(model, snapkv.SnapKV(window_size=8, max_capacity_prompt=[20, 30])):
            pass
    with pytest.raises(TypeError, match="policy must be a snapkv policy"):
        with snapkv.compress(model, "snapkv"):
            pass
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        with snapkv.compress(model, SNAP, prefill_chunk_size=4):
            pass
    assert calls == []
    assert model.config._attn_implementation == "sdpa"


def test_prefill_holds_only_the_window_of_queries(model):
    # a slice of the prompt's queries would keep all of them alive until compression (memory ~ prompt x layers)
    with snapkv.compress(model, SNAP) as session:
        model(prompt_ids(1), use_cache=True)
        windows = [state.query_window for state in session._layers.values()]
    assert windows and all(w.shape[-2] == SNAP.window_size for w in windows)
    assert all(w.untyped_storage().nbytes() == w.numel() * w.element_size() for w in windows)


def test_a_wrapper_passing_dropout_and_scaling_by_position_works(model):
    # kvpress wraps every registered attention function and passes dropout as the 6th positional argument
    inner = snapkv_attention
    seen = []

    def positional_wrapper(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        seen.append(dropout)
        return inner(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    ids = prompt_ids()
    with snapkv.compress(model, SNAP):
        expected = greedy(model, ids)[0]
    AttentionInterface.register("snapkv", positional_wrapper)
    try:
        with snapkv.compress(model, SNAP):
            assert torch.equal(greedy(model, ids)[0], expected)
    finally:
        AttentionInterface.register("snapkv", inner)
    assert seen


def test_nested_compress_blocks_are_refused(model):
    with snapkv.compress(model, SNAP):
        with pytest.raises(RuntimeError, match="snapkv.compress blocks cannot nest.*Leave the first block"):
            with snapkv.compress(model, snapkv.StreamingLLM(sink_size=4, max_capacity_prompt=24)):
                pass
        tokens = greedy(model, prompt_ids())[0]  # the outer block still works
    assert tokens.shape == (2, PROMPT + 6)
    assert model.config._attn_implementation == "sdpa"


def test_right_padded_batch_is_refused(model):
    ids, mask = prompt_ids(), torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, -5:] = 0
    with pytest.raises(ValueError, match="the attention_mask pads on the right: snapkv.compress needs left padding"):
        with snapkv.compress(model, SNAP):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_fork_starts_a_policy_from_a_shared_prefill(model):
    ids = prompt_ids(1)
    policies = [SNAP, snapkv.StreamingLLM(sink_size=4, max_capacity_prompt=24), snapkv.FullCache()]
    expected = []
    for policy in policies:
        with snapkv.compress(model, policy):
            expected.append(greedy(model, ids, steps=3)[1])
    observer = snapkv.core.CompressionSession(model, snapkv.SnapKV(window_size=8, max_capacity_prompt=9, kernel_size=1),
                                              observe_only=True)
    cache = compat.new_cache(model)
    with torch.no_grad(), attach(model, observer):
        last = compat.prefill(model, ids, cache)
    for policy, logits in zip(policies, expected):
        forked = snapkv.core.copy_cache(cache)
        with torch.no_grad(), attach(model, observer.fork(policy)):
            rows = [last[:, -1]]
            for _ in range(2):
                rows.append(compat.forward(model, rows[-1].argmax(-1, keepdim=True), forked).logits[:, -1])
        assert torch.allclose(torch.stack(rows, 1), logits, atol=1e-4, rtol=0), policy
    assert cache.get_seq_length() == PROMPT  # the shared prefill was not compressed by any fork
    assert all(layer.keys.shape[-2] == PROMPT for layer, sliding in zip(cache.layers, cache.is_sliding) if not sliding)
    with pytest.raises(ValueError, match="kept 8 queries per layer but the policy needs 16"):
        observer.fork(snapkv.SnapKV(window_size=16, max_capacity_prompt=24))
    with pytest.raises(ValueError, match="accumulated_attention, which this session did not record"):
        observer.fork(snapkv.H2O(window_size=8, max_capacity_prompt=24))
    with pytest.raises(RuntimeError, match="nothing to fork"):
        snapkv.core.CompressionSession(model, SNAP).fork(SNAP)


def test_chunk_bounds_never_end_on_a_single_token():
    assert compat.chunk_bounds(0, 33, 16) == [(0, 16), (16, 31), (31, 33)]
    assert compat.chunk_bounds(0, 10, 3) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert compat.chunk_bounds(0, 10, None) == [(0, 10)]
    assert compat.chunk_bounds(4, 12, 4) == [(4, 8), (8, 12)]
    assert compat.chunk_bounds(5, 5, 4) == []
    with pytest.raises(ValueError, match="chunk_size must be >= 2"):
        compat.chunk_bounds(0, 10, 1)


@pytest.mark.parametrize("value, error, match", [
    (3, None, None),
    (0, ValueError, "size must be >= 1, got 0"),
    (2.0, TypeError, "size must be an int, got float"),
    (True, TypeError, "size must be an int, got bool"),
])
def test_check_int(value, error, match):
    if error is None:
        assert snapkv.core.check_int("size", value, 1) == value
    else:
        with pytest.raises(error, match=match):
            snapkv.core.check_int("size", value, 1)


def test_copy_cache_is_independent_and_repeats_rows(model):
    cache = compat.new_cache(model)
    with torch.no_grad():
        compat.prefill(model, prompt_ids(1), cache)
        copied = snapkv.core.copy_cache(cache, batch_size=3)
        compat.forward(model, torch.ones(3, 2, dtype=torch.long), copied)
    assert cache.get_seq_length() == PROMPT and copied.get_seq_length() == PROMPT + 2
    for original, layer, sliding in zip(cache.layers, copied.layers, cache.is_sliding):
        if sliding:
            continue
        assert layer.keys.shape[0] == 3 and torch.equal(layer.keys[2, :, : original.keys.shape[-2]], original.keys[0])


def test_slot_arena_packs_copies_into_blocks_too_large_for_the_heap():
    arena = SlotArena()
    keys, positions = torch.randn(2, 3, 5), torch.arange(7)
    placed_keys, placed_positions = arena.place(keys), arena.place(positions)
    for original, placed in ((keys, placed_keys), (positions, placed_positions)):
        assert torch.equal(placed, original) and placed.dtype == original.dtype and placed.is_contiguous()
        assert placed.data_ptr() != original.data_ptr() and placed.data_ptr() % ARENA_ALIGN == 0
    block = placed_keys.untyped_storage()
    assert placed_positions.untyped_storage().data_ptr() == block.data_ptr() and block.nbytes() >= ARENA_BYTES
    large = arena.place(torch.ones(ARENA_BYTES // 4 + 1))  # larger than a block: a block of its own
    assert large.untyped_storage().data_ptr() != block.data_ptr() and bool((large == 1).all())


@pytest.mark.parametrize("policy", [SNAP, snapkv.AdaKV(window_size=8, max_capacity_prompt=24, kernel_size=3)],
                         ids=["snapkv", "adakv"])
def test_a_prompts_compressed_layers_share_one_arena_block(model, policy):
    """Kept slots allocated one by one would pin the heap under the freed full keys (see SlotArena)."""
    cache = compat.new_cache(model)
    with torch.no_grad(), snapkv.compress(model, policy):
        compat.prefill(model, prompt_ids(1), cache)
    layers = [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]
    blocks = {tensor.untyped_storage().data_ptr() for layer in layers for tensor in layer.state()[0].values()}
    assert layers and len(blocks) == 1
