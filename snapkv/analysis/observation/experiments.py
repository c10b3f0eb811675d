"""One function per observation notebook: prompt set in, tidy DataFrame out, with each notebook's settings.

Each notebook's settings live in one frozen dataclass here: its field defaults are the full profile (paper
scale), `DEFAULT` and `QUICK` what the default and quick profiles change (`snapkv.analysis.reporting.setup`
states the rule and applies them). Every experiment runs
its samples through `run_over_samples`, which tags rows with `sample`. Sample and token counts travel with
the results so figures can say what they cover.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch
from tqdm.auto import tqdm

from snapkv.analysis.observation.attention import (
    generation_attention,
    greedy_continuations,
    hit_rate_along_generation,
    teacher_forced_attention,
    voted_overlap,
    windows_along_prompt,
)
from snapkv.analysis.observation.metrics import (
    hit_rate_table,
    important_positions,
    metric_records,
    sensitivity_table,
    sink_positions,
    voted_set,
)
from snapkv.analysis.text import chat_ids, chat_request, cut_to_tokens, load_prompt_set, question_text
from snapkv.core.compat import new_cache, prefill

QUICK_CONTEXT_TOKENS = 400  # quick runs cut every context or document to this many tokens
DEFAULT_CONTEXT_TOKENS = 2048  # the default profile cuts them to this many (full: their own 2K-5.6K)


@dataclass(frozen=True)
class HitRateSettings:
    """Notebook 01: hit rate along generation (Fig. 2) and its threshold / top-k sensitivity."""

    n_samples: int = 20
    window_size: int = 128  # observation window (the authors' code uses 128)
    generation_window: int = 128  # answer tokens per window
    steps: int = 4  # windows along the answer
    top_k: float = 0.05  # voted set: this fraction of the prompt length
    threshold: float = 0.05  # important: attention above this
    protocols: tuple[str, ...] = ("reference", "greedy")
    max_context_tokens: int | None = None
    n_sensitivity: int = 5  # samples of the sensitivity sweep
    greedy_batch_size: int = 4  # greedy answers decoded together, left-padded (1: one by one, bit-exact)
    DEFAULT: ClassVar[dict] = dict(n_samples=5, generation_window=64, max_context_tokens=DEFAULT_CONTEXT_TOKENS,
                                   n_sensitivity=2, greedy_batch_size=3)
    QUICK: ClassVar[dict] = dict(n_samples=2, window_size=16, generation_window=16,
                                 max_context_tokens=QUICK_CONTEXT_TOKENS, n_sensitivity=1)


@dataclass(frozen=True)
class WindowsAlongPromptSettings:
    """Notebook 02: each of the last `n_windows` prompt windows as the observation window (v2 Fig. 2)."""

    n_samples: int = 20
    window_size: int = 128
    n_windows: int = 20
    generated_tokens: int = 512
    top_k: float = 0.05
    threshold: float = 0.05
    max_context_tokens: int | None = None
    DEFAULT: ClassVar[dict] = dict(n_samples=6, n_windows=10, generated_tokens=128, max_context_tokens=3072)
    QUICK: ClassVar[dict] = dict(n_samples=2, window_size=16, n_windows=6, generated_tokens=32,
                                 max_context_tokens=QUICK_CONTEXT_TOKENS)


@dataclass(frozen=True)
class QuestionOverlapSettings:
    """Notebook 03: overlap of different questions' voted sets on one document (v2 Fig. 4)."""

    n_samples: int = 20
    window_size: int = 32
    top_k: float = 0.05
    max_document_tokens: int | None = None
    DEFAULT: ClassVar[dict] = dict(n_samples=6, max_document_tokens=DEFAULT_CONTEXT_TOKENS)
    QUICK: ClassVar[dict] = dict(n_samples=2, max_document_tokens=QUICK_CONTEXT_TOKENS)


