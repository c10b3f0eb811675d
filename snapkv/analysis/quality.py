"""Long-context quality: needle-in-a-haystack and a RULER-style task suite, SnapKV against baselines.

Prompts are built from token ids so that lengths and needle depths are exact:

    context_ids = chat-template head + context (haystack with inserted facts, or a source-file prefix)
    tail_ids    = "\\n\\n" + question + end of the user turn + assistant header + answer prefix

Two compression modes (`MODES`):
  question-aware     the whole prompt (context + tail) is prefilled, then compressed at the first decoding
                     step: the question sits inside the observation window (the paper's setting);
  question-agnostic  the context alone is prefilled and compressed (`compress_before_next_forward`), then the
                     tail is fed in one forward on the compressed cache, then greedy decoding.

Shared prefill (`answers_with_shared_prefill`): prefill is the dominant cost and it does not depend on
the eviction policy (every policy prefills with the full cache), so each prompt is prefilled ONCE by an
observing compression session, and every method then decodes from its own fork: a shallow copy of the
KV cache and a new `CompressionSession` holding a copy of what the observer saw (last window queries,
H2O's accumulated attention). Both modes share that prefill (the context part is prefilled first; the
question-agnostic forks are taken there; the tail is then prefilled on top for the question-aware forks).
The result equals running `model.generate` inside `snapkv.compress(model, policy)` once per method
(pinned by tests/test_quality.py), at the cost of one prefill per prompt instead of one per method.

Tables are tidy: one row per (prompt, mode, method, budget) with `score` in [0, 1] (needle and key
retrieval: 1 if the answer contains the value; multi-value and variable tracking: the fraction of the
expected values/names present; code: difflib edit similarity of the first answer line) and `correct`
(score == 1; for code: the line is reproduced exactly).
"""

import ast
import copy
import dataclasses
import difflib
import functools
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from snapkv.analysis.metrics import summarize
from snapkv.analysis.prompts import MODULES, module_source
from snapkv.core.compress import CompressionSession, attach
from snapkv.core.policies import H2O, FullCache, Policy, RandomEviction, SnapKV, StreamingLLM

DEFAULT_LENGTHS = (1000, 2000, 4000, 6000, 8000)
DEFAULT_DEPTHS = tuple(round(i / 10, 1) for i in range(11))
DEFAULT_BUDGETS = (128, 256, 512, 1024)
ABLATION_BUDGETS = (128,)
WINDOW_SIZE, KERNEL_SIZE = 16, 5  # the paper's needle-in-a-haystack setting (maxpool)
METHODS = ("full", "snapkv", "streaming", "random", "h2o", "snapkv-avgpool", "snapkv-nopool")
ABLATION_METHODS = ("snapkv-avgpool", "snapkv-nopool")  # run at the ablation budgets only
DEFAULT_METHODS = METHODS
MODES = ("question-aware", "question-agnostic")
TASKS = ("single_key", "multi_key", "multi_value", "variable_tracking", "code_completion")
NEEDLE_FORMATS = ("number", "passphrase")
DEFAULT_PREFILL_CHUNK = 2048
CALIBRATION_THRESHOLD = 0.5

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


# -- text and prompts ---------------------------------------------------------------------------------------


def stdlib_haystack_text(modules: Sequence[str] = MODULES) -> str:
    """Prose from the standard library: every module, class and function docstring of `modules`
    (at least 80 characters), in source order, separated by blank lines."""
    return _docstrings(tuple(modules))


@functools.lru_cache(maxsize=4)
def _docstrings(modules: tuple[str, ...]) -> str:
    parts = []
    for name in modules:
        tree = ast.parse(module_source(name))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    parts.append(doc.strip())
    return "\n\n".join(parts)


def load_haystack(path=None) -> str:
    """The text of `path` (any UTF-8 text file), or the standard-library docstrings when None."""
    if path is None:
        return stdlib_haystack_text()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"haystack file {str(path)!r} does not exist: pass a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"haystack file {str(path)!r} is empty")
    return text


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _haystack_ids(tokenizer, text: str | None, lengths) -> list[int]:
    """Token ids of the haystack's first 40 characters per token of the longest prompt (about ten prompts'
    worth: sample windows are drawn from it), so a short run does not tokenize a whole long text."""
    text = load_haystack() if text is None else text
    return _ids(tokenizer, text[: 40 * max(lengths)])


