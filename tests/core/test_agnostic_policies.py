"""KNorm, ExpectedAttention, BoundaryProtection and SpanKeeping on tiny random decoders, each against a small
reference written here (kvpress's formulas, Python loops over token text); the prompt's ids reaching the policy;
packs of nested wrappers on disk; and the clear refusals."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from reference import masked_decode_logits
from tiny_models import greedy, prompt_ids, tiny_model, tiny_tokenizer
from transformers.models.llama.modeling_llama import repeat_kv

import snapkv
from snapkv.core import compat, registry, units
from snapkv.core.compress import CompressionSession, attach, full_attention_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest

PROMPT, WINDOW, BUDGET = 60, 8, 24
TOKENIZER = tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def full_cache(model, ids):
    """The full cache of a prefill of `ids`: the post-RoPE keys and values every policy scores."""
    cache = compat.new_cache(model)
    with torch.no_grad():
        compat.prefill(model, ids, cache)
    return cache


def answer(generate, question):
    """Six greedy tokens of a pack's `generate` (the context, question and answer ids)."""
    return generate(question, max_new_tokens=6, do_sample=False)


def compressed_positions(model, policy, ids, **kwargs) -> dict[int, torch.Tensor]:
    with snapkv.compress(model, policy, **kwargs) as session:
        greedy(model, ids, steps=2)
    return session.kept_positions


# -- references written here ---------------------------------------------------------------------------------
def word_units(ids: list[int]) -> list[int]:
    """The word number of each token, read from the token text: a word breaks where a token starts, or the
    previous one ends, with a character that is not a letter or digit."""
    texts = [TOKENIZER.decode([i]) for i in ids]
    numbers = [0]
    for before, text in zip(texts, texts[1:]):
        joined = bool(before) and bool(text) and before[-1].isalnum() and text[0].isalnum()
        numbers.append(numbers[-1] + (not joined))
    return numbers


def span_walk(ranking: list[int], unit: list[int], budget: int, tail: int) -> list[int]:
    """The window, then each ranked position's whole unit (its positions best-ranked first) until `budget`."""
    n, rank = len(ranking), {p: r for r, p in enumerate(ranking)}
    kept = list(range(n - tail, n))
    for p in ranking:
        for q in sorted((q for q in range(n) if unit[q] == unit[p]), key=rank.get):
            if len(kept) == budget:
                return sorted(kept)
            if q not in kept:
                kept.append(q)
    return sorted(kept)