@dataclass(frozen=True)
class QuestionPositionSettings:
    """Notebook 04: the question before or after the document (v2 Fig. 5)."""

    n_samples: int = 20
    questions_per_document: int = 2
    window_size: int = 32
    top_k: float = 0.05
    threshold: float = 0.05
    max_document_tokens: int | None = None
    DEFAULT: ClassVar[dict] = dict(n_samples=5, max_document_tokens=DEFAULT_CONTEXT_TOKENS)
    QUICK: ClassVar[dict] = dict(n_samples=2, questions_per_document=1, max_document_tokens=QUICK_CONTEXT_TOKENS)


@dataclass(frozen=True)
class VotingVariantsSettings:
    """Notebook 05: per-head hit rates and voted sets made with other windows, kernels and GQA modes."""

    n_samples: int = 20
    window_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    kernel_sizes: tuple[int, ...] = (1, 3, 5, 7)
    gqa_modes: tuple[str, ...] = ("expand", "mean", "max")
    generation_tokens: int = 512
    top_k: float = 0.05
    threshold: float = 0.05
    max_context_tokens: int | None = None
    DEFAULT: ClassVar[dict] = dict(n_samples=6, window_sizes=(8, 32, 128), kernel_sizes=(1, 5, 7),
                                   generation_tokens=128, max_context_tokens=DEFAULT_CONTEXT_TOKENS)
    QUICK: ClassVar[dict] = dict(n_samples=2, window_sizes=(8, 32), generation_tokens=32,
                                 max_context_tokens=QUICK_CONTEXT_TOKENS)


def shortest_records(name: str, data_dir, n: int, *, longer_than: int = 0) -> list[dict]:
    """The `n` shortest records of a prompt set ("chat" by context_tokens, "documents" by tokens) that have
    more than `longer_than` tokens."""
    length = "context_tokens" if name == "chat" else "tokens"
    records = [r for r in load_prompt_set(name, data_dir) if r[length] > longer_than]
    return sorted(records, key=lambda r: r[length])[:n]


def run_over_samples(measure: Callable, samples: list, desc: str = "samples") -> pd.DataFrame:
    """The one sample loop: `measure(sample)` yields (table, tags) pairs; each table gets the columns
    sample (the sample's index) and `tags`, in that order, and all are concatenated; a progress bar shows."""
    frames = []
    for index, sample in enumerate(tqdm(samples, desc=desc)):
        frames += [table.assign(sample=index, **tags) for table, tags in measure(sample)]
    return pd.concat(frames, ignore_index=True)


def _chat_prompt(tokenizer, sample: dict, max_context_tokens: int | None) -> torch.Tensor:
    return torch.tensor(chat_ids(tokenizer, chat_request(sample, tokenizer, max_context_tokens)))[None]


def _response_ids(tokenizer, text: str, tokens: int | None = None) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[:tokens])[None]


def _document_text(document: dict, tokenizer, max_document_tokens: int | None) -> str:
    if max_document_tokens is None:
        return document["text"]
    return cut_to_tokens(document["text"], tokenizer, max_document_tokens)