def chat_parts(tokenizer) -> tuple[list[int], str]:
    """(head ids, end text) of a one-turn chat prompt: head ids precede the user's content, the end text
    (end of turn + assistant header) follows it."""
    marker = "\u2063SNAPKV\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    head, found, end = text.partition(marker)
    if not found:
        raise ValueError("the tokenizer's chat template drops the user content: cannot build prompts")
    return _ids(tokenizer, head), end


@dataclass(frozen=True)
class QualityPrompt:
    """One test prompt: context_ids (chat head + context) then tail_ids (question, end of turn, assistant
    header, answer prefix). `expected` holds the strings the answer must contain (or the reference line
    for scoring "edit_similarity")."""

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


def _tail(tokenizer, end: str, question: str, answer_prefix: str) -> list[int]:
    return _ids(tokenizer, f"\n\n{question}{end}{answer_prefix}")


def _fill(haystack: list[int], inserts: list[tuple[float, list[int]]], length: int, rng: random.Random
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


def _check_lengths(lengths) -> list[int]:
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths is empty: give at least one context length")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"lengths must be positive ints, got {length!r}")
    return lengths


def _check_samples(samples) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    return samples


def needle_prompts(tokenizer, *, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, samples: int = 1, seed: int = 0,
                   haystack_text: str | None = None, needle_format: str = "number") -> list[QualityPrompt]:
    """Needle-in-a-haystack prompts, exactly `length` tokens each, for every length, depth and sample.

    The needle sentence starts at haystack token round(depth * haystack tokens) (0 = first token of the
    context, 1 = just before the question); each sample draws its own needle and haystack window from
    `seed` (the same needle and window at every depth, so depths are comparable).
    """
    lengths, samples = _check_lengths(lengths), _check_samples(samples)
    depths = list(depths)
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {depths}")
    haystack = _haystack_ids(tokenizer, haystack_text, lengths)
    head, end = chat_parts(tokenizer)
    prompts = []
    for length in lengths:
        for sample in range(samples):
            rng = random.Random(f"needle-{seed}-{length}-{sample}")
            fact = needle_fact(rng, needle_format)
            needle = _ids(tokenizer, f"\n{fact['sentence']}\n")
            tail = _tail(tokenizer, end, fact["question"], fact["answer_prefix"])
            body = length - len(head) - len(tail)
            window_rng_state = rng.getstate()
            for depth in depths:
                rng.setstate(window_rng_state)
                context, (start,) = _fill(haystack, [(depth, needle)], body, rng)
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
    tail = _tail(tokenizer, end, CODE_QUESTION, "")
    instruction = _ids(tokenizer, CODE_INSTRUCTION)
    body = length - len(head) - len(tail) - len(instruction)
    candidates = list(modules)
    rng.shuffle(candidates)
    for name in candidates:
        source = module_source(name)
        lines = source.splitlines(keepends=True)
        statements = {node.lineno - 1 for node in ast.walk(ast.parse(source)) if isinstance(node, ast.stmt)}
        counts = np.cumsum([len(_ids(tokenizer, line)) for line in lines])
        fits = int(np.searchsorted(counts, body, side="right"))  # lines[:fits] fit (approximately)
        if fits >= len(lines) or fits < 3:
            continue
        for cut in range(fits, 2, -1):
            if cut not in statements or not _good_target_line(lines[cut]):  # a statement's first line
                continue
            code = _ids(tokenizer, "".join(lines[:cut]))
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
    lengths, samples = _check_lengths(lengths), _check_samples(samples)
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
                    haystack = _haystack_ids(tokenizer, haystack_text, lengths)
                facts = _task_facts(task, rng)
                inserts = [_ids(tokenizer, f"\n{s}\n") for s in facts["sentences"]]
                depths = [rng.uniform(0.05, 0.95) for _ in inserts]
                if facts.get("ordered"):
                    depths.sort()
                tail = _tail(tokenizer, end, facts["question"], facts["answer_prefix"])
                body = length - len(head) - len(tail)
                context, _ = _fill(haystack, list(zip(depths, inserts)), body, rng)
                prompts.append(QualityPrompt(
                    task=task, length=length, sample=sample, context_ids=tuple(head + context),
                    tail_ids=tuple(tail), expected=facts["expected"], scoring="contains_all",
                    max_new_tokens=facts["max_new_tokens"], question=facts["question"],
                    stop_at_newline=facts.get("stop_at_newline", False)))
    return prompts


# -- scoring --------------------------------------------------------------------------------------------------


def contains_score(answer: str, expected: Sequence[str]) -> float:
    """Fraction of the expected strings found in the answer (case-insensitive, as whole tokens)."""
    if not expected:
        raise ValueError("expected is empty")
    text = answer.lower()
    found = [re.search(rf"(?<![0-9a-z]){re.escape(e.lower())}(?![0-9a-z])", text) is not None for e in expected]
    return sum(found) / len(expected)


def prefix_score(answer: str, value: str) -> float:
    """Partial credit for a single value: the length of the longest prefix of `value` that the answer
    reproduces (from its first letter or digit on), over the length of `value`.
    " 344." against "3440437" scores 3/7: the model found the needle but lost its end."""
    if not value:
        raise ValueError("value is empty")
    start = next((i for i, c in enumerate(answer) if c.isalnum()), len(answer))
    return len(os.path.commonprefix([answer[start:].lower(), value.lower()])) / len(value)


def first_code_line(answer: str) -> str:
    """The first line of code in an answer: markdown fences and blank lines skipped."""
    for line in answer.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("```"):
            return stripped
    return ""


def edit_similarity(prediction: str, reference: str) -> float:
    """difflib.SequenceMatcher ratio of the first code line of `prediction` and `reference` (stripped), as
    LongBench scores its code tasks."""
    return difflib.SequenceMatcher(None, first_code_line(prediction), reference.strip()).ratio()


def score_answer(prompt: QualityPrompt, answer: str) -> tuple[float, bool]:
    """(score in [0, 1], correct) of an answer to `prompt`."""
    if prompt.scoring == "edit_similarity":
        score = edit_similarity(answer, prompt.expected[0])
        return score, first_code_line(answer) == prompt.expected[0].strip()
    score = contains_score(answer, prompt.expected)
    return score, score == 1.0


# -- methods --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A named policy at a budget (None for the full cache)."""

    name: str
    budget: int | None
    policy: Policy

    @property
    def key(self) -> tuple[str, int | None]:
        return self.name, self.budget


def method_policy(name: str, budget: int | None, *, window_size: int = WINDOW_SIZE,
                  kernel_size: int = KERNEL_SIZE) -> Policy:
    """The policy for a method name: full, snapkv (maxpool), snapkv-avgpool, snapkv-nopool, streaming (4 sink
    tokens), random (seed 0) or h2o; every windowed policy keeps the last `window_size` positions."""
    if name == "full":
        return FullCache()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    if name.startswith("snapkv"):
        pooling = {"snapkv": "maxpool", "snapkv-avgpool": "avgpool", "snapkv-nopool": "none"}[name]
        return SnapKV(window_size=window_size, max_capacity_prompt=budget, kernel_size=kernel_size, pooling=pooling,
                      gqa="mean")
    if name == "streaming":
        return StreamingLLM(sink_size=4, max_capacity_prompt=budget)
    if name == "random":
        return RandomEviction(max_capacity_prompt=budget, window_size=window_size, seed=0)
    return H2O(max_capacity_prompt=budget, window_size=window_size)


def check_methods(methods, budgets, ablation_budgets=ABLATION_BUDGETS, *, window_size: int = WINDOW_SIZE) -> None:
    """Raise ValueError for an unknown method or a budget the windowed policies cannot honour."""
    methods = list(methods)
    if not methods:
        raise ValueError(f"methods is empty: choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}: choose from {', '.join(METHODS)}")
    for budget in [*budgets, *ablation_budgets]:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise ValueError(f"budgets must be ints, got {budget!r}")
        if budget <= window_size:
            raise ValueError(f"budget {budget} must exceed the observation window ({window_size} tokens): "
                             "the budget includes the window")
    if any(m != "full" and m not in ABLATION_METHODS for m in methods) and not list(budgets):
        raise ValueError("budgets is empty: give at least one budget for the compressing methods")


def method_grid(methods=DEFAULT_METHODS, budgets=DEFAULT_BUDGETS, ablation_budgets=ABLATION_BUDGETS, *,
                window_size: int = WINDOW_SIZE, kernel_size: int = KERNEL_SIZE) -> list[Method]:
    """Every (method, budget) to run: the full cache once, the pooling variants at `ablation_budgets`,
    the other methods at every budget."""
    check_methods(methods, budgets, ablation_budgets, window_size=window_size)
    grid = []
    for name in methods:
        chosen = [None] if name == "full" else ablation_budgets if name in ABLATION_METHODS else budgets
        for budget in sorted(set(chosen), key=lambda b: -1 if b is None else b):
            grid.append(Method(name, budget, method_policy(name, budget, window_size=window_size,
                                                           kernel_size=kernel_size)))
    return grid


def check_lengths_fit(lengths, model, max_new_tokens: int = 40) -> None:
    """Raise ValueError when a prompt length plus the answer exceeds the model's context."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is None:
        return
    too_long = [n for n in lengths if n + max_new_tokens > limit]
    if too_long:
        raise ValueError(f"length(s) {too_long} plus {max_new_tokens} answer tokens exceed the model's context "
                         f"({limit} positions): use lengths <= {limit - max_new_tokens}")


# -- shared prefill, one fork per method ---------------------------------------------------------------------


@dataclass
class GeneratedAnswer:
    """Greedy tokens of one method; `logits` (steps, vocab) when asked for; `cache_slots` = prompt slots per
    head kept in layer 0 (the prompt length when nothing was evicted); `seconds` of decoding;
    `kept_positions` {layer: (1, cache_heads, kept)} prompt positions each head kept (empty for the full cache)."""

    tokens: list[int]
    logits: torch.Tensor | None
    cache_slots: int
    seconds: float
    kept_positions: dict = dataclasses.field(default_factory=dict)


def fork_cache(cache):
    """A copy of a prefilled cache that a method may extend and compress without touching the original.

    DynamicLayer.update concatenates into new tensors and compression replaces whole layers, so copying
    the layer objects (not their tensors) is enough; other layer types are deep-copied."""
    from transformers.cache_utils import DynamicLayer

    if all(type(layer) is DynamicLayer for layer in cache.layers):
        forked = copy.copy(cache)
        forked.layers = [copy.copy(layer) for layer in cache.layers]
        return forked
    return copy.deepcopy(cache)


def _observer_policy(policies: Sequence[Policy]) -> Policy:
    window = max([max(p.window_size, 1) for p in policies] + [1])
    if any(p.needs_accumulated_attention for p in policies):
        return H2O(max_capacity_prompt=window + 1, window_size=window)
    return SnapKV(window_size=window, max_capacity_prompt=window + 1, kernel_size=1)


def fork_session(observer: CompressionSession, policy: Policy) -> CompressionSession:
    """A compression session for `policy` that starts from what `observer` saw during prefill: the last
    `policy.window_size` queries of every layer (and the accumulated attention when the policy needs it)."""
    seen = getattr(observer, "_layers", None)
    if not isinstance(seen, dict) or not seen:
        raise RuntimeError("the observing session recorded no prefill state (snapkv.core.compress changed?): "
                           "the shared prefill cannot fork it")
    session = CompressionSession(observer.model, policy, observer.prefill_chunk_size)
    window = max(policy.window_size, 1)
    if window > max(observer.policy.window_size, 1):
        raise ValueError(f"the observer kept {observer.policy.window_size} queries per layer; {window} are needed")
    for layer, state in seen.items():
        session._layers[layer] = dataclasses.replace(
            state, query_window=state.query_window[..., -window:, :],
            accumulated=state.accumulated if policy.needs_accumulated_attention else None, done=False)
    return session


def _forward_chunks(model, ids: torch.Tensor, cache, chunk: int | None) -> torch.Tensor:
    """Feed `ids` (1, n) into `cache` in chunks; logits of the last position (1, vocab)."""
    chunk = chunk or ids.shape[1]
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, start : start + chunk], past_key_values=cache, use_cache=True).logits
    return logits[:, -1].float()


def _greedy(model, cache, logits: torch.Tensor, max_new_tokens: int, stop_ids, stop, keep_logits: bool):
    tokens, rows = [], []
    for step in range(max_new_tokens):
        if keep_logits:
            rows.append(logits[0].clone())
        token = int(logits[0].argmax())
        tokens.append(token)
        if token in stop_ids or step == max_new_tokens - 1 or (stop is not None and stop(tokens)):
            break
        ids = torch.tensor([[token]], device=model.device)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()
    return tokens, (torch.stack(rows) if keep_logits else None)


def _cache_slots(session: CompressionSession, prompt_length: int) -> int:
    kept = session.kept_positions.get(min(session.kept_positions)) if session.kept_positions else None
    return prompt_length if kept is None else int(kept.shape[-1])


def answers_with_shared_prefill(model, context_ids, tail_ids, methods: Sequence[Method], *,
                                modes: Sequence[str] = ("question-aware",), max_new_tokens: int = 16,
                                stop_ids: Sequence[int] = (), stop: Callable[[list[int]], bool] | None = None,
                                prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK, keep_logits: bool = False
                                ) -> dict[tuple[str, str, int | None], GeneratedAnswer]:
    """Greedy answers of every method in every mode, from ONE prefill of the prompt.

    context_ids, tail_ids: token ids (lists or 1-D tensors); the prompt is context + tail. Returns
    {(mode, method name, budget): GeneratedAnswer}. Equals, per method, `model.generate` inside
    `snapkv.compress(model, policy)` on the whole prompt (question-aware), or prefilling the context inside
    it, `compress_before_next_forward()`, feeding the tail in one forward and decoding greedily
    (question-agnostic); prefill runs in chunks of `prefill_chunk_size` tokens (None: one forward).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown or modes}: choose from {MODES}")
    device = model.device
    context = torch.as_tensor(list(context_ids), dtype=torch.long, device=device)[None]
    tail = torch.as_tensor(list(tail_ids), dtype=torch.long, device=device)[None]
    if tail.shape[1] < 2:
        raise ValueError("tail_ids needs at least 2 tokens (a 1-token forward would count as a decoding step)")
    policies = [m.policy for m in methods]
    window = max([max(p.window_size, 1) for p in policies] + [1])
    if prefill_chunk_size is not None and prefill_chunk_size < window:
        raise ValueError(f"prefill_chunk_size ({prefill_chunk_size}) must be at least the window ({window})")
    if context.shape[1] < window:
        raise ValueError(f"the context has {context.shape[1]} tokens, fewer than the window ({window})")
    from transformers import DynamicCache

    observer = CompressionSession(model, _observer_policy(policies), prefill_chunk_size or context.shape[1])
    cache = DynamicCache(config=model.config)
    results = {}

    def run(mode: str, first_logits_of) -> None:
        for method in methods:
            session = fork_session(observer, method.policy)
            forked = fork_cache(cache)
            start = time.perf_counter()
            with attach(model, session):
                logits = first_logits_of(session, forked)
                tokens, rows = _greedy(model, forked, logits, max_new_tokens, set(stop_ids), stop, keep_logits)
            prompt_length = context.shape[1] + (tail.shape[1] if mode == "question-aware" else 0)
            results[(mode, method.name, method.budget)] = GeneratedAnswer(
                tokens, rows, _cache_slots(session, prompt_length), time.perf_counter() - start,
                dict(session.kept_positions))

    def agnostic_first_logits(session, forked):
        session.compress_before_next_forward()
        return model(input_ids=tail, past_key_values=forked, use_cache=True).logits[:, -1].float()

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        with attach(model, observer):
            aware_logits = _forward_chunks(model, context, cache, prefill_chunk_size)
        if "question-agnostic" in modes:
            run("question-agnostic", agnostic_first_logits)
        if "question-aware" in modes:
            with attach(model, observer):
                aware_logits = _forward_chunks(model, tail, cache, prefill_chunk_size)
            run("question-aware", lambda session, forked: aware_logits)
    return results