def kvpress_expected_attention(model, layer, hidden, keys, values, n_sink=4, n_future=512):
    """kvpress's ExpectedAttentionPress.score, written as kvpress writes it: (batch, kv_heads, n)."""
    attention = model.model.layers[layer].self_attn
    q_len, d = hidden.shape[1], attention.head_dim
    h = hidden[:, n_sink:]
    query_states = attention.q_proj(h).view(h.shape[0], h.shape[1], -1, d).transpose(1, 2)
    if hasattr(attention, "q_norm"):
        query_states = attention.q_norm(query_states)
    mu = query_states.mean(dim=2, keepdim=True)
    centered = query_states - mu
    cov = torch.einsum("bnsi,bnsj->bnij", centered, centered) / h.shape[1]
    mu = mu.squeeze(2)
    position_ids = torch.arange(q_len, q_len + n_future).unsqueeze(0)
    layer_type = getattr(attention, "layer_type", None)  # Gemma 3's rotary embedding takes it: one RoPE per type
    per_type = isinstance(model.config.rope_parameters.get(layer_type), dict)
    rotary = model.model.rotary_emb
    cos, sin = rotary(mu, position_ids, layer_type) if per_type else rotary(mu, position_ids)
    cos, sin = cos[0], sin[0]
    identity = torch.eye(d)
    p = torch.zeros(d, d)
    p[d // 2 :, : d // 2], p[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
    r = (cos.unsqueeze(1) * identity + sin.unsqueeze(1) * p).mean(dim=0)
    mu, cov = torch.matmul(mu, r.T), torch.matmul(r, torch.matmul(cov, r.T))
    keys, values = keys[:, :, n_sink:], values[:, :, n_sink:]
    bsz, kv_heads, length, _ = keys.shape
    groups = model.config.num_attention_heads // kv_heads
    keys = repeat_kv(keys, groups).transpose(2, 3)
    scores = torch.matmul(mu.unsqueeze(2), keys).squeeze(2) / math.sqrt(d)
    scores += torch.einsum("bhin, bhij, bhjn->bhn", keys, cov, keys) / d / 2
    scores = torch.softmax(scores, dim=-1).view(bsz, kv_heads, groups, length).mean(dim=2)
    scores = scores * values.norm(dim=-1)
    return torch.nn.functional.pad(scores, (n_sink, 0), value=scores.max().item() + 1)


# -- KNorm ----------------------------------------------------------------------------------------------
def test_knorm_keeps_the_window_and_the_smallest_keys(llama):
    ids = prompt_ids()
    policy = snapkv.method_policy("knorm", BUDGET, window_size=WINDOW)
    assert policy == snapkv.KNorm(max_capacity_prompt=BUDGET, window_size=WINDOW)
    full = full_cache(llama, ids)
    for layer, kept in compressed_positions(llama, policy, ids).items():
        norms = full.layers[layer].keys.norm(dim=-1)[..., : PROMPT - WINDOW]
        for row in range(ids.shape[0]):
            for head in range(norms.shape[1]):
                smallest = norms[row, head].argsort()[: BUDGET - WINDOW].tolist()
                assert kept[row, head].tolist() == sorted(smallest + list(range(PROMPT - WINDOW, PROMPT)))


# -- ExpectedAttention --------------------------------------------------------------------------------------
SCORES: dict[int, torch.Tensor] = {}


@dataclass(frozen=True)
class SeenExpectedAttention(snapkv.ExpectedAttention):
    def score(self, view):
        SCORES[view.module.layer_idx] = super().score(view)
        return SCORES[view.module.layer_idx]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])  # plain; QK-norm; per-type RoPE, sliding layers
def test_expected_attention_scores_as_kvpress_writes_them(family):
    model, ids = tiny_model(family), prompt_ids(1)
    hidden = {}
    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: hidden.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True)
        for i in range(len(model.model.layers))]
    full = full_cache(model, ids)
    for handle in handles:
        handle.remove()
    SCORES.clear()
    kept = compressed_positions(model, SeenExpectedAttention(max_capacity_prompt=BUDGET, window_size=WINDOW), ids)
    assert sorted(SCORES) == sorted(kept) == list(full_attention_layers(model.config))
    for layer, scores in SCORES.items():
        with torch.no_grad():
            expected = kvpress_expected_attention(model, layer, hidden[layer], full.layers[layer].keys,
                                                  full.layers[layer].values)
        assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-7), layer
        top = expected[..., : PROMPT - WINDOW].topk(BUDGET - WINDOW, dim=-1).indices
        assert torch.equal(kept[layer], torch.cat([top, torch.arange(PROMPT - WINDOW, PROMPT).expand(1, 2, -1)],
                                                  -1).sort(-1).values)


def test_expected_attention_options_change_the_score_as_kvpress():
    model, ids = tiny_model("llama"), prompt_ids(1)
    chosen = {}
    for name, settings in [("default", {}), ("no covariance", {"use_covariance": False}),
                           ("no vnorm", {"use_vnorm": False}), ("epsilon", {"epsilon": 0.5})]:
        SCORES.clear()
        compressed_positions(model, SeenExpectedAttention(max_capacity_prompt=BUDGET, window_size=WINDOW,
                                                          **settings), ids)
        chosen[name] = SCORES[0]
        assert bool((SCORES[0][..., :4] > SCORES[0][..., 4:].max()).all())  # the sinks are always kept
    default, plain = chosen["default"][..., 4:], chosen["no vnorm"][..., 4:]
    assert not torch.allclose(default, chosen["no covariance"][..., 4:])
    values = full_cache(model, ids).layers[0].values[:, :, 4:].norm(dim=-1)
    assert torch.allclose(default, plain * values, rtol=1e-5, atol=0)
    assert torch.allclose(chosen["epsilon"][..., 4:], (plain + 0.5) * values, rtol=1e-5, atol=0)


