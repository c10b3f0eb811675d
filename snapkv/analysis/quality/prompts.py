"""Needle-in-a-haystack and RULER-style task prompts, built from token ids so that lengths and needle depths
are exact:

    context_ids = chat-template head + context (haystack with inserted facts, or a source-file prefix)
    tail_ids    = "\\n\\n" + question + end of the user turn + assistant header + answer prefix

For a tokenizer without a chat template (a base model) the head is its special prefix (``<bos>``) and the
tail "\\n\\nQuestion: " + question + "\\nAnswer: " + answer prefix (`snapkv.analysis.text.chat_parts`).
"""

import ast
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from snapkv.analysis.text import (
    MODULES,
    answer_start,
    chat_parts,
    load_haystack,
    module_source,
    question_text,
    token_ids,
)
from snapkv.core import check_int

DEFAULT_LENGTHS = (1000, 2000, 4000, 6000, 8000)
DEFAULT_DEPTHS = tuple(round(i / 10, 1) for i in range(11))
TASKS = ("single_key", "multi_key", "multi_value", "variable_tracking", "code_completion")
NEEDLE_FORMATS = ("number", "passphrase")

CITIES = (
    "Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Quito", "Tunis", "Riga", "Seoul", "Accra", "Bogota",
    "Zagreb", "Manila", "Havana", "Tbilisi", "Kyoto", "Porto", "Dakar", "Lyon", "Perth", "Cusco", "Malmo", "Bergen",
    "Valencia", "Krakow", "Tallinn", "Mombasa", "Medellin", "Seville", "Montreal", "Osaka", "Vienna", "Cairo",
    "Santiago", "Helsinki", "Marseille", "Glasgow", "Adelaide", "Busan",
)
WORDS = (
    "amber", "falcon", "cobalt", "meadow", "harbor", "velvet", "granite", "willow", "saffron", "glacier", "ember",
    "lantern", "orchid", "thunder", "copper", "juniper", "marble", "sparrow", "canyon", "indigo",
)


def _haystacktoken_ids(tokenizer, text: str | None, lengths) -> list[int]:
    """Token ids of the haystack's first 40 characters per token of the longest prompt (about ten prompts'
    worth: sample windows are drawn from it), so a short run does not tokenize a whole long text."""
    text = load_haystack() if text is None else text
    return token_ids(tokenizer, text[: 40 * max(lengths)])


@dataclass(frozen=True)
class QualityPrompt:
    """One test prompt: context_ids (chat head + context) then tail_ids (question, end of turn, assistant
    header, answer prefix; without a chat template: <bos> + context, then "Question: ...\\nAnswer: ...").
    `expected` holds the strings the answer must contain (or the reference line for scoring
    "edit_similarity")."""

    task: str
    length: int
    sample: int
    context_ids: tuple[int, ...]
    tail_ids: tuple[int, ...]
    expected: tuple[str, ...]
    scoring: str  # "contains_all" or "edit_similarity"
    max_new_tokens: int
    question: str
    depth: float | None = None  # needle: where its first token sits in the haystack (0 = start, 1 = end)
    stop_at_newline: bool = False  # the answer is one line: stop decoding at its end
    needle_position: int | None = None  # needle: prompt position of its first token
    needle: str | None = None  # needle: the inserted sentence (tokenized as "\n" + needle + "\n")

    @property
    def prompt_tokens(self) -> int:
        return len(self.context_ids) + len(self.tail_ids)

    @property
    def ids(self) -> list[int]:
        return list(self.context_ids) + list(self.tail_ids)


def question_tail(tokenizer, end: str, question: str, answer_prefix: str) -> list[int]:
    asked = question_text(tokenizer, question)
    return token_ids(tokenizer, f"\n\n{asked}{answer_start(tokenizer, end, answer_prefix)}")


def fill_haystack(haystack: list[int], inserts: list[tuple[float, list[int]]], length: int, rng: random.Random
          ) -> tuple[list[int], list[int]]:
    """`length` tokens: a window of the haystack with each (depth, ids) insert placed so that it starts at
    haystack token round(depth * filler) (filler = length minus the inserts), inserts in depth order.
    Returns (ids, start position of each insert in the order given)."""
    filler = length - sum(len(ids) for _, ids in inserts)
    if filler < 0:
        raise ValueError(f"{length} tokens cannot hold the inserted facts ({length - filler} tokens)")
    if filler > len(haystack):
        raise ValueError(f"the haystack has {len(haystack)} tokens; {filler} are needed: use a longer text")
    start = rng.randrange(0, len(haystack) - filler + 1)
    text = haystack[start : start + filler]
    order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    out, starts, taken = [], [0] * len(inserts), 0
    for i in order:
        depth, ids = inserts[i]
        cut = max(round(depth * filler), taken)
        out += text[taken:cut]
        starts[i] = len(out)
        out += ids
        taken = cut
    out += text[taken:]
    return out, starts


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid_key(rng: random.Random) -> str:
    return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4))


