"""KVzip on tiny random decoders: the kept positions equal an independent reconstruction written with a plain eager
forward, in `snapkv.compress` and in `snapkv.pack`; the engine's exactness (masked full-cache reference, padded
rows, chunked prefill, forks, packs on disk); and the clear refusals where it cannot apply."""

import pytest
import torch
from reference import masked_decode_logits
from tiny_models import AsciiTokenizer, PlainAsciiTokenizer, greedy, prompt_ids, tiny_model, tiny_tokenizer

import snapkv
from snapkv.core import compat, kvzip
from snapkv.core.compress import CompressionSession, attach
from snapkv.core.kvzip import KVzip

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, WINDOW, BUDGET = 60, 8, 24
TOKENIZER = AsciiTokenizer()


def policy(**changes):
    return KVzip.for_tokenizer(TOKENIZER, **{"max_capacity_prompt": BUDGET, "window_size": WINDOW, **changes})


def decode(generate, ids, steps=6):
    """`steps` greedy tokens of a generate function (a pack's, or `compat.generate` on a cache): (sequences, logits)."""
    out = generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.fixture(scope="module", params=("llama", "gemma3"))
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# -- an independent reconstruction ------------------------------------------------------------------------------
def reference_kept(model, context: torch.Tensor, kv: KVzip) -> dict[int, list[list[int]]]:
    """Kept positions {layer: one ascending list per kv head} from plain eager forwards of context + repeat prompt
    + chunk with output_attentions: each chunk's attention rows renormalised over the sink, chunk and reconstruction
    columns (a softmax over those keys only), max over the reconstruction queries and each GQA group; each head's
    top, or (share_heads) the layer's top heads x (budget - window) scores of any head, and the window."""
    config = model.config.get_text_config()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    layers = [i for i, kind in enumerate(types) if kind == "full_attention"]
    ids = context[0].tolist()
    n = len(ids)
    scores = {layer: torch.zeros(kv_heads, n) for layer in layers}
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for start in range(0, n, kv.chunk_size):
            end = min(start + kv.chunk_size, n)
            quoted = ids[max(start - kv.overlap, 0) : start]
            prompt = list(kv.prompt_ids) if start == 0 else list(kv.continue_ids) + quoted
            repeat = prompt + list(kv.suffix_ids) + ids[start:end]
            with torch.no_grad():
                out = model(torch.tensor([ids + repeat]), output_attentions=True, use_cache=False)
            columns = list(range(min(kv.sink_size, start))) + list(range(start, end)) + list(range(n, n + len(repeat)))
            sinks = min(kv.sink_size, start)
            for layer in layers:
                rows = out.attentions[layer][0, :, n:, :][:, :, columns].double()  # (heads, q, columns)
                rows = rows / rows.sum(-1, keepdim=True)
                chunk = rows[:, :, sinks : sinks + end - start]
                scores[layer][:, start:end] = chunk.reshape(kv_heads, heads // kv_heads, -1, end - start).amax((1, 2))
    finally:
        model.set_attn_implementation(previous)
    kept, k, prefix = {}, kv.max_capacity_prompt - kv.window_size, n - kv.window_size
    window = list(range(prefix, n))
    for layer, score in scores.items():
        score[:, : kv.sink_size] = 1.0
        score = score[:, :prefix]
        if kv.share_heads:
            top = score.reshape(-1).topk(kv_heads * k).indices.tolist()
            chosen = [sorted(i % prefix for i in top if i // prefix == head) for head in range(kv_heads)]
        else:
            chosen = [sorted(score[head].topk(k).indices.tolist()) for head in range(kv_heads)]
        kept[layer] = [positions + window for positions in chosen]
    return kept


def heads(kept: torch.Tensor) -> list[list[int]]:
    """(kv_heads, slots) kept positions -> one list per head, without the -1 of empty slots."""
    return [[p for p in head.tolist() if p >= 0] for head in kept]


@pytest.mark.parametrize("share_heads", [True, False], ids=["shared-heads", "per-head"])
@pytest.mark.parametrize("chunk_size", [2048, 25], ids=["one-chunk", "chunks-of-25"])
def test_kvzip_keeps_what_an_independent_reconstruction_scores(model, chunk_size, share_heads):
    kv = policy(chunk_size=chunk_size, share_heads=share_heads)
    context = prompt_ids(1)
    expected = reference_kept(model, context, kv)
    with snapkv.compress(model, kv) as session:
        greedy(model, context, steps=2)
    packed = snapkv.pack(model, context, kv)
    assert sorted(session.kept_positions) == sorted(expected)
    for layer, kept in expected.items():
        assert heads(session.kept_positions[layer][0]) == kept, layer
        assert heads(packed.cache.layers[layer].positions[0]) == kept, layer
        assert sum(map(len, kept)) == len(kept) * BUDGET  # the layer's budget, however its heads share it


def test_chunk_attention_scores_normalise_over_sinks_chunk_and_reconstruction_only():
    torch.manual_seed(0)
    query, keys = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 20 + 5, 8)
    slots = torch.tensor([0, 1, 10, 11, 12])  # 2 sinks, a chunk of 3
    scores = kvzip.chunk_attention_scores(query, keys, slots, 3, scaling=0.3)
    for kv_head in range(2):
        for position in range(3):
            best = 0.0
            for head in (2 * kv_head, 2 * kv_head + 1):
                for row in range(5):
                    visible = torch.cat([keys[0, kv_head, slots], keys[0, kv_head, 20 : 21 + row]])
                    probs = torch.softmax(visible @ query[0, head, row] * 0.3, dim=0)
                    best = max(best, float(probs[2 + position]))
            assert scores[0, kv_head, position].item() == pytest.approx(best, rel=1e-5)


def test_reconstruction_chunks_quote_the_previous_chunk():
    kv = policy(chunk_size=4, overlap=2)
    chunks = kvzip.reconstruction_chunks(list(range(100, 110)), kv)
    assert [(start, end) for start, end, _ in chunks] == [(0, 4), (4, 8), (8, 10)]
    suffix = list(kv.suffix_ids)
    assert chunks[0][2] == list(kv.prompt_ids) + suffix + [100, 101, 102, 103]
    assert chunks[2][2] == list(kv.continue_ids) + [106, 107] + suffix + [108, 109]


def test_for_tokenizer_tokenizes_kvpress_prompts_with_the_chat_template():
    kv = KVzip.for_tokenizer(TOKENIZER, max_capacity_prompt=BUDGET)
    assert TOKENIZER.decode(kv.prompt_ids) == "\n\nRepeat the previous context exactly."
    assert TOKENIZER.decode(kv.continue_ids) == "\n\nRepeat the part of the previous context exactly, starting with"
    assert TOKENIZER.decode(kv.suffix_ids) == "</u>\n<a>"  # the template after a user message's content
    plain = KVzip.for_tokenizer(PlainAsciiTokenizer(), max_capacity_prompt=BUDGET)
    assert plain.suffix_ids == (ord("\n"),) and plain.prompt_ids[0] != PlainAsciiTokenizer.bos_token_id
    assert (kv.window_size, kv.chunk_size, kv.overlap, kv.sink_size) == (0, 2048, 8, 4)  # kvpress's defaults
    assert kv.share_heads and kv.per_head_slots and not policy(share_heads=False).per_head_slots
    assert "prompt_ids" not in repr(kv)


# -- the engine's contracts ---------------------------------------------------------------------------------------
def test_kvzip_decodes_as_the_masked_full_cache(model):
    ids = prompt_ids()
    with snapkv.compress(model, policy(chunk_size=25)) as session:
        tokens, logits = greedy(model, ids)
    reference = masked_decode_logits(model, tokens, PROMPT, session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-4, rtol=0)


def test_a_left_padded_batch_equals_its_rows(llama):
    rows = [prompt_ids(1, n, seed=n) for n in (60, 40)]
    ids = torch.cat([torch.cat([torch.zeros(1, 60 - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = (ids != 0).long()
    mask[1, 20:] = 1
    with snapkv.compress(llama, policy(chunk_size=25)) as session:
        batched, batched_logits = greedy(llama, ids, attention_mask=mask)
        batched_kept = dict(session.kept_positions)
    for i, row in enumerate(rows):
        with snapkv.compress(llama, policy(chunk_size=25)) as session:
            alone, alone_logits = greedy(llama, row)
        assert torch.equal(batched[i, 60:], alone[0, row.shape[1]:])
        assert torch.allclose(batched_logits[i], alone_logits[0], atol=1e-4, rtol=0)
        for layer, kept in batched_kept.items():
            for head, alone_head in zip(kept[i], session.kept_positions[layer][0], strict=True):
                assert torch.equal(head[head >= 0], alone_head[alone_head >= 0])


def test_chunked_prefill_and_compression_before_the_next_forward_keep_the_same_positions(llama):
    ids = prompt_ids(1)
    with snapkv.compress(llama, policy()) as session:
        tokens, logits = greedy(llama, ids)
        whole = dict(session.kept_positions)
    with snapkv.compress(llama, policy(), prefill_chunk_size=16) as session:
        tokens_c, logits_c = greedy(llama, ids)
    assert torch.equal(tokens, tokens_c) and torch.allclose(logits, logits_c, atol=1e-5, rtol=0)
    assert all(torch.equal(whole[layer], session.kept_positions[layer]) for layer in whole)
    question = prompt_ids(1, 5, seed=3)
    cache = compat.new_cache(llama)
    with torch.no_grad(), snapkv.compress(llama, policy()) as session:
        compat.prefill(llama, ids, cache)
        assert cache.get_seq_length() == PROMPT
        session.compress_before_next_forward()
        compat.forward(llama, question, cache)
    assert all(torch.equal(whole[layer], session.kept_positions[layer]) for layer in whole)


def test_the_budget_covering_the_prompt_runs_no_reconstruction(llama, monkeypatch):
    calls = []
    monkeypatch.setattr(kvzip, "reconstruction_scores", lambda *args: calls.append(args))
    ids = prompt_ids()
    tokens, logits = greedy(llama, ids)
    with snapkv.compress(llama, policy(max_capacity_prompt=PROMPT + 10)):
        tokens_c, logits_c = greedy(llama, ids)
    assert not calls and torch.equal(tokens, tokens_c) and torch.allclose(logits, logits_c, atol=1e-5, rtol=0)


def test_other_taps_never_see_the_reconstruction_and_the_prompt_cache_is_left_as_it_was(llama):
    ids = prompt_ids(1)
    cache, full = compat.new_cache(llama), compat.new_cache(llama)
    with torch.no_grad():
        compat.prefill(llama, ids, full)
    session = CompressionSession(llama, policy(share_heads=False))
    with torch.no_grad(), attach(llama, session), snapkv.record(llama, window_size=WINDOW) as rec:
        compat.prefill(llama, ids, cache)
    assert rec.trace.metadata["prompt_length"] == PROMPT and len(rec.traces) == 1
    for layer, kept in session.kept_positions.items():
        stored = cache.layers[layer]
        index = kept[..., None].expand(-1, -1, -1, stored.keys.shape[-1])
        assert torch.allclose(stored.keys, full.layers[layer].keys.gather(2, index), atol=1e-6, rtol=0)


def test_a_fork_of_an_observer_that_saw_the_ids_equals_its_own_session(llama):
    ids, tail = prompt_ids(1), prompt_ids(1, 4, seed=5)
    kv = policy()
    cache = compat.new_cache(llama)
    with torch.no_grad(), snapkv.compress(llama, kv) as session:
        compat.prefill(llama, ids, cache)
        session.compress_before_next_forward()
        expected = compat.forward(llama, tail, cache).logits
    observer = CompressionSession.observer(llama, [snapkv.SnapKV(window_size=8, max_capacity_prompt=24), kv])
    shared = compat.new_cache(llama)
    with torch.no_grad(), attach(llama, observer):
        compat.prefill(llama, ids, shared)
    forked, forked_cache = observer.fork(kv), snapkv.core.copy_cache(shared)
    with torch.no_grad(), attach(llama, forked):
        forked.compress_before_next_forward()
        logits = compat.forward(llama, tail, forked_cache).logits
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)
    assert all(torch.equal(session.kept_positions[i], forked.kept_positions[i]) for i in session.kept_positions)
    snap_only = CompressionSession.observer(llama, [snapkv.SnapKV(window_size=8, max_capacity_prompt=24)])
    with torch.no_grad(), attach(llama, snap_only):
        compat.prefill(llama, ids, compat.new_cache(llama))
    with pytest.raises(ValueError, match="KVzip observes input_ids, reconstruction, which this session did not record"):
        snap_only.fork(kv)


def test_forks_of_one_observer_share_one_reconstruction_per_prompt_state(llama, monkeypatch):
    """Every budget and wrapper of one KVzip setting reuses the scores of one reconstruction per prompt state (after
    the context; after context + question), and answers and keeps what its own session does."""
    from snapkv.analysis.quality.methods import Method
    from snapkv.analysis.quality.runner import answers_with_shared_prefill

    context, tail = prompt_ids(1)[0], prompt_ids(1, 6, seed=7)[0]
    methods = [Method("kvzip", 24, policy()), Method("kvzip", 32, policy(max_capacity_prompt=32)),
               Method("kvzip+span", 24, snapkv.SpanKeeping(policy(), tokenizer=tiny_tokenizer())),
               Method("kvzip-25", 24, policy(chunk_size=25))]  # another setting: its own reconstruction
    assert len({m.policy.reconstruction_key for m in methods}) == 2
    runs, original = [], kvzip.reconstruction_scores
    monkeypatch.setattr(kvzip, "reconstruction_scores",
                        lambda model, cache, ids, *rest: runs.append((ids.shape[1], rest[1].chunk_size))
                        or original(model, cache, ids, *rest))
    answers = answers_with_shared_prefill(llama, context, tail, methods, modes=("question-agnostic", "question-aware"),
                                          max_new_tokens=4, prefill_chunk_size=None)
    assert sorted(runs) == [(60, 25), (60, 2048), (66, 25), (66, 2048)]
    prompt = torch.cat([context, tail])[None]
    for method in methods:
        with snapkv.compress(llama, method.policy) as session:
            tokens, _ = greedy(llama, prompt, steps=4)
        aware = answers[("question-aware", method.name, method.budget)]
        assert aware.tokens == tokens[0, 66:].tolist(), method.name
        assert aware.kept_positions.keys() == session.kept_positions.keys()
        assert all(torch.equal(aware.kept_positions[i], kept) for i, kept in session.kept_positions.items())
        cache = compat.new_cache(llama)
        with torch.no_grad(), snapkv.compress(llama, method.policy) as session:
            compat.prefill(llama, context[None], cache)
            session.compress_before_next_forward()
            logits = compat.forward(llama, tail[None], cache).logits[:, -1]
            tokens = []
            for _ in range(4):
                tokens.append(int(logits.argmax()))
                logits = compat.forward(llama, torch.tensor([tokens[-1:]]), cache).logits[:, -1]
        agnostic = answers[("question-agnostic", method.name, method.budget)]
        assert agnostic.tokens == tokens, method.name
        assert all(torch.equal(agnostic.kept_positions[i], kept) for i, kept in session.kept_positions.items())
    assert len(runs) == 4 + 2 * len(methods)  # the sessions of their own: one reconstruction each


# -- packs ----------------------------------------------------------------------------------------------------
def test_a_kvzip_pack_equals_its_session_saves_loads_and_answers_the_same(model, tmp_path):
    kv = policy(chunk_size=25)
    context, question = prompt_ids(1), prompt_ids(1, 6, seed=4)
    packed = snapkv.pack(model, context, kv)
    cache = compat.new_cache(model)
    with torch.no_grad(), snapkv.compress(model, kv) as session:
        compat.prefill(model, context, cache)
        session.compress_before_next_forward()
        in_cache = lambda i, **kw: compat.generate(model, i, cache, **kw)  # noqa: E731
        tokens, logits = decode(in_cache, torch.cat([context, question], 1))
    tokens_p, logits_p = decode(packed.generate, question)
    assert torch.equal(tokens, tokens_p) and torch.allclose(logits, logits_p, atol=1e-5, rtol=0)
    in_chunks = snapkv.pack(model, context, kv, prefill_chunk_size=16)
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(packed.cache.layers, in_chunks.cache.layers)
               if hasattr(a, "positions"))
    loaded = snapkv.KVPack.load(packed.save(tmp_path / "pack"), model)
    assert loaded.policy == kv
    tokens_l, logits_l = decode(loaded.generate, question)
    assert torch.equal(tokens_l, tokens_p) and torch.allclose(logits_l, logits_p, atol=1e-6, rtol=0)


# -- refusals -----------------------------------------------------------------------------------------------------
def test_kvzip_without_its_repeat_prompt_is_refused_with_the_fix(llama):
    with pytest.raises(ValueError, match=r"no repeat prompt .* KVzip.for_tokenizer\(tokenizer"):
        snapkv.pack(llama, prompt_ids(1), KVzip(max_capacity_prompt=BUDGET))
    with pytest.raises(TypeError, match="prompt_ids must be a tuple of token ids"):
        KVzip(prompt_ids="Repeat")


def test_a_prompt_without_ids_is_refused(llama):
    embeds = llama.get_input_embeddings()(prompt_ids(1))
    with pytest.raises(ValueError, match="KVzip reads the prompt.s token ids, but the forward got inputs_embeds"):
        with torch.no_grad(), snapkv.compress(llama, policy()):
            llama(inputs_embeds=embeds, use_cache=True, **{compat.cache_keyword(llama): compat.new_cache(llama)})


def test_a_view_without_reconstruction_scores_is_refused():
    view = snapkv.PrefillView(keys=torch.zeros(1, 2, PROMPT, 4), padding_mask=None, scaling=1.0)
    with pytest.raises(ValueError, match="only a compression session runs"):
        policy().select(view, BUDGET)


def test_the_explorer_cannot_recompute_kvzip_from_a_trace(llama):
    from snapkv.analysis.explorer import tables

    with snapkv.compress(llama, policy()) as session, snapkv.record(llama, window_size=WINDOW) as rec:
        greedy(llama, prompt_ids(1), steps=2)
    assert all(torch.equal(rec.trace.kept_positions(i), kept) for i, kept in session.kept_positions.items())
    try:
        methods = tables.explorer_methods(rec.trace)
    except ValueError as error:  # the explorer builds every registered method without a tokenizer
        pytest.skip(f"the explorer cannot list the registered methods: {error}")
    assert "kvzip" not in methods
    with pytest.raises(ValueError, match="method must be one of"):
        tables.kept_positions(rec.trace, 0, budget=BUDGET, method="kvzip")
    assert torch.equal(tables.kept_positions(rec.trace, 0, budget=BUDGET, method="recorded"),
                       rec.trace.kept_positions(0)[0])