# -- SpanKeeping --------------------------------------------------------------------------------------------
def test_span_positions_equal_a_walk_over_a_hand_made_ranking():
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(8, 30, (1,), generator=generator))
        tail = int(torch.randint(0, 4, (1,), generator=generator))
        budget = int(torch.randint(tail + 1, n, (1,), generator=generator))
        starts = torch.rand(n, generator=generator) < 0.4
        starts[0] = False
        unit = starts.long().cumsum(0)
        ranking = torch.stack([torch.randperm(n, generator=generator) for _ in range(3)])[None]  # (1, 3, n)
        kept = units.span_positions(ranking, unit[None], budget, tail)
        for head in range(3):
            assert kept[0, head].tolist() == span_walk(ranking[0, head].tolist(), unit.tolist(), budget, tail), trial


def test_units_come_from_the_token_text():
    pieces = ["Ġthe", "Ġpass", "ing", "Ġ", "4", "8", "2", ".", "Ġ1", "4", ".", "5", "Ġdog", "!", "Ċ", "Ġcat", "s",
              "Ġran", ".Ċ", "Ġit", "?\"", "Ġhe"]
    ids = torch.tensor([TOKENIZER.convert_tokens_to_ids(pieces)])
    roles = units.decode_roles(units.token_roles(TOKENIZER))

    def grouped(unit):
        numbers = units.unit_index(ids, roles, unit)[0].tolist()
        texts = [TOKENIZER.decode([i]) for i in ids[0]]
        return ["".join(t for t, k in zip(texts, numbers) if k == number) for number in sorted(set(numbers))]

    assert grouped("word") == [" the", " passing", " ", "482", ".", " 14", ".", "5", " dog", "!", "\n", " cats",
                               " ran", ".\n", " it", "?\"", " he"]
    assert grouped("line") == [" the passing 482. 14.5 dog!\n", " cats ran.\n", " it?\" he"]
    assert grouped("sentence") == [" the passing 482.", " 14.5 dog!\n", " cats ran.\n", " it?\"", " he"]
    assert units.unit_index(ids, roles, "word").tolist()[0] == word_units(ids[0].tolist())


def test_span_keeping_keeps_whole_words_around_the_smallest_keys(llama):
    ids = prompt_ids()
    policy = snapkv.SpanKeeping(snapkv.KNorm(max_capacity_prompt=BUDGET, window_size=WINDOW), tokenizer=TOKENIZER)
    assert policy.observes == {"input_ids"} and policy.window_size == WINDOW and "token_roles" not in repr(policy)
    full = full_cache(llama, ids)
    for layer, kept in compressed_positions(llama, policy, ids).items():
        norms = full.layers[layer].keys.norm(dim=-1)
        for row in range(ids.shape[0]):
            unit = word_units(ids[row].tolist())
            for head in range(norms.shape[1]):
                prefix = norms[row, head, : PROMPT - WINDOW].argsort(stable=True).tolist()
                ranking = list(range(PROMPT - WINDOW, PROMPT)) + prefix
                assert kept[row, head].tolist() == span_walk(ranking, unit, BUDGET, WINDOW)
                partial = {unit[p] for p in range(PROMPT) if p not in kept[row, head].tolist()
                           and unit[p] in {unit[q] for q in kept[row, head].tolist()}}
                assert len(partial) <= 1  # every kept word is whole but the one that did not fit


