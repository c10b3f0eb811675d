"""Greedy answers decoded in left-padded batches (`attention.greedy_continuations`): what they keep exactly and
how often their tokens agree with one-by-one decoding."""

import pytest
import torch
from tiny_models import tiny_model

from snapkv.analysis.observation.attention import greedy_continuations


def one_by_one(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)


def test_batches_keep_each_prompt_its_order_and_the_answer_length():
    model = tiny_model("llama")
    torch.manual_seed(1)
    prompts = [torch.randint(3, 128, (1, n)) for n in (40, 25, 33, 12)]
    answers = greedy_continuations(model, prompts, 7, batch_size=3)
    for prompt, answer in zip(prompts, answers):
        assert answer.shape == (1, prompt.shape[1] + 7)
        assert torch.equal(answer[:, : prompt.shape[1]], prompt)  # no padding left in, rows not swapped
    for prompt, answer in zip(prompts, greedy_continuations(model, prompts, 7, batch_size=1)):
        assert torch.equal(answer, one_by_one(model, prompt, 7))  # batch size 1 is plain generate


AGREEMENT = 0.95  # the stated bound: share of answer tokens identical to one-by-one greedy decoding


@pytest.mark.slow
def test_batched_answers_agree_with_one_by_one_on_the_real_model(smollm, one_thread):
    from snapkv.analysis.text import chat_ids, chat_request, load_prompt_set

    model, tokenizer = smollm
    samples = sorted(load_prompt_set("chat", "data"), key=lambda r: r["context_tokens"])[:4]
    prompts = [torch.tensor(chat_ids(tokenizer, chat_request(s, tokenizer, 400)))[None] for s in samples]
    batched = greedy_continuations(model, prompts, 32, batch_size=4)
    same = [(answer[0, p.shape[1]:] == one_by_one(model, p, 32)[0, p.shape[1]:]).float().mean().item()
            for p, answer in zip(prompts, batched)]
    # measured: 1.00 of 6 x 48 tokens (600-token prompts, batches of 3); a batch is not bit-exact, so allow a little
    assert sum(same) / len(same) >= AGREEMENT, same
