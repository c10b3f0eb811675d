"""The prompt sets are deterministic, within their token lengths, and self-consistent; source prompts are
the standard library's source, module after module, cut to the requested length."""

from types import SimpleNamespace

import pytest

from snapkv.analysis.text import (
    MAX_TOKENS,
    MIN_TOKENS,
    build_prompt_sets,
    chat_ids,
    chat_parts,
    chat_request,
    load_prompt_set,
    module_source,
    question_text,
    special_prefix_ids,
    stdlib_source_ids,
    token_ids,
)


def characters(text, add_special_tokens=False):
    """A tokenizer with one token per character."""
    return SimpleNamespace(input_ids=[ord(c) for c in text])


class BaseModelTokenizer:
    """One token per character, 0 = <bos> before any text, no chat template (like gemma-3-270m's)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[0] * add_special_tokens + [ord(c) for c in text])


def test_a_base_model_gets_the_plain_question_answer_format():
    tokenizer = BaseModelTokenizer()
    assert special_prefix_ids(tokenizer) == [0] and chat_parts(tokenizer) == ([0], "\nAnswer:")
    asked = question_text(tokenizer, "What is the capital of France?")
    assert chat_ids(tokenizer, asked) == [0] + [ord(c) for c in "Question: What is the capital of France?\nAnswer:"]
    record = dict(module="textwrap", context="import re\n")
    assert chat_request(record, tokenizer) == ("Question: Here is the beginning of the Python module `textwrap`:"
                                               "\n\nimport re\n\nContinue the module from where it stops.")
    assert chat_request(record) == chat_request(record, tokenizer).removeprefix("Question: ")


def test_source_ids_are_the_modules_source_one_after_the_other():
    argparse, textwrap = module_source("argparse"), module_source("textwrap")
    assert stdlib_source_ids(characters, 500) == [ord(c) for c in ("# ---- argparse ----\n" + argparse)[:500]]
    assert stdlib_source_ids(characters, 500, headers=False) == [ord(c) for c in argparse[:500]]
    joined = f"# ---- textwrap ----\n{textwrap}\n# ---- argparse ----\n{argparse}"
    assert stdlib_source_ids(characters, len(textwrap) + 100, ("textwrap", "argparse")) == [
        ord(c) for c in joined[: len(textwrap) + 100]]
    with pytest.raises(ValueError, match="fewer than"):
        stdlib_source_ids(characters, len(textwrap) + 100, ("textwrap",))


@pytest.mark.slow
def test_source_ids_of_every_length_start_alike(smollm):
    _, tokenizer = smollm
    long = stdlib_source_ids(tokenizer, 16384)
    assert long[:1024] == stdlib_source_ids(tokenizer, 1024)
    assert long[:4096] == token_ids(tokenizer, "# ---- argparse ----\n" + module_source("argparse"))[:4096]
    assert stdlib_source_ids(tokenizer, 8064, headers=False) == token_ids(tokenizer, module_source("argparse"))[:8064]


@pytest.mark.slow
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