def test_the_prompt_ids_reach_the_policy_across_prefill_chunks_rows_and_forks(llama):
    policy = snapkv.SpanKeeping(snapkv.KNorm(max_capacity_prompt=BUDGET, window_size=WINDOW), tokenizer=TOKENIZER)
    ids = prompt_ids()
    whole = compressed_positions(llama, policy, ids)
    chunked = compressed_positions(llama, policy, ids, prefill_chunk_size=16)
    assert all(torch.equal(whole[layer], chunked[layer]) for layer in whole)
    observer = CompressionSession.observer(llama, [snapkv.SnapKV(window_size=WINDOW, max_capacity_prompt=BUDGET),
                                                   policy])
    cache = compat.new_cache(llama)
    with torch.no_grad(), attach(llama, observer):
        compat.prefill(llama, ids, cache)
    forked = observer.fork(policy)
    with torch.no_grad(), attach(llama, forked):
        forked.compress_before_next_forward()
        compat.forward(llama, ids[:, -1:], snapkv.core.copy_cache(cache))
    assert all(torch.equal(whole[layer], forked.kept_positions[layer]) for layer in whole)
    with pytest.raises(ValueError, match="reads the prompt's token ids, but the forward got inputs_embeds"):
        with torch.no_grad(), snapkv.compress(llama, policy):
            llama(inputs_embeds=llama.get_input_embeddings()(ids))


# -- BoundaryProtection -------------------------------------------------------------------------------------
def test_boundary_protection_keeps_both_boundaries_and_the_smallest_keys_of_the_rest(llama):
    ids = prompt_ids()
    policy = snapkv.BoundaryProtection(snapkv.KNorm(max_capacity_prompt=BUDGET, window_size=WINDOW), share=0.25)
    edge = 3  # int(0.25 x 24 / 2)
    reserved = list(range(edge)) + list(range(PROMPT - WINDOW - edge, PROMPT - WINDOW))
    full = full_cache(llama, ids)
    for layer, kept in compressed_positions(llama, policy, ids).items():
        norms = full.layers[layer].keys.norm(dim=-1)
        for row in range(ids.shape[0]):
            for head in range(norms.shape[1]):
                middle = list(range(edge, PROMPT - WINDOW - edge))
                smallest = sorted(middle, key=lambda p: float(norms[row, head, p]))[: BUDGET - 2 * edge - WINDOW]
                assert kept[row, head].tolist() == sorted(reserved + smallest + list(range(PROMPT - WINDOW, PROMPT)))


def test_boundary_protection_lets_any_policy_choose_among_the_other_positions(llama):
    ids = prompt_ids(1)
    streaming = snapkv.StreamingLLM(sink_size=2, max_capacity_prompt=BUDGET)
    kept = compressed_positions(llama, snapkv.BoundaryProtection(streaming), ids)  # share 0.2: 2 at each boundary
    others = list(range(2, PROMPT - 2))  # StreamingLLM has no window: the last two tokens are the end boundary
    expected = [0, 1] + others[:2] + others[-(BUDGET - 6):] + [PROMPT - 2, PROMPT - 1]
    assert all(k[0, head].tolist() == expected for k in kept.values() for head in range(2))


def test_boundary_protection_keeps_the_wrapped_per_head_slots_and_layer_budgets(llama):
    ids = prompt_ids()
    ada = snapkv.BoundaryProtection(snapkv.AdaKV(window_size=WINDOW, max_capacity_prompt=BUDGET, kernel_size=3))
    assert ada.per_head_slots and ada.observes == {"query_window"}
    with snapkv.compress(llama, ada) as session:
        tokens, logits = greedy(llama, ids)
    reference = masked_decode_logits(llama, tokens, PROMPT, session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-4, rtol=0)
    counts = [(kept >= 0).sum(-1) for kept in session.kept_positions.values()]
    assert any(bool((c != c.flatten()[0]).any()) for c in counts)  # heads keep different numbers ...
    assert all(int(c.sum()) == ids.shape[0] * 2 * BUDGET for c in counts)  # ... of the layer's budget
    for kept in session.kept_positions.values():
        for head in kept.flatten(0, 1):
            assert {0, 1, PROMPT - WINDOW - 2, PROMPT - WINDOW - 1} <= set(head.tolist())
    pyramid = snapkv.BoundaryProtection(snapkv.PyramidKV(window_size=WINDOW, max_capacity_prompt=BUDGET, beta=4))
    widths = [kept.shape[-1] for kept in compressed_positions(llama, pyramid, ids).values()]
    assert widths == [pyramid.policy.layer_budget(layer, PROMPT, (0, 1, 2)) for layer in range(3)]
    assert widths[0] > widths[-1]