def hit_rate_experiment(model, tokenizer, samples: list[dict], settings: HitRateSettings,
                        by_head: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig. 2: hit rate per layer for `steps` generation windows, for chat samples under each protocol; and
    its threshold / top-k sensitivity (`metrics.sensitivity_table`) on the first `n_sensitivity` samples.

    "reference": the record's reference continuation, teacher-forced (the authors' protocol), skipped when
    it is shorter than the answer; "greedy": the model's own greedy answer of the same length. The
    sensitivity sweep reads the reference recordings: each prompt and answer is recorded once for both.
    Returns (hit-rate table, sensitivity table; empty without the reference protocol or n_sensitivity 0).
    """
    s = settings
    unknown = [protocol for protocol in s.protocols if protocol not in ("reference", "greedy")]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}: use 'reference' or 'greedy'")
    answer_tokens = s.steps * s.generation_window
    sensitivity = []
    prompts = [_chat_prompt(tokenizer, sample, s.max_context_tokens) for sample in samples]
    greedy = []
    if "greedy" in s.protocols:  # every greedy answer first, in left-padded batches (`greedy_continuations`)
        greedy = greedy_continuations(model, prompts, answer_tokens, batch_size=s.greedy_batch_size)

    def measure(indexed):
        index, sample = indexed
        prompt = prompts[index]
        for protocol in s.protocols:
            if protocol == "reference":
                response = _response_ids(tokenizer, sample["response"], answer_tokens)
                if response.shape[1] < answer_tokens:
                    continue
                ids = torch.cat([prompt, response], 1)
            else:
                ids = greedy[index]
            observation, generated = generation_attention(model, ids, prompt.shape[1], window_size=s.window_size,
                                                          steps=s.steps, generation_window=s.generation_window)
            if protocol == "reference" and index < s.n_sensitivity:
                table = sensitivity_table(observation, generated, window_size=s.window_size)
                sensitivity.append(table.assign(sample=index))
            table = hit_rate_table(observation, generated, window_size=s.window_size, top_k=s.top_k,
                                   threshold=s.threshold, generation_window=s.generation_window, by_head=by_head)
            yield table, dict(protocol=protocol, prompt_tokens=prompt.shape[1])

    table = run_over_samples(measure, list(enumerate(samples)))
    sensitivity = pd.concat(sensitivity, ignore_index=True) if sensitivity else pd.DataFrame()
    return table, sensitivity


def windows_along_prompt_experiment(model, tokenizer, samples: list[dict],
                                    settings: WindowsAlongPromptSettings) -> pd.DataFrame:
    """v2 Fig. 2: each of the last `n_windows` prompt windows used as the observation window, against
    the first `generated_tokens` tokens of the reference answer."""
    s = settings

    def measure(sample):
        prompt = _chat_prompt(tokenizer, sample, s.max_context_tokens)
        response = _response_ids(tokenizer, sample["response"], s.generated_tokens)
        table = windows_along_prompt(model, torch.cat([prompt, response], 1), prompt.shape[1],
                                     window_size=s.window_size, n_windows=s.n_windows, top_k=s.top_k,
                                     threshold=s.threshold)
        yield table, dict(prompt_tokens=prompt.shape[1])

    return run_over_samples(measure, samples)


def windows_samples(data_dir, settings: WindowsAlongPromptSettings) -> list[dict]:
    """The shortest chat samples long enough for `n_windows` windows plus one."""
    return shortest_records("chat", data_dir, settings.n_samples,
                            longer_than=(settings.n_windows + 2) * settings.window_size)


def layer_thirds(layers: pd.Series, num_layers: int) -> pd.Series:
    """Each layer's third of the model as a label, e.g. "layers 0-9", "layers 10-19", "layers 20-29"."""
    third = layers * 3 // num_layers
    spans = {t: f"layers {layers[third == t].min()}-{layers[third == t].max()}" for t in sorted(third.unique())}
    return third.map(spans)


def question_overlap_experiment(model, tokenizer, documents: list[dict],
                                settings: QuestionOverlapSettings) -> pd.DataFrame:
    """v2 Fig. 4: overlap of the voted sets of different questions (each followed by its reference
    answer) on the same document, per layer."""
    s = settings

    def measure(document):
        text = _document_text(document, tokenizer, s.max_document_tokens)
        sequences = [torch.tensor(chat_ids(tokenizer, f"{text}\n\n{question_text(tokenizer, question['question'])}")
                                  + tokenizer(question["answer"], add_special_tokens=False).input_ids)[None]
                     for question in document["questions"]]
        shared = _shared_prefix(sequences)
        window = min(s.window_size, min(sequence.shape[1] for sequence in sequences) - shared)
        table = voted_overlap(model, sequences, shared, window_size=window, top_k=s.top_k)
        yield table, dict(document_tokens=shared, window_size=window)

    return run_over_samples(measure, documents, desc="documents")


