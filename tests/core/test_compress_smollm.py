"""Exactness contracts on the real embedded model (SmolLM2-135M-Instruct)."""

import inspect
import textwrap

import pytest
import torch
from reference import masked_decode_logits

import snapkv

pytestmark = pytest.mark.slow


def chat_ids(tokenizer, document: str, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": f"{document}\n\n{question}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def prompt(smollm):
    _, tokenizer = smollm
    document = inspect.getsource(textwrap)[:2500]
    return chat_ids(tokenizer, document, "What does the dedent function do?")


def greedy(model, ids, steps=8, **kwargs):
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


def test_budget_covering_prompt_changes_nothing(smollm, prompt):
    model, _ = smollm
    tokens, logits = greedy(model, prompt)
    with snapkv.compress(model, snapkv.SnapKV(max_capacity_prompt=prompt.shape[1])):
        tokens_c, logits_c = greedy(model, prompt)
    assert torch.equal(tokens, tokens_c)
    assert torch.allclose(logits, logits_c, atol=1e-3, rtol=0)  # CPU SDPA round-off between identical runs


@pytest.mark.parametrize("gqa", ["mean", "expand"])
def test_compressed_decoding_equals_masked_full_cache(smollm, prompt, gqa):
    model, _ = smollm
    policy = snapkv.SnapKV(window_size=16, max_capacity_prompt=128, kernel_size=5, gqa=gqa)
    with snapkv.compress(model, policy) as session:
        tokens, logits = greedy(model, prompt)
    heads = 9 if gqa == "expand" else 3
    assert {tuple(k.shape) for k in session.kept_positions.values()} == {(1, heads, 128)}
    reference = masked_decode_logits(model, tokens, prompt.shape[1], session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-3, rtol=0)


def test_left_padded_batch_equals_rows_alone(smollm):
    model, tokenizer = smollm
    texts = [inspect.getsource(textwrap)[:2000], inspect.getsource(textwrap)[3000:4000]]
    question = "Summarise this code in one sentence."
    rows = [chat_ids(tokenizer, text, question) for text in texts]
    width = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0), value=tokenizer.pad_token_id)
                     for r in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(r), (width - r.shape[1], 0)) for r in rows])
    policy = snapkv.SnapKV(window_size=16, max_capacity_prompt=160, kernel_size=5)
    with snapkv.compress(model, policy) as session:
        batched, batched_logits = greedy(model, ids, attention_mask=mask)
        batched_kept = dict(session.kept_positions)
    for i, row in enumerate(rows):
        with snapkv.compress(model, policy) as session:
            alone, alone_logits = greedy(model, row)
        assert torch.equal(batched[i, width:], alone[0, row.shape[1]:])
        assert torch.allclose(batched_logits[i], alone_logits[0], atol=1e-3, rtol=0)
        for layer, kept in batched_kept.items():
            assert torch.equal(kept[i][kept[i] >= 0].view(kept.shape[1], -1), session.kept_positions[layer][0])