def test_span_keeping_of_boundary_protection_walks_the_reserved_positions_first(llama):
    ids = prompt_ids(1)
    inner = snapkv.BoundaryProtection(snapkv.KNorm(max_capacity_prompt=BUDGET, window_size=WINDOW))
    policy = snapkv.SpanKeeping(inner, tokenizer=TOKENIZER)
    full = full_cache(llama, ids)
    unit = word_units(ids[0].tolist())
    reserved = [0, 1, PROMPT - WINDOW - 2, PROMPT - WINDOW - 1]
    for layer, kept in compressed_positions(llama, policy, ids).items():
        for head in range(2):
            norms = full.layers[layer].keys.norm(dim=-1)[0, head]
            middle = sorted(range(2, PROMPT - WINDOW - 2), key=lambda p: float(norms[p]))
            ranking = reserved + list(range(PROMPT - WINDOW, PROMPT)) + middle
            assert kept[0, head].tolist() == span_walk(ranking, unit, BUDGET, WINDOW)


# -- packs ---------------------------------------------------------------------------------------------------
def test_a_pack_of_nested_wrappers_saves_and_loads_the_same_policy(llama, tmp_path):
    snap = snapkv.SnapKV(window_size=WINDOW, max_capacity_prompt=BUDGET, kernel_size=3)
    policy = snapkv.SpanKeeping(snapkv.BoundaryProtection(snap, share=0.3), tokenizer=TOKENIZER, unit="sentence")
    context, question = prompt_ids(1), prompt_ids(1, 5, seed=5)
    packed = snapkv.pack(llama, context, policy)
    chunked = snapkv.pack(llama, context, policy, prefill_chunk_size=16)
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(packed.cache.layers, chunked.cache.layers))
    loaded = snapkv.KVPack.load(packed.save(tmp_path / "pack"), llama)
    assert loaded.policy == policy and hash(loaded.policy) == hash(policy)
    assert torch.equal(answer(loaded.generate, question), answer(packed.generate, question))
    record = json.loads((tmp_path / "pack" / "metadata.json").read_text())["policy"]
    assert record["name"] == "SpanKeeping" and record["settings"]["unit"] == "sentence"
    assert record["settings"]["policy"]["name"] == "BoundaryProtection"
    assert record["settings"]["policy"]["settings"]["policy"] == {"name": "SnapKV", "settings": {
        "max_capacity_prompt": BUDGET, "window_size": WINDOW, "kernel_size": 3, "pooling": "maxpool", "gqa": "mean"}}
    assert len(json.dumps(record)) < 1000


# -- the registry ------------------------------------------------------------------------------------------
NEW = ["knorm", "expected-attention", "snapkv+span", "knorm+span", "expected-attention+span", "snapkv+boundary",
       "knorm+boundary", "expected-attention+boundary"]


def test_the_registry_builds_the_new_methods_and_says_which_need_the_tokenizer(monkeypatch):
    assert set(NEW) <= set(snapkv.method_names())
    assert [snapkv.core.needs_tokenizer(name) for name in NEW] == [False, False, True, True, True, False, False, False]
    span = snapkv.method_policy("knorm+span", BUDGET, window_size=WINDOW, tokenizer=TOKENIZER)
    assert span == snapkv.SpanKeeping(snapkv.KNorm(max_capacity_prompt=BUDGET, window_size=WINDOW),
                                      tokenizer=TOKENIZER)
    assert snapkv.method_policy("snapkv+boundary", BUDGET, window_size=WINDOW, kernel_size=3) == \
        snapkv.BoundaryProtection(snapkv.SnapKV(window_size=WINDOW, max_capacity_prompt=BUDGET, kernel_size=3))
    assert snapkv.method_policy("knorm", BUDGET, tokenizer=TOKENIZER) == snapkv.method_policy("knorm", BUDGET)
    with pytest.raises(ValueError, match=r"'snapkv\+span' reads token text and needs the model's tokenizer: call "
                                         r"method_policy\('snapkv\+span', budget, tokenizer=tokenizer\)"):
        snapkv.method_policy("snapkv+span", BUDGET)
    # the helpers compose any registered name, one that needs the tokenizer too
    monkeypatch.setitem(registry._METHODS, "texty", lambda budget, window_size, kernel_size, tokenizer:
                        snapkv.SpanKeeping(snapkv.KNorm(max_capacity_prompt=budget), tokenizer=tokenizer))
    monkeypatch.setitem(registry._METHODS, "texty+boundary", registry.with_boundary("texty"))
    monkeypatch.setitem(registry._METHODS, "knorm+span+boundary", registry.with_boundary("knorm+span"))
    assert registry.needs_tokenizer("texty+boundary") and registry.needs_tokenizer("knorm+span+boundary")
    built = snapkv.method_policy("knorm+span+boundary", BUDGET, window_size=WINDOW, tokenizer=TOKENIZER)
    assert built == snapkv.BoundaryProtection(span)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        registry.with_span("nope")