def needle_fact(rng: random.Random, needle_format: str = "number") -> dict:
    """A needle: key (a city), value, sentence, question and answer prefix."""
    city = rng.choice(CITIES)
    if needle_format == "number":
        value = _number(rng)
        return dict(key=city, value=value, sentence=f"The special magic number for {city} is {value}.",
                    question=f"What is the special magic number for {city} mentioned in the provided text?",
                    answer_prefix=f"The special magic number for {city} mentioned in the provided text is")
    if needle_format == "passphrase":
        value = f"{rng.choice(WORDS)}-{rng.randint(1000, 9999)}"
        return dict(key=city, value=value, sentence=f"The secret passphrase for {city} is {value}.",
                    question=f"What is the secret passphrase for {city}?",
                    answer_prefix=f"The secret passphrase for {city} is")
    raise ValueError(f"unknown needle_format {needle_format!r}: choose one of {NEEDLE_FORMATS}")


def check_lengths(lengths) -> list[int]:
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths is empty: give at least one context length")
    return [check_int("lengths", length, 1) for length in lengths]


def check_samples(samples) -> int:
    return check_int("samples", samples, 1)


def needle_prompts(tokenizer, *, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, samples: int = 1, seed: int = 0,
                   haystack_text: str | None = None, needle_format: str = "number") -> list[QualityPrompt]:
    """Needle-in-a-haystack prompts, exactly `length` tokens each, for every length, depth and sample.

    The needle sentence starts at haystack token round(depth * haystack tokens) (0 = first token of the
    context, 1 = just before the question); each sample draws its own needle and haystack window from
    `seed` (the same needle and window at every depth, so depths are comparable).
    """
    lengths, samples = check_lengths(lengths), check_samples(samples)
    depths = list(depths)
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {depths}")
    haystack = _haystacktoken_ids(tokenizer, haystack_text, lengths)
    head, end = chat_parts(tokenizer)
    prompts = []
    for length in lengths:
        for sample in range(samples):
            rng = random.Random(f"needle-{seed}-{length}-{sample}")
            fact = needle_fact(rng, needle_format)
            needle = token_ids(tokenizer, f"\n{fact['sentence']}\n")
            tail = question_tail(tokenizer, end, fact["question"], fact["answer_prefix"])
            body = length - len(head) - len(tail)
            window_rng_state = rng.getstate()
            for depth in depths:
                rng.setstate(window_rng_state)
                context, (start,) = fill_haystack(haystack, [(depth, needle)], body, rng)
                prompts.append(QualityPrompt(
                    task="needle", length=length, sample=sample, context_ids=tuple(head + context),
                    tail_ids=tuple(tail), expected=(fact["value"],), scoring="contains_all", max_new_tokens=12,
                    question=fact["question"], stop_at_newline=True, depth=depth, needle_position=len(head) + start,
                    needle=fact["sentence"]))
    return prompts


def _kv_sentence(key: str, value: str) -> str:
    return f"The value of key {key} is {value}."


def _task_facts(task: str, rng: random.Random) -> dict:
    """Inserted sentences (with depths), question, answer prefix, expected strings for a synthetic task."""
    if task in ("single_key", "multi_key"):
        pairs = [(_uuid_key(rng), _number(rng)) for _ in range(1 if task == "single_key" else 4)]
        key, value = rng.choice(pairs)
        sentences = [_kv_sentence(k, v) for k, v in pairs]
        return dict(sentences=sentences, expected=(value,), max_new_tokens=12, stop_at_newline=True,
                    question=f"What is the value of key {key} mentioned in the provided text?",
                    answer_prefix=f"The value of key {key} mentioned in the provided text is")
    if task == "multi_value":
        key, values = _uuid_key(rng), [_number(rng) for _ in range(4)]
        return dict(sentences=[_kv_sentence(key, v) for v in values], expected=tuple(values), max_new_tokens=32,
                    question=f"What are all the values of key {key} mentioned in the provided text?",
                    answer_prefix=f"The values of key {key} mentioned in the provided text are:")
    if task == "variable_tracking":
        value = str(rng.randint(10000, 99999))
        names = []
        while len(names) < 5:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        sentences = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
        return dict(sentences=sentences, expected=tuple(names), max_new_tokens=32, ordered=True,
                    question=f"Find all variables that are assigned the value {value} in the text above.",
                    answer_prefix=f"According to the chain of variable assignments in the text above, "
                                  f"{len(names)} variables are assigned the value {value}, they are:")
    raise ValueError(f"unknown task {task!r}: choose from {TASKS}")