# -- experiments ----------------------------------------------------------------------------------------------


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        found = tokenizer.convert_tokens_to_ids(token) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(found, int) and found != getattr(tokenizer, "unk_token_id", None):
            ids.add(found)
    return {i for i in ids if i is not None}


def _line_stop(tokenizer):
    def stop(tokens: list[int]) -> bool:  # one complete line (of code: fences skipped) is enough
        complete_lines = tokenizer.decode(tokens).split("\n")[:-1]
        return first_code_line("\n".join(complete_lines)) != ""
    return stop


def _answers(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *, modes, desc: str,
             prefill_chunk_size: int | None, progress: bool = True):
    """Yield (prompt, mode, method name, budget, answer text, GeneratedAnswer, prefill seconds) for every prompt,
    from one shared prefill per prompt; methods whose budget is >= the prompt's length are skipped."""
    stop_ids = _stop_ids(tokenizer)
    bar = tqdm(prompts, desc=desc, unit="prompt", disable=not progress)
    for prompt in bar:
        bar.set_postfix_str(f"{prompt.task} {prompt.length} tokens")
        chosen = [m for m in methods if m.budget is None or m.budget < prompt.length]
        stop = _line_stop(tokenizer) if prompt.stop_at_newline else None
        start = time.perf_counter()
        answers = answers_with_shared_prefill(model, prompt.context_ids, prompt.tail_ids, chosen, modes=modes,
                                              max_new_tokens=prompt.max_new_tokens, stop_ids=stop_ids, stop=stop,
                                              prefill_chunk_size=prefill_chunk_size)
        prefill_seconds = time.perf_counter() - start - sum(a.seconds for a in answers.values())
        for (mode, name, budget), answer in answers.items():
            text = tokenizer.decode(answer.tokens, skip_special_tokens=True)
            yield prompt, mode, name, budget, text, answer, prefill_seconds
    bar.close()