# -- refusals ------------------------------------------------------------------------------------------------
def test_bad_settings_are_refused_with_the_fix():
    knorm = snapkv.KNorm(max_capacity_prompt=BUDGET, window_size=WINDOW)
    for share in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"share .* must be within \(0, 1\)"):
            snapkv.BoundaryProtection(knorm, share=share)
    with pytest.raises(TypeError, match="share must be a number"):
        snapkv.BoundaryProtection(knorm, share="0.2")
    with pytest.raises(TypeError, match=r"BoundaryProtection wraps a snapkv policy \(SnapKV\(\), KNorm\(\), ...\), "
                                        "got str"):
        snapkv.BoundaryProtection("snapkv")
    with pytest.raises(ValueError, match=r"unit must be one of \('word', 'line', 'sentence'\), got 'paragraph'"):
        snapkv.SpanKeeping(knorm, tokenizer=TOKENIZER, unit="paragraph")
    with pytest.raises(ValueError, match=r"give the model's tokenizer, SpanKeeping\(policy, tokenizer=tokenizer\)"):
        snapkv.SpanKeeping(knorm)
    with pytest.raises(ValueError, match="token_roles is not a string made by snapkv.core.units.token_roles"):
        snapkv.SpanKeeping(knorm, token_roles="not roles")
    with pytest.raises(TypeError, match="a tokenizer or its token_roles, not both"):
        snapkv.SpanKeeping(knorm, tokenizer=TOKENIZER, token_roles=units.token_roles(TOKENIZER))
    with pytest.raises(ValueError, match="n_future_positions must be >= 1"):
        snapkv.ExpectedAttention(n_future_positions=0)
    with pytest.raises(TypeError, match="use_vnorm must be True or False"):
        snapkv.ExpectedAttention(use_vnorm=1)
    with pytest.raises(ValueError, match="epsilon must be a number >= 0"):
        snapkv.ExpectedAttention(epsilon=-1e-3)


def test_rankings_begin_with_what_select_keeps():
    keys = torch.randn(2, 2, 20, 4, generator=torch.Generator().manual_seed(0))
    view = snapkv.PrefillView(keys=keys, padding_mask=None, scaling=0.5, values=keys)
    knorm = snapkv.KNorm(max_capacity_prompt=10, window_size=3)
    streaming = snapkv.StreamingLLM(sink_size=2, max_capacity_prompt=8)
    for policy, budget in [(knorm, 10), (snapkv.BoundaryProtection(knorm, share=0.4), 10), (streaming, 8),
                           (snapkv.BoundaryProtection(streaming), 8)]:
        ranking = policy.ranking(view, budget)
        assert torch.equal(ranking.sort(-1).values, torch.arange(20).expand(2, 2, 20)), policy
        assert torch.equal(ranking[..., :budget].sort(-1).values, policy.select(view, budget)), policy
    assert streaming.ranking(view, 8)[0, 0].tolist() == [19, 18, 17, 16, 15, 14, 1, 0, *range(13, 1, -1)]