def _shared_prefix(sequences: list[torch.Tensor]) -> int:
    length = min(s.shape[1] for s in sequences)
    first = sequences[0][0, :length]
    same = torch.stack([s[0, :length] == first for s in sequences]).all(0)
    return int(same.long().cumprod(0).sum())


def question_position_experiment(model, tokenizer, documents: list[dict],
                                 settings: QuestionPositionSettings) -> pd.DataFrame:
    """v2 Fig. 5: hit rate of the reference answer's tokens when the question sits before the document
    ("beginning") or after it ("end"); the observation window is the prompt's last `window_size` tokens."""
    s = settings

    def measure(document):
        text = _document_text(document, tokenizer, s.max_document_tokens)
        questions = document["questions"][: s.questions_per_document]
        asked = [question_text(tokenizer, question["question"]) for question in questions]
        prompts = {(i, placement): torch.tensor(chat_ids(tokenizer, content))[None]
                   for i, a in enumerate(asked) for placement, content in (("beginning", f"{a}\n\n{text}"),
                                                                           ("end", f"{text}\n\n{a}"))}
        # the "end" prompts share the document: it runs once, each question continues a copy of its cache
        ends = [prompts[i, "end"] for i in range(len(questions))]
        shared = min(_shared_prefix(ends), min(end.shape[1] for end in ends) - s.window_size)
        document_cache = new_cache(model) if shared > 0 else None
        if document_cache is not None:
            with torch.no_grad():
                prefill(model, ends[0][:, :shared].to(model.device), document_cache)
        for (i, placement), prompt in prompts.items():
            answer = _response_ids(tokenizer, questions[i]["answer"])
            table = hit_rate_along_generation(model, torch.cat([prompt, answer], 1), prompt.shape[1],
                                              window_size=s.window_size, steps=1, top_k=s.top_k,
                                              threshold=s.threshold, generation_window=answer.shape[1],
                                              cache=document_cache if placement == "end" else None)
            yield table, dict(question=questions[i]["name"], placement=placement)

    return run_over_samples(measure, documents, desc="documents")


def voting_variants_experiment(model, tokenizer, samples: list[dict], settings: VotingVariantsSettings) -> pd.DataFrame:
    """Beyond the paper: hit rate per layer and head when the voted set is made with another window
    size, a pooling kernel (maxpool) or a GQA aggregation (one set per KV group, shared by its query
    heads). One recording of the largest window serves every variant: a smaller window's rows are
    the last rows of the larger one. Columns: sample, layer, setting, value, then `metric_records`'."""
    s = settings
    largest = max(s.window_sizes)
    variants = ([("window_size", w, w, 1, "expand") for w in s.window_sizes]
                + [("kernel_size", k, largest, k, "expand") for k in s.kernel_sizes]
                + [("gqa", g, largest, 1, g) for g in s.gqa_modes])
    kv_heads = model.config.num_key_value_heads

    def measure(sample):
        prompt = _chat_prompt(tokenizer, sample, s.max_context_tokens)
        ids = torch.cat([prompt, _response_ids(tokenizer, sample["response"], s.generation_tokens)], 1)
        observations, generated = teacher_forced_attention(model, ids, prompt.shape[1], largest)
        k = int(s.top_k * prompt.shape[1])
        records = []
        for layer in observations:
            important = important_positions(generated[layer], s.threshold)  # once per layer, for every variant
            for setting, value, window, kernel, gqa in variants:
                observation = observations[layer][..., -window:, :]
                voted = voted_set(observation, k, kernel_size=kernel, gqa=gqa, kv_heads=kv_heads)
                records += metric_records(generated[layer], {"snapkv": [voted]}, sink_positions(observation),
                                          window=window, threshold=s.threshold, important=important,
                                          generation_window=s.generation_tokens, by_head=True, layer=layer,
                                          setting=setting, value=str(value))
        yield pd.DataFrame.from_records(records), {}

    table = run_over_samples(measure, samples)
    return table[["sample", *table.columns.drop("sample")]]
