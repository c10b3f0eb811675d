"""The prompt sets are deterministic, within their token lengths, and self-consistent."""

import pytest

from snapkv.analysis.text import (
    MAX_TOKENS,
    MIN_TOKENS,
    build_prompt_sets,
    chat_ids,
    chat_request,
    load_prompt_set,
)

pytestmark = pytest.mark.slow


def test_build_is_deterministic_and_checks_lengths(smollm, tmp_path):
    _, tokenizer = smollm
    first = build_prompt_sets(tokenizer, tmp_path / "a")
    second = build_prompt_sets(tokenizer, tmp_path / "b")
    for name in ("documents", "chat"):
        assert first[name].read_bytes() == second[name].read_bytes()
    documents = load_prompt_set("documents", tmp_path / "a")
    assert len(documents) >= 20
    for document in documents:
        assert MIN_TOKENS <= len(tokenizer(document["text"], add_special_tokens=False).input_ids) <= MAX_TOKENS
        depths = [q["depth"] for q in document["questions"]]
        assert len(document["questions"]) == 4 and depths == sorted(depths) and len(set(depths)) == 4
        for question in document["questions"]:
            assert question["name"] in document["text"] and question["answer"].split("\n")[0] in document["text"]
    chat = load_prompt_set("chat", tmp_path / "a")
    assert len(chat) >= 20
    record = chat[0]
    assert len(tokenizer(record["response"], add_special_tokens=False).input_ids) >= 500
    short = chat_ids(tokenizer, chat_request(record, tokenizer, max_context_tokens=300))
    assert 300 < len(short) < 400


def test_missing_or_unknown_sets_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="snapkv build-data"):
        load_prompt_set("documents", tmp_path)
    with pytest.raises(ValueError, match="unknown prompt set 'needles'"):
        load_prompt_set("needles", tmp_path)