def evaluate(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *,
             modes: Sequence[str] = ("question-aware",), prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK,
             progress: bool = True) -> pd.DataFrame:
    """Run every method in every mode on every prompt (one shared prefill per prompt).

    Methods whose budget is >= the prompt's target length are skipped (they keep the whole prompt, i.e.
    equal the full cache). Returns one row per (prompt, mode, method, budget): task, length, prompt_tokens,
    depth, needle_position, sample, mode, method, budget, score, correct, prefix_score (single-value tasks,
    see `prefix_score`), answer, expected, cache_slots, decode_seconds, prefill_seconds (the prompt's shared
    prefill).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate")
    check_lengths_fit({p.length for p in prompts}, model, max(p.max_new_tokens for p in prompts))
    rows = []
    for prompt, mode, name, budget, text, answer, prefill_seconds in _answers(
            model, tokenizer, prompts, methods, modes=modes, desc="prompts", prefill_chunk_size=prefill_chunk_size,
            progress=progress):
        score, correct = score_answer(prompt, text)
        partial = prefix_score(text, prompt.expected[0]) if len(prompt.expected) == 1 else float("nan")
        rows.append(dict(task=prompt.task, length=prompt.length, prompt_tokens=prompt.prompt_tokens,
                         depth=prompt.depth, needle_position=prompt.needle_position, sample=prompt.sample,
                         mode=mode, method=name, budget=budget, score=score, correct=correct,
                         prefix_score=partial, answer=text,
                         expected=" | ".join(prompt.expected), cache_slots=answer.cache_slots,
                         decode_seconds=round(answer.seconds, 3), prefill_seconds=round(prefill_seconds, 3)))
    table = pd.DataFrame.from_records(rows)
    table["budget"] = table["budget"].astype("Int64")
    return table


def needle_tokens(tokenizer, prompt: QualityPrompt) -> pd.DataFrame:
    """The tokens of a needle prompt's inserted sentence: index (in the sentence), position (in the prompt),
    token (its text) and in_value (it holds part of the value the question asks for)."""
    if prompt.needle is None or prompt.needle_position is None:
        raise ValueError(f"prompt of task {prompt.task!r} has no needle: pass a prompt from needle_prompts")
    text = f"\n{prompt.needle}\n"
    ids = _ids(tokenizer, text)
    if list(prompt.ids[prompt.needle_position : prompt.needle_position + len(ids)]) != ids:
        raise ValueError("the needle's tokens are not at prompt.needle_position: was the prompt built with "
                         "another tokenizer?")
    value_start = text.index(prompt.expected[0])
    value_end = value_start + len(prompt.expected[0])
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    starts = [0] + ends[:-1]
    return pd.DataFrame(dict(index=range(len(ids)), position=[prompt.needle_position + i for i in range(len(ids))],
                             token=[tokenizer.decode([t]) for t in ids],
                             in_value=[s < value_end and e > value_start for s, e in zip(starts, ends)]))


def needle_retention(tokens: pd.DataFrame, kept_positions: dict) -> pd.DataFrame:
    """`tokens` (from `needle_tokens`) with kept_share: the share of (layer, KV head) pairs whose kept prompt
    positions ({layer: (1, heads, kept)}, as in `GeneratedAnswer`) hold the token; 1.0 when nothing was evicted."""
    if not kept_positions:
        return tokens.assign(kept_share=1.0)
    wanted = torch.tensor(tokens.position.to_numpy())
    held = torch.cat([(kept[0].cpu()[:, :, None] == wanted).any(1) for kept in kept_positions.values()])
    return tokens.assign(kept_share=held.float().mean(0).numpy())  # over (layers x heads)


def needle_retention_experiment(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *,
                                prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK) -> pd.DataFrame:
    """Which tokens of the needle sentence each method keeps (question-aware), with its answer: one row per
    (prompt, method, budget, needle token) with length, depth, sample, answer, score and the columns of
    `needle_retention`. Methods whose budget is >= the prompt's length are skipped, as in `evaluate`."""
    if not prompts or not methods:
        raise ValueError("needle_retention_experiment needs at least one needle prompt and one method")
    tokens = {id(prompt): needle_tokens(tokenizer, prompt) for prompt in prompts}
    frames = [needle_retention(tokens[id(prompt)], answer.kept_positions).assign(
                  length=prompt.length, depth=prompt.depth, sample=prompt.sample, method=name, budget=budget,
                  answer=text, score=score_answer(prompt, text)[0])
              for prompt, _, name, budget, text, answer, _ in _answers(
                  model, tokenizer, prompts, methods, modes=("question-aware",), desc="needle tokens",
                  prefill_chunk_size=prefill_chunk_size)]
    table = pd.concat(frames, ignore_index=True)
    table["budget"] = table["budget"].astype("Int64")
    return table