CODE_INSTRUCTION = "Please complete the code given below.\n\n"
CODE_QUESTION = "Next line of code:"


def _good_target_line(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 10 and not stripped.startswith(("#", '"', "'")) and any(c.isalpha() for c in stripped)


def _code_prompt(tokenizer, rng: random.Random, head, end, length: int, sample: int, modules) -> QualityPrompt:
    tail = question_tail(tokenizer, end, CODE_QUESTION, "")
    instruction = token_ids(tokenizer, CODE_INSTRUCTION)
    body = length - len(head) - len(tail) - len(instruction)
    candidates = list(modules)
    rng.shuffle(candidates)
    for name in candidates:
        source = module_source(name)
        lines = source.splitlines(keepends=True)
        statements = {node.lineno - 1 for node in ast.walk(ast.parse(source)) if isinstance(node, ast.stmt)}
        counts = np.cumsum([len(token_ids(tokenizer, line)) for line in lines])
        fits = int(np.searchsorted(counts, body, side="right"))  # lines[:fits] fit (approximately)
        if fits >= len(lines) or fits < 3:
            continue
        for cut in range(fits, 2, -1):
            if cut not in statements or not _good_target_line(lines[cut]):  # a statement's first line
                continue
            code = token_ids(tokenizer, "".join(lines[:cut]))
            if len(code) > body:
                continue
            return QualityPrompt(task="code_completion", length=length, sample=sample,
                                 context_ids=tuple(head + instruction + code), tail_ids=tuple(tail),
                                 expected=(lines[cut].strip(),), scoring="edit_similarity", max_new_tokens=32,
                                 question=f"{name}: next line after line {cut}", stop_at_newline=True)
    raise ValueError(f"no standard-library module among {len(candidates)} has {length} tokens of source: "
                     "use a shorter length")


def task_prompts(tokenizer, *, tasks=TASKS, lengths=DEFAULT_LENGTHS, samples: int = 5, seed: int = 0,
                 haystack_text: str | None = None, code_modules: Sequence[str] = MODULES) -> list[QualityPrompt]:
    """RULER-style prompts (and next-line code completion) of `length` tokens, `samples` per task and
    length, all drawn from `seed`. Retrieval facts sit at random depths of a docstring haystack (variable
    tracking keeps its chain in order); code prompts are a standard-library file prefix cut before the first
    line of a statement (at most `length` tokens)."""
    lengths, samples = check_lengths(lengths), check_samples(samples)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown or tasks}: choose from {TASKS}")
    head, end = chat_parts(tokenizer)
    haystack = None
    prompts = []
    for task in tasks:
        for length in lengths:
            for sample in range(samples):
                rng = random.Random(f"{task}-{seed}-{length}-{sample}")
                if task == "code_completion":
                    prompts.append(_code_prompt(tokenizer, rng, head, end, length, sample, code_modules))
                    continue
                if haystack is None:
                    haystack = _haystacktoken_ids(tokenizer, haystack_text, lengths)
                facts = _task_facts(task, rng)
                inserts = [token_ids(tokenizer, f"\n{s}\n") for s in facts["sentences"]]
                depths = [rng.uniform(0.05, 0.95) for _ in inserts]
                if facts.get("ordered"):
                    depths.sort()
                tail = question_tail(tokenizer, end, facts["question"], facts["answer_prefix"])
                body = length - len(head) - len(tail)
                context, _ = fill_haystack(haystack, list(zip(depths, inserts)), body, rng)
                prompts.append(QualityPrompt(
                    task=task, length=length, sample=sample, context_ids=tuple(head + context),
                    tail_ids=tuple(tail), expected=facts["expected"], scoring="contains_all",
                    max_new_tokens=facts["max_new_tokens"], question=facts["question"],
                    stop_at_newline=facts.get("stop_at_newline", False)))
    return prompts


