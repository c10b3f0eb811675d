"""One function per observation notebook: prompt set in, tidy DataFrame out.

Each loops over samples with a progress bar and tags rows with `sample`; `quick` settings live in the
notebooks. Sample and token counts travel with the results so figures can say what they cover.
"""

import itertools

import pandas as pd
import torch
from tqdm.auto import tqdm

from snapkv.analysis.observation.attention import (
    greedy_continuation,
    hit_rate_along_generation,
    teacher_forced_attention,
    voted_overlap,
    windows_along_prompt,
)
from snapkv.analysis.observation.metrics import metric_records, sensitivity_table, sink_positions, voted_set
from snapkv.analysis.text import chat_ids, chat_request, cut_to_tokens


def _response_ids(tokenizer, text: str, tokens: int) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[:tokens])[None]


def hit_rate_experiment(model, tokenizer, samples: list[dict], *, protocols=("reference", "greedy"),
                        window_size: int = 128, steps: int = 4, generation_window: int = 128,
                        top_k: float = 0.05, threshold: float = 0.05, max_context_tokens: int | None = None,
                        by_head: bool = False) -> pd.DataFrame:
    """Fig. 2: hit rate per layer for `steps` generation windows, for chat samples under each protocol.

    "reference": the record's reference continuation, teacher-forced (the authors' protocol);
    "greedy": the model's own greedy answer of the same length.
    """
    frames = []
    for index, sample in enumerate(tqdm(samples, desc="samples")):
        prompt = torch.tensor(chat_ids(tokenizer, chat_request(sample, tokenizer, max_context_tokens)))[None]
        answer_tokens = steps * generation_window
        for protocol in protocols:
            if protocol == "reference":
                response = _response_ids(tokenizer, sample["response"], answer_tokens)
                if response.shape[1] < answer_tokens:
                    continue
                ids = torch.cat([prompt, response], 1)
            elif protocol == "greedy":
                ids = greedy_continuation(model, prompt, answer_tokens)
            else:
                raise ValueError(f"unknown protocol {protocol!r}: use 'reference' or 'greedy'")
            table = hit_rate_along_generation(model, ids, prompt.shape[1], window_size=window_size, steps=steps,
                                              top_k=top_k, threshold=threshold,
                                              generation_window=generation_window, by_head=by_head)
            frames.append(table.assign(sample=index, protocol=protocol, prompt_tokens=prompt.shape[1]))
    return pd.concat(frames, ignore_index=True)


def sensitivity_experiment(model, tokenizer, samples: list[dict], *, window_size: int = 128,
                           answer_tokens: int = 512, max_context_tokens: int | None = None, **sweeps) -> pd.DataFrame:
    """Hit rate vs the importance threshold and vs the top-k fraction (reference answers, teacher-forced);
    `sweeps` go to `metrics.sensitivity_table`."""
    frames = []
    for index, sample in enumerate(tqdm(samples, desc="samples")):
        prompt = torch.tensor(chat_ids(tokenizer, chat_request(sample, tokenizer, max_context_tokens)))[None]
        ids = torch.cat([prompt, _response_ids(tokenizer, sample["response"], answer_tokens)], 1)
        observation, generated = teacher_forced_attention(model, ids, prompt.shape[1], window_size)
        table = sensitivity_table(observation, generated, window_size=window_size, **sweeps)
        frames.append(table.assign(sample=index))
    return pd.concat(frames, ignore_index=True)


def windows_along_prompt_experiment(model, tokenizer, samples: list[dict], *, window_size: int = 128,
                                    n_windows: int = 20, generated_tokens: int = 512, top_k: float = 0.05,
                                    threshold: float = 0.05, max_context_tokens: int | None = None) -> pd.DataFrame:
    """v2 Fig. 2: each of the last `n_windows` prompt windows used as the observation window, against
    the first `generated_tokens` tokens of the reference answer."""
    frames = []
    for index, sample in enumerate(tqdm(samples, desc="samples")):
        prompt = torch.tensor(chat_ids(tokenizer, chat_request(sample, tokenizer, max_context_tokens)))[None]
        response = _response_ids(tokenizer, sample["response"], generated_tokens)
        table = windows_along_prompt(model, torch.cat([prompt, response], 1), prompt.shape[1],
                                     window_size=window_size, n_windows=n_windows, top_k=top_k, threshold=threshold)
        frames.append(table.assign(sample=index, prompt_tokens=prompt.shape[1]))
    return pd.concat(frames, ignore_index=True)