def calibrate(table: pd.DataFrame, threshold: float = CALIBRATION_THRESHOLD, by=("task", "length"),
              mode: str | None = None) -> pd.DataFrame:
    """Which (task, length) groups the full cache solves: one row per group with full_score (mean score of the
    full cache), samples, kept (full_score >= threshold) and reason."""
    full = table[table.method == "full"]
    if mode is not None:
        full = full[full["mode"] == mode]
    if full.empty:
        raise ValueError("the table has no full-cache rows to calibrate on")
    records = []
    for key, group in full.groupby(list(by), sort=True):
        score = float(group.score.mean())
        kept = score >= threshold
        reason = (f"kept: full cache scores {score:.2f} >= {threshold} on {len(group)} prompts" if kept else
                  f"dropped: full cache scores {score:.2f} < {threshold} on {len(group)} prompts")
        records.append(dict(zip(by, key if isinstance(key, tuple) else (key,)), full_score=score,
                            samples=len(group), kept=kept, reason=reason))
    return pd.DataFrame.from_records(records)


def calibrated_evaluate(model, tokenizer, prompts: Sequence[QualityPrompt], methods: Sequence[Method], *,
                        threshold: float = CALIBRATION_THRESHOLD, calibration_samples: int = 3,
                        modes: Sequence[str] = ("question-aware",),
                        prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK, progress: bool = True
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Calibrate, then compare: the full cache alone answers the first `calibration_samples` prompts of every
    (task, length) group (in the first mode); groups scoring below `threshold` are dropped (the model cannot
    do them even uncompressed, so compression has nothing to lose); every method then runs on all prompts
    of the kept groups. Returns (table, calibration) - see `evaluate` and `calibrate`."""
    groups: dict[tuple, list[QualityPrompt]] = {}
    for prompt in prompts:
        groups.setdefault((prompt.task, prompt.length), []).append(prompt)
    first = [p for group in groups.values() for p in group[:_check_samples(calibration_samples)]]
    full = [m for m in method_grid(["full"], [], ())]
    calibration_table = evaluate(model, tokenizer, first, full, modes=modes[:1],
                                 prefill_chunk_size=prefill_chunk_size, progress=progress)
    calibration = calibrate(calibration_table, threshold)
    kept = {tuple(key) for key in calibration.loc[calibration.kept, ["task", "length"]].itertuples(index=False)}
    chosen = [p for key, group in groups.items() if key in kept for p in group]
    if not chosen:
        return calibration_table.iloc[0:0], calibration
    return evaluate(model, tokenizer, chosen, methods, modes=modes, prefill_chunk_size=prefill_chunk_size,
                    progress=progress), calibration


def with_full_score(table: pd.DataFrame) -> pd.DataFrame:
    """Non-full rows, each with `full_score`: the full cache's score on the same prompt and mode."""
    keys = ["task", "length", "depth", "sample", "mode"]
    table = table.assign(depth=table.depth.astype(float).fillna(-1.0))
    full = table[table.method == "full"][keys + ["score"]].rename(columns={"score": "full_score"})
    others = table[table.method != "full"]
    paired = others.merge(full, on=keys, how="inner", validate="many_to_one")
    return paired.assign(depth=paired.depth.where(paired.depth >= 0))


def retention_table(table: pd.DataFrame, by=("mode", "method", "budget"), resamples: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """Score relative to the full cache on the same prompts: retention = mean score / mean full score per
    group, with a paired bootstrap 95% interval. Columns *by, score, full_score, retention, ci_low, ci_high,
    prompts."""
    paired = with_full_score(table)
    rng = np.random.default_rng(seed)
    records = []
    for key, group in paired.groupby(list(by), sort=True, dropna=False):
        x, y = group.score.to_numpy(float), group.full_score.to_numpy(float)
        retention = x.mean() / y.mean() if y.mean() > 0 else float("nan")
        low = high = retention
        if len(x) > 1 and y.mean() > 0:
            index = rng.integers(0, len(x), size=(resamples, len(x)))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = x[index].mean(1) / y[index].mean(1)
            low, high = np.nanpercentile(ratios, [2.5, 97.5])
        records.append(dict(zip(by, key if isinstance(key, tuple) else (key,)), score=x.mean(),
                            full_score=y.mean(), retention=retention, ci_low=float(low), ci_high=float(high),
                            prompts=len(x)))
    return pd.DataFrame.from_records(records)


def summarize_quality(table: pd.DataFrame, by=("mode", "task", "method", "budget")) -> pd.DataFrame:
    """Mean score with a bootstrap 95% interval per group (the full cache gets budget <NA>)."""
    frame = table.assign(budget=table.budget.astype("float").fillna(-1).astype(int))
    summary = summarize(frame, list(by), "score")
    if "budget" in summary:
        summary["budget"] = summary.budget.replace(-1, pd.NA).astype("Int64")
    return summary


def suite_means(table: pd.DataFrame) -> pd.DataFrame:
    """Unweighted mean over tasks of each task's mean score, per mode, method and budget, on the prompts every
    method ran (budgets below the prompt length)."""
    per_task = table.groupby(["mode", "method", "budget", "task"], dropna=False).score.mean().reset_index()
    return per_task.groupby(["mode", "method", "budget"], dropna=False).score.mean().reset_index(name="suite_mean")


def target_checks(needle_table: pd.DataFrame | None = None, suite_table: pd.DataFrame | None = None, *,
                  mode: str = "question-aware", retention_budget: int = 1024, retention_target: float = 0.95,
                  compare_budgets=(128, 256, 512)) -> pd.DataFrame:
    """The issue's targets as rows: target, measured, met.

    1. SnapKV at `retention_budget` keeps >= `retention_target` of the full cache's needle accuracy, over the
       needle cells where that budget compresses (budget < length).
    2. SnapKV beats StreamingLLM and RandomEviction at every budget in `compare_budgets` on the needle grid
       (mean score over the cells) and on the task-suite mean (unweighted mean over tasks).
    """
    records = []
    if needle_table is not None:
        table = needle_table[needle_table["mode"] == mode]
        retention = retention_table(table)
        row = retention[(retention.method == "snapkv") & (retention.budget == retention_budget)]
        if len(row):
            r = row.iloc[0]
            records.append(dict(target=f"needle: SnapKV-{retention_budget} retention >= {retention_target:.0%}",
                                measured=f"{r.retention:.3f} (95% CI {r.ci_low:.2f}-{r.ci_high:.2f}; "
                                         f"{r.score:.3f} vs full {r.full_score:.3f}, {r.prompts} prompts)",
                                met=bool(r.retention >= retention_target)))
        means = table.groupby(["method", "budget"]).score.mean()
        records += _beats(means, compare_budgets, "needle grid")
    if suite_table is not None:
        means = suite_means(suite_table[suite_table["mode"] == mode]).set_index(["method", "budget"]).suite_mean
        records += _beats(means, compare_budgets, "suite mean")
    return pd.DataFrame.from_records(records, columns=["target", "measured", "met"])


def _beats(means: pd.Series, budgets, where: str) -> list[dict]:
    records = []
    for budget in budgets:
        snap = means.get(("snapkv", budget))
        if snap is None:
            continue
        for rival in ("streaming", "random"):
            other = means.get((rival, budget))
            if other is None:
                continue
            records.append(dict(target=f"{where}: SnapKV > {rival} at budget {budget}",
                                measured=f"{snap:.3f} vs {other:.3f} ({snap - other:+.3f})", met=bool(snap > other)))
    return records
