"""KV packs on the real embedded model (SmolLM2-135M-Instruct): one ~1K-token document, many questions, exactly
the answers of recomputing (full pack) or of the policy's own session (compressed pack)."""

import pytest
import torch

import snapkv
from snapkv.analysis.text import chat_parts, cut_to_tokens, module_source, token_ids
from snapkv.core import compat

pytestmark = pytest.mark.slow

STEPS = 8
QUESTIONS = (
    "What does dedent do?", "What does indent do?", "What is the default width of TextWrapper?",
    "What does fill return?", "What does shorten do?", "Which modules does this file import?",
    "What is the placeholder used by shorten?", "What does expand_tabs do?", "What does tabsize set?",
    "What does break_long_words control?", "What does drop_whitespace mean?", "Who wrote this module?",
    "What does wrap return?", "What is a chunk here?", "What does fix_sentence_endings do?",
    "Summarise this file in one sentence.", "What is whitespace_trans?", "What does max_lines limit?",
    "What does break_on_hyphens do?", "What does initial_indent add?",
)
SNAPKV = snapkv.SnapKV(window_size=32, max_capacity_prompt=256, kernel_size=7)


@pytest.fixture(scope="module")
def document(smollm):
    """(context ids (1, n), [question ids (1, q)]): the chat head and the start of textwrap's source, then each
    question closing the user turn."""
    _, tokenizer = smollm
    head, end = chat_parts(tokenizer)
    context = head + token_ids(tokenizer, cut_to_tokens(module_source("textwrap"), tokenizer, 1000))
    questions = [torch.tensor([token_ids(tokenizer, f"\n\n{question}{end}")]) for question in QUESTIONS]
    return torch.tensor([context]), questions


def greedy(generate, ids, **kwargs):
    out = generate(ids, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True,
                   **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def in_session(model, policy, context, question):
    cache = compat.new_cache(model)
    with snapkv.compress(model, policy) as session:
        compat.prefill(model, context, cache)
        session.compress_before_next_forward()
        return greedy(lambda ids, **kw: compat.generate(model, ids, cache, **kw), torch.cat([context, question], 1))


@pytest.fixture(scope="module")
def recomputed(smollm, document):
    """Greedy tokens and logits of recomputing context + question, for every question."""
    model, _ = smollm
    context, questions = document
    return [greedy(model.generate, torch.cat([context, question], 1)) for question in questions]


@pytest.fixture(scope="module")
def full_pack(smollm, document):
    model, tokenizer = smollm
    return snapkv.pack(model, document[0], tokenizer=tokenizer)


def assert_same_answers(generate, questions, references):
    for question, (tokens, logits) in zip(questions, references):
        tokens_p, logits_p = greedy(generate, question)
        assert torch.equal(tokens_p, tokens)
        assert torch.allclose(logits_p, logits, atol=1e-3, rtol=0)  # CPU SDPA round-off, not a different answer


def test_full_pack_answers_twenty_questions_as_recomputing_does(full_pack, document, recomputed):
    assert document[0].shape[1] > 900 and len(document[1]) == 20
    assert_same_answers(full_pack.generate, document[1], recomputed)


def test_full_pack_after_save_and_load(smollm, full_pack, document, recomputed, tmp_path):
    model, tokenizer = smollm
    loaded = snapkv.KVPack.load(full_pack.save(tmp_path / "full"), model, tokenizer)
    assert_same_answers(loaded.generate, document[1][-5:], recomputed[-5:])  # tests/core/test_pack.py: same tensors


def test_full_pack_samples_as_recomputing_does_under_a_seed(smollm, full_pack, document):
    model, _ = smollm
    context, questions = document
    for seed, question in enumerate(questions[:2]):
        torch.manual_seed(seed)
        sampled = model.generate(torch.cat([context, question], 1), max_new_tokens=STEPS, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
        assert torch.equal(full_pack.generate(question, max_new_tokens=STEPS, do_sample=True, temperature=1.0,
                                              top_k=0, top_p=1.0), sampled)


@pytest.fixture(scope="module")
def compressed(smollm, document):
    """A SnapKV-256 pack, and what the policy's own session answers to the first 4 questions."""
    model, tokenizer = smollm
    context, questions = document
    references = [in_session(model, SNAPKV, context, question) for question in questions[:4]]
    return snapkv.pack(model, context, SNAPKV, tokenizer=tokenizer), references


def test_compressed_pack_answers_as_the_policy_in_session(compressed, document):
    packed, references = compressed
    assert packed.compressed and packed.cache.layers[0].keys.shape[-2] == 256
    assert_same_answers(packed.generate, document[1][:4], references)


def test_compressed_pack_after_save_and_load(smollm, full_pack, compressed, document, tmp_path):
    model, tokenizer = smollm
    packed, references = compressed
    path = packed.save(tmp_path / "snapkv")
    size = sum(file.stat().st_size for file in path.iterdir())
    assert packed.nbytes < size < packed.nbytes + 200_000  # the kept slots, plus metadata
    assert packed.nbytes < 1.05 * full_pack.nbytes * 256 / packed.context_length  # K, V and positions of 256 slots
    loaded = snapkv.KVPack.load(path, model, tokenizer)
    assert loaded.policy == SNAPKV
    assert_same_answers(loaded.generate, document[1][:4], references)


@pytest.mark.parametrize("kind", ["full", "compressed"])
def test_left_padded_question_batch_equals_one_by_one(smollm, full_pack, compressed, document, kind):
    _, tokenizer = smollm
    packed = full_pack if kind == "full" else compressed[0]
    questions = [question[0] for question in document[1][4:8]]
    width = max(len(q) for q in questions)
    batch = torch.stack([torch.cat([torch.full((width - len(q),), tokenizer.pad_token_id), q]) for q in questions])
    mask = torch.stack([(torch.arange(width) >= width - len(q)).long() for q in questions])
    tokens, logits = greedy(packed.generate, batch, attention_mask=mask)
    start = packed.context_length + width
    for row, question in enumerate(questions):
        alone, alone_logits = greedy(packed.generate, question[None])
        answer = alone[0, packed.context_length + len(question):]  # may stop early; the batch pads the rest
        assert torch.equal(tokens[row, start : start + len(answer)], answer)
        assert torch.allclose(logits[row, : len(answer)], alone_logits[0], atol=1e-3, rtol=0)