def question_overlap_experiment(model, tokenizer, documents: list[dict], *, window_size: int = 32,
                                top_k: float = 0.05, max_document_tokens: int | None = None) -> pd.DataFrame:
    """v2 Fig. 4: overlap of the voted sets of different questions (each followed by its reference
    answer) on the same document, per layer."""
    frames = []
    for index, document in enumerate(tqdm(documents, desc="documents")):
        text = document["text"] if max_document_tokens is None else cut_to_tokens(document["text"], tokenizer,
                                                                                  max_document_tokens)
        sequences = []
        for question in document["questions"]:
            prompt = chat_ids(tokenizer, f"{text}\n\n{question['question']}")
            answer = tokenizer(question["answer"], add_special_tokens=False).input_ids
            sequences.append(torch.tensor(prompt + answer)[None])
        shared = _shared_prefix(sequences)
        window = min(window_size, min(s.shape[1] for s in sequences) - shared)
        table = voted_overlap(model, sequences, shared, window_size=window, top_k=top_k)
        frames.append(table.assign(sample=index, document_tokens=shared, window_size=window))
    return pd.concat(frames, ignore_index=True)


def _shared_prefix(sequences: list[torch.Tensor]) -> int:
    length = min(s.shape[1] for s in sequences)
    first = sequences[0][0, :length]
    same = torch.stack([s[0, :length] == first for s in sequences]).all(0)
    return int(same.long().cumprod(0).sum())


def question_position_experiment(model, tokenizer, documents: list[dict], *, window_size: int = 32,
                                 top_k: float = 0.05, threshold: float = 0.05,
                                 max_document_tokens: int | None = None, questions_per_document: int = 2
                                 ) -> pd.DataFrame:
    """v2 Fig. 5: hit rate of the reference answer's tokens when the question sits before the document
    ("beginning") or after it ("end"); the observation window is the prompt's last `window_size` tokens."""
    frames = []
    for index, document in enumerate(tqdm(documents, desc="documents")):
        text = document["text"] if max_document_tokens is None else cut_to_tokens(document["text"], tokenizer,
                                                                                  max_document_tokens)
        for question in document["questions"][:questions_per_document]:
            answer = torch.tensor(tokenizer(question["answer"], add_special_tokens=False).input_ids)[None]
            for placement, content in (("beginning", f"{question['question']}\n\n{text}"),
                                       ("end", f"{text}\n\n{question['question']}")):
                prompt = torch.tensor(chat_ids(tokenizer, content))[None]
                table = hit_rate_along_generation(model, torch.cat([prompt, answer], 1), prompt.shape[1],
                                                  window_size=window_size, steps=1, top_k=top_k,
                                                  threshold=threshold, generation_window=answer.shape[1])
                frames.append(table.assign(sample=index, question=question["name"], placement=placement))
    return pd.concat(frames, ignore_index=True)


def voting_variants_experiment(model, tokenizer, samples: list[dict], *, window_sizes=(8, 16, 32, 64, 128),
                               kernel_sizes=(1, 3, 5, 7), gqa_modes=("expand", "mean", "max"),
                               generation_tokens: int = 512, top_k: float = 0.05, threshold: float = 0.05,
                               max_context_tokens: int | None = None) -> pd.DataFrame:
    """Beyond the paper: hit rate per layer and head when the voted set is made with another window
    size, a pooling kernel (maxpool) or a GQA aggregation (one set per KV group, shared by its query
    heads). One recording of the largest window serves every variant: a smaller window's rows are
    the last rows of the larger one."""
    largest = max(window_sizes)
    variants = ([("window_size", w, w, 1, "expand") for w in window_sizes]
                + [("kernel_size", k, largest, k, "expand") for k in kernel_sizes]
                + [("gqa", g, largest, 1, g) for g in gqa_modes])
    kv_heads = model.config.num_key_value_heads
    records = []
    for index, sample in enumerate(tqdm(samples, desc="samples")):
        prompt = torch.tensor(chat_ids(tokenizer, chat_request(sample, tokenizer, max_context_tokens)))[None]
        ids = torch.cat([prompt, _response_ids(tokenizer, sample["response"], generation_tokens)], 1)
        observations, generated = teacher_forced_attention(model, ids, prompt.shape[1], largest)
        k = int(top_k * prompt.shape[1])
        for layer, (setting, value, window, kernel, gqa) in itertools.product(observations, variants):
            observation = observations[layer][..., -window:, :]
            voted = voted_set(observation, k, kernel_size=kernel, gqa=gqa, kv_heads=kv_heads)
            records += metric_records(generated[layer], {"snapkv": [voted]}, sink_positions(observation),
                                      window=window, threshold=threshold, generation_window=generation_tokens,
                                      by_head=True, sample=index, layer=layer, setting=setting, value=str(value))
    return pd.DataFrame.from_records(records)
