"""Tiny randomly initialised decoders built in code (no hub): one per attention family we support."""

from types import SimpleNamespace

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen3Config,
)

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**COMMON)
    if family == "qwen3":  # QK-norm
        return Qwen3Config(**COMMON, head_dim=16)
    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=None)
    if family == "gemma3":  # local sliding layers + global layers
        return Gemma3TextConfig(
            **COMMON, head_dim=16, sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    raise ValueError(family)


FAMILIES = ("llama", "qwen3", "mistral", "gemma3")


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    return model.eval()


def prompt_ids(batch: int = 2, length: int = 60, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, length) the tiny models accept, reproducible by `seed`."""
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, steps: int = 6, **kwargs):
    """`steps` greedy tokens: (sequences, the logits of every step (batch, steps, vocab))."""
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


EOS = 127


class AsciiTokenizer:
    """One token per ASCII character (non-ASCII becomes '?'), id 127 = end of turn: fits the tiny models."""

    eos_token_id = EOS
    unk_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(c) if ord(c) < EOS else ord("?") for c in text])

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i != EOS)

    chat_template = "<u>{{ messages[0]['content'] }}</u>\n<a>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<u>" + messages[0]["content"] + "</u>\n<a>"


class PlainAsciiTokenizer(AsciiTokenizer):
    """A base model's tokenizer: no chat template, id 1 = <bos> put before any text."""

    chat_template = None
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text).input_ids
        return SimpleNamespace(input_ids=[self.bos_token_id] * add_special_tokens + ids)


WORDS = ("the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "a", "is", "pass", "code", "it", "was", "in",
         "of", "that", "he", "she", "for", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from",
         "by", "hot", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when")
PIECES = ("ing", "ed", "er", "ly", "ion", "ure", "es", "est", "ness", "ment", "able", "ful", "less", "ous", "ive",
          "al", "ic", "ism", "ist", "ity", "ize", "ward", "wise", "ship")


def tiny_tokenizer():
    """A byte-level BPE tokenizer of the tiny models' 128 ids, built in code (no hub): specials, letters, digits,
    punctuation, a space, line breaks, " word" tokens and word pieces; Ġ is a space and Ċ a line break."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = (["<pad>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?:;'\"()") + ["Ġ", "Ċ", "ĊĊ"]
              + ["Ġ" + word for word in WORDS] + list(PIECES) + [".Ċ", "Ġ(", "),", "Ġ\"", "?\"", "Ġ1", "Ġ2"])
    assert len(set(tokens)) == 128, len(set(tokens))
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
