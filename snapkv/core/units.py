"""Token units: which prompt tokens form one word, line or sentence, from the tokenizer's token texts.

A policy sees tensors, not text, so the text is turned once into a role per token id (`token_roles`), stored
as a short string that a frozen policy can hold and a KV pack can save: bit JOINS (its text starts with a word
character: it may continue the previous token's word), OPEN (its text ends with a word character), LINE (its
text holds a line break) and FINAL (its text, bar trailing spaces, quotes and brackets, ends with . ! or ?). A
word character is a letter, digit or "_" (or U+FFFD, a byte-level token that is part of one character).

The units of a prompt follow from the roles of neighbouring tokens (`unit_index`); a new unit starts at
token i (and at token 0) when
  word       token i does not JOIN, or token i - 1 is not OPEN ("4829173" split into digits is one unit;
             " pass" + "code" is one; "code" + "." are two)
  line       token i - 1 holds a LINE break
  sentence   token i - 1 holds a LINE break, or is FINAL while token i neither JOINS nor holds a LINE break
             ("3.14" stays whole; "Done." and its line break are one unit)
`span_positions` keeps whole units in a policy's rank order.
"""

import base64
import functools
import zlib

import numpy as np
import torch

UNITS = ("word", "line", "sentence")
JOINS, OPEN, LINE, FINAL = 1, 2, 4, 8
_CLOSERS = "\"')]}»”’"


def _word_character(character: str) -> bool:
    return character.isalnum() or character in "_\ufffd"


def role_of(text: str) -> int:
    """The role bits of a token whose text is `text`."""
    role = 0
    if text and _word_character(text[0]):
        role |= JOINS
    if text and _word_character(text[-1]):
        role |= OPEN
    if "\n" in text or "\r" in text:
        role |= LINE
    if text.rstrip().rstrip(_CLOSERS).endswith((".", "!", "?")):
        role |= FINAL
    return role


def token_texts(tokenizer) -> list[str]:
    """The text of every token id of `tokenizer` (`len(tokenizer)` ids), as it reads after a plain letter:
    decode([a, id]) less decode([a]), since decoding a SentencePiece word alone drops its leading space."""
    letter = tokenizer.encode("a", add_special_tokens=False)
    if not letter:
        raise ValueError(f"{type(tokenizer).__name__} encodes 'a' to no token: token units need a tokenizer that "
                         "encodes and decodes text")
    anchor = letter[-1]
    prefix = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    return [text[len(prefix):] if text.startswith(prefix) else text for text in texts]


@functools.lru_cache(maxsize=8)
def token_roles(tokenizer) -> str:
    """Every token id's role bits, zlib-compressed and base64-encoded: a few kilobytes of ASCII."""
    roles = np.array([role_of(text) for text in token_texts(tokenizer)], dtype=np.uint8)
    return base64.b64encode(zlib.compress(roles.tobytes(), 9)).decode("ascii")


@functools.lru_cache(maxsize=8)
def decode_roles(encoded: str) -> torch.Tensor:
    """uint8 (vocab,) role bits from `token_roles`'s string; ValueError when it is not one."""
    try:
        data = zlib.decompress(base64.b64decode(encoded.encode("ascii"), validate=True))
    except (ValueError, zlib.error):
        raise ValueError("token_roles is not a string made by snapkv.core.units.token_roles: build the policy "
                         "with tokenizer=... instead") from None
    if not data:
        raise ValueError("token_roles describes no token: build the policy with tokenizer=...")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def unit_index(input_ids: torch.Tensor, roles: torch.Tensor, unit: str) -> torch.Tensor:
    """long (batch, n): the unit number of each position of `input_ids` (batch, n), 0 for the first unit and
    one more at every new unit (see the module docstring). Ids beyond `roles` have no role."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    known = input_ids < roles.shape[0]
    role = torch.where(known, roles.to(input_ids.device)[input_ids.clamp(max=roles.shape[0] - 1)], 0).long()
    previous, current = role[:, :-1], role[:, 1:]
    if unit == "word":
        starts = (current & JOINS == 0) | (previous & OPEN == 0)
    elif unit == "line":
        starts = previous & LINE != 0
    else:
        starts = (previous & LINE != 0) | ((previous & FINAL != 0) & (current & (JOINS | LINE) == 0))
    first = torch.zeros_like(starts[:, :1])
    return torch.cat([first, starts], dim=1).long().cumsum(dim=1)


def span_positions(ranking: torch.Tensor, units: torch.Tensor, budget: int, tail: int = 0) -> torch.Tensor:
    """Kept positions (batch, heads, budget), ascending: the last `tail` positions (the window), then the ranked
    positions' whole units, in rank order.

    ranking: long (batch, heads, n), every position, best first. units: long (batch, n) from `unit_index`.
    After the window, positions are taken unit by unit, a unit at the rank of its best-ranked position (the unit
    the window starts inside comes first); the first unit that does not fit in what is left of the budget is cut
    to its best-ranked positions, which fill the budget exactly, so at most one kept unit is partial.
    """
    b, heads, n = ranking.shape
    rank = torch.empty_like(ranking).scatter_(-1, ranking, torch.arange(n, device=ranking.device).expand(b, heads, n))
    unit_of = units[:, None, :].expand(b, heads, n)
    unit_rank = torch.full_like(rank, n).scatter_reduce(-1, unit_of, rank, "amin")
    key = unit_rank.gather(-1, unit_of) * n + rank
    key[..., n - tail :] = -1
    return key.argsort(dim=-1)[..., :budget].sort(dim=-1).values
