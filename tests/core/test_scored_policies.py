"""A policy written as a score (`snapkv.ScoredPolicy`) with public names only, the method registry's contract
tests (every registered method, the moment it is registered), and the user's attention kernel kept."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from reference import masked_decode_logits
from tiny_models import greedy, prompt_ids, tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

import snapkv

PROMPT, WINDOW, BUDGET = 60, 8, 24
TOKENIZER = tiny_tokenizer()  # for the methods that read token text (`snapkv.core.registry.needs_tokenizer`)


@dataclass(frozen=True)
class SmallKeys(snapkv.ScoredPolicy):
    def score(self, view):
        return -view.keys.float().norm(dim=-1)


@dataclass(frozen=True)
class QuietInputs(snapkv.ScoredPolicy):
    """Reads what only an observation gives: the attention input (hidden states) and the values."""

    observes: ClassVar[frozenset[str]] = frozenset({"hidden_states"})

    def score(self, view):
        quiet = -view.hidden_states.float().norm(dim=-1)  # (batch, n)
        return quiet[:, None, :] + view.values.float().norm(dim=-1)


snapkv.register_method("smallkeys", SmallKeys)
snapkv.register_method("quiet-inputs", QuietInputs)
FAMILIES = ("llama", "gemma3")  # plain GQA, and sliding layers that are never compressed


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def prefilled_cache(model, ids):
    return model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True).past_key_values


def test_small_keys_keeps_the_window_and_the_smallest_keys_per_head():
    model = tiny_model("llama")
    ids = prompt_ids()
    full = prefilled_cache(model, ids)  # the keys the policy scores (post-RoPE)
    with snapkv.compress(model, SmallKeys(max_capacity_prompt=BUDGET, window_size=WINDOW)) as session:
        compressed = prefilled_cache(model, ids)
    assert sorted(session.kept_positions) == [0, 1, 2]
    for layer, kept in session.kept_positions.items():
        keys = full.layers[layer].keys  # (batch, kv_heads, n, head_dim)
        norms = keys.float().norm(dim=-1)[..., : PROMPT - WINDOW]
        for row in range(ids.shape[0]):
            for head in range(keys.shape[1]):
                smallest = set(norms[row, head].argsort()[: BUDGET - WINDOW].tolist())
                assert set(kept[row, head].tolist()) == smallest | set(range(PROMPT - WINDOW, PROMPT))
                assert kept[row, head].tolist() == sorted(kept[row, head].tolist())
        stored = compressed.layers[layer].keys
        assert torch.equal(stored, keys.gather(2, kept[..., None].expand(-1, -1, -1, keys.shape[-1])))


@pytest.mark.slow
def test_small_keys_on_the_embedded_model_keeps_the_window_and_the_smallest_keys(smollm):
    from snapkv.analysis.text import cut_to_tokens, module_source

    model, tokenizer = smollm
    text = cut_to_tokens(module_source("textwrap"), tokenizer, 300)  # no repeated text: no near-tied norms
    messages = [{"role": "user", "content": f"{text}\n\nWhat does this module do?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    n, budget, window = ids.shape[1], 96, 16
    full = prefilled_cache(model, ids)
    with snapkv.compress(model, SmallKeys(max_capacity_prompt=budget, window_size=window)) as session:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert len(session.kept_positions) == model.config.num_hidden_layers and out.shape[1] > n
    for layer, kept in session.kept_positions.items():
        norms = full.layers[layer].keys.float().norm(dim=-1)[0, :, : n - window]  # (kv_heads, prefix)
        for head in range(norms.shape[0]):
            smallest = set(norms[head].argsort()[: budget - window].tolist())
            assert kept[0, head].tolist() == sorted(smallest | set(range(n - window, n)))


def test_a_score_of_the_wrong_shape_is_refused():
    @dataclass(frozen=True)
    class Flat(snapkv.ScoredPolicy):
        def score(self, view):
            return view.keys.float().norm(dim=-1).mean(1)

    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"Flat.score returned shape \(2, 60\); expected \(batch, cache_heads, n\)"):
        with snapkv.compress(model, Flat(max_capacity_prompt=BUDGET, window_size=WINDOW)):
            prefilled_cache(model, prompt_ids())


def test_only_what_a_policy_observes_is_recorded(model):
    ids = prompt_ids(1)
    for policy, present in [(SmallKeys(max_capacity_prompt=BUDGET, window_size=WINDOW), set()),
                            (snapkv.SnapKV(window_size=WINDOW, max_capacity_prompt=BUDGET), {"query_window"}),
                            (snapkv.H2O(window_size=WINDOW, max_capacity_prompt=BUDGET), {"accumulated"}),
                            (QuietInputs(max_capacity_prompt=BUDGET, window_size=WINDOW), {"hidden_states"})]:
        with snapkv.compress(model, policy, prefill_chunk_size=20) as session:
            model(ids, use_cache=True)  # one forward the session takes for a chunk: observed, not compressed
            states = list(session._layers.values())
        assert states
        for name in ("query_window", "accumulated", "hidden_states"):
            assert all((getattr(s, name) is not None) == (name in present) for s in states), (policy, name)
        if "hidden_states" in present:
            assert states[0].hidden_states.shape == (1, PROMPT, model.config.hidden_size)


# -- the engine's contracts, for every registered method ---------------------------------------------------
def registered(budget):
    return [(name, snapkv.method_policy(name, budget, window_size=WINDOW, kernel_size=3, tokenizer=TOKENIZER))
            for name in snapkv.method_names()]


def test_every_registered_method_changes_nothing_when_the_budget_covers_the_prompt(model):
    ids = prompt_ids()
    tokens, logits = greedy(model, ids)
    for name, policy in registered(PROMPT + 10):
        with snapkv.compress(model, policy):
            tokens_c, logits_c = greedy(model, ids)
        assert torch.equal(tokens, tokens_c), name
        assert torch.allclose(logits, logits_c, atol=1e-5, rtol=0), name


@pytest.mark.parametrize("name", snapkv.method_names())
def test_every_registered_method_decodes_as_the_masked_full_cache(model, name):
    policy = snapkv.method_policy(name, BUDGET, window_size=WINDOW, kernel_size=3, tokenizer=TOKENIZER)
    ids = prompt_ids()
    with snapkv.compress(model, policy) as session:
        tokens, logits = greedy(model, ids)
    reference = masked_decode_logits(model, tokens, PROMPT, session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", snapkv.method_names())
def test_every_registered_method_treats_a_left_padded_batch_as_its_rows(name):
    model = tiny_model("llama")
    policy = snapkv.method_policy(name, BUDGET, window_size=WINDOW, kernel_size=3, tokenizer=TOKENIZER)
    rows = [prompt_ids(1, n, seed=n) for n in (60, 40)]
    ids = torch.cat([torch.cat([torch.zeros(1, 60 - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = (ids != 0).long()
    mask[1, 20:] = 1
    with snapkv.compress(model, policy) as session:
        batched, batched_logits = greedy(model, ids, attention_mask=mask)
        batched_kept = dict(session.kept_positions)
    for i, row in enumerate(rows):
        with snapkv.compress(model, policy) as session:
            alone, alone_logits = greedy(model, row)
        assert torch.equal(batched[i, 60:], alone[0, row.shape[1]:])
        assert torch.allclose(batched_logits[i], alone_logits[0], atol=1e-4, rtol=0)
        for layer, kept in batched_kept.items():
            for head, alone_head in zip(kept[i], session.kept_positions[layer][0], strict=True):
                assert torch.equal(head[head >= 0], alone_head[alone_head >= 0])


@pytest.mark.parametrize("name", snapkv.method_names())
def test_every_registered_method_records_what_it_decodes_with(name):
    model = tiny_model("llama")
    policy = snapkv.method_policy(name, BUDGET, window_size=WINDOW, kernel_size=3, tokenizer=TOKENIZER)
    ids = prompt_ids()
    with snapkv.compress(model, policy) as session, snapkv.record(model, window_size=WINDOW) as rec:
        tokens, logits = greedy(model, ids)
    trace = rec.trace
    for layer, kept in session.kept_positions.items():
        assert torch.equal(trace.kept_positions(layer), kept)
        rows = trace.generation_attention(layer)  # (batch, heads, steps, prompt)
        evicted = torch.ones(*kept.shape[:2], PROMPT, dtype=torch.bool).scatter_(2, kept.clamp(min=0), False)
        evicted = evicted.repeat_interleave(rows.shape[1] // kept.shape[1], dim=1)[:, :, None].expand_as(rows)
        assert rows[evicted].abs().max() == 0 if evicted.any() else True
    reference = masked_decode_logits(model, tokens, PROMPT, session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-4, rtol=0)


# -- the user's kernel ----------------------------------------------------------------------------------
def counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(function.__name__)
        return function(*args, **kwargs)

    return counted


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_compress_and_record_keep_the_kernel_the_model_was_loaded_with(kernel, monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=kernel,
                                             dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    calls = []
    monkeypatch.setattr(modeling_llama, "eager_attention_forward",
                        counting(modeling_llama.eager_attention_forward, calls))
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa",
                        counting(ALL_ATTENTION_FUNCTIONS["sdpa"], calls))
    ids = prompt_ids()
    policy = snapkv.SnapKV(window_size=WINDOW, max_capacity_prompt=BUDGET, kernel_size=3)
    with snapkv.compress(model, policy) as session, snapkv.record(model, window_size=WINDOW) as rec:
        tokens, logits = greedy(model, ids)
    used = set(calls)
    assert used == {"eager_attention_forward" if kernel == "eager" else "sdpa_attention_forward"}
    assert model.config._attn_implementation == kernel
    reference = masked_decode_logits(model, tokens, PROMPT, session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-4, rtol=0)
    assert rec.trace.kept_positions(0) is not None


def test_an_unknown_kernel_is_refused_with_the_fix():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"snapkv wraps the 'sdpa' and 'eager' attention kernels, but the model "
                                         r"runs 'flex_attention': load it with attn_implementation=\"sdpa\""):
        with snapkv.compress(model, snapkv.SnapKV()):
            pass
    assert model.config._attn_implementation == "flex_attention"
