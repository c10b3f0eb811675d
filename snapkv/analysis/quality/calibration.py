"""`snapkv.calibrate`: pick SnapKV's observation window, pooling kernel, pooling and GQA aggregation for one model
and budget, on synthetic retrieval prompts the toolkit makes for itself, and cache the choice.

Why: the paper's needle setting (window 16, kernel 5, maxpool) loses digits of a 7-digit value on small models,
since each head keeps a different part of it (notebook 10, `cluster_width`); which width works depends on the
model and the budget. `calibrate` tries every candidate of `CalibrationSettings` from one shared prefill per
prompt (`cluster_width.needle_sweep`) and ranks them by, in order: accuracy on the prompts the full cache answers,
the leading share of the value reproduced (`scoring.prefix_score`), the share of (layer, KV head) pairs that keep
the whole value (`cluster_width.value_retention`), then the smaller window and kernel, maxpool and GQA mean.

Calibration prompts are never evaluation prompts: their haystack is made of the docstrings of other
standard-library modules (`CALIBRATION_MODULES`, none of `text.MODULES`, which notebooks 06/07 use), their fact
is another sentence ("The registration number of the <colour> <animal> is <value>.", 6 to 9 digits) with its
own question, and their values come from their own seed (tests/analysis/quality/test_calibration.py checks this).

The result is cached per model and budget in ``$SNAPKV_CACHE/calibration/`` (default
``~/.cache/snapkv/calibration/``) as JSON, keyed by the model's identity (config, a sample of its weights, its
dtype and tokenizer), the budget and the settings; an unreadable file is recomputed (with a warning), never an
error.
"""

import dataclasses
import hashlib
import json
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from snapkv import FullCache, SnapKV, method_policy
from snapkv.analysis.quality.cluster_width import needle_sweep
from snapkv.analysis.quality.methods import CALIBRATED, Method, check_lengths_fit
from snapkv.analysis.quality.prompts import QualityPrompt, check_samples, fill_haystack, question_tail
from snapkv.analysis.quality.runner import DEFAULT_PREFILL_CHUNK, model_fingerprint
from snapkv.analysis.text import chat_parts, stdlib_haystack_text, token_ids
from snapkv.core import check_int
from snapkv.core.compat import model_label
from snapkv.core.files import atomic_write_text
from snapkv.core.loading import model_cache_root
from snapkv.core.selection import GQA_MODES, POOLINGS

CALIBRATION_VERSION = 1  # part of the cache key: bump it when the procedure changes
CALIBRATION_SEED = 17_001  # the calibration prompts' own seed (notebooks 06/07 use seed 0)
# haystack: docstrings of modules that `text.MODULES` (the evaluation haystack) does not hold
CALIBRATION_MODULES = (
    "_pydecimal", "doctest", "unittest.case", "unittest.mock", "_pyio", "pdb", "http.server", "urllib.request",
    "importlib.metadata", "asyncio.events", "asyncio.tasks", "platform", "wave", "concurrent.futures._base",
    "pkgutil", "socket", "pydoc", "mimetypes", "fileinput", "cmd",
)
COLOURS = ("teal", "crimson", "ochre", "violet", "silver", "olive", "scarlet", "azure", "ivory", "umber")
ANIMALS = ("heron", "lynx", "otter", "badger", "falcon", "marten", "ibis", "tapir", "gecko", "bison")
MAX_NEW_TOKENS = 16
CACHE_FOLDER = "calibration"


@dataclass(frozen=True)
class CalibrationSettings:
    """The candidates `calibrate` tries (every combination) and its prompts (paper scale); DEFAULT and QUICK: what
    the default and quick profiles change.

    lengths: prompt lengths in tokens (None: `default_lengths` of the budget); samples: prompts per length."""

    window_sizes: tuple[int, ...] = (16, 32)
    kernel_sizes: tuple[int, ...] = (5, 7, 15, 31)
    poolings: tuple[str, ...] = ("maxpool", "avgpool")
    gqa_modes: tuple[str, ...] = ("mean", "max")
    lengths: tuple[int, ...] | None = None
    samples: int = 3
    seed: int = CALIBRATION_SEED
    DEFAULT: ClassVar[dict] = dict(kernel_sizes=(5, 15, 31), poolings=("maxpool",), gqa_modes=("mean",))
    QUICK: ClassVar[dict] = dict(window_sizes=(16,), kernel_sizes=(5, 15), poolings=("maxpool",),
                                 gqa_modes=("mean",), samples=1)


@dataclass(frozen=True, eq=False)
class Calibration:
    """What `calibrate` chose: `policy` (a SnapKV at `budget`) and `table`, one row per candidate (window_size,
    kernel_size, pooling, gqa, accuracy, prefix_score, value_kept, prompts, rank, chosen), best first.
    full_accuracy: the full cache's accuracy on all calibration prompts; prompts: how many there were;
    seconds: how long the calibration ran (when it was computed); cached: read from `path` this time."""

    policy: SnapKV
    table: pd.DataFrame
    budget: int
    model_id: str | None
    settings: CalibrationSettings
    lengths: tuple[int, ...]
    full_accuracy: float
    prompts: int
    seconds: float
    cached: bool
    path: Path | None


# -- checks and prompts ---------------------------------------------------------------------------------------


def check_settings(settings: CalibrationSettings, budget) -> None:
    """Raise TypeError/ValueError for a budget or candidates that cannot run, before any model work."""
    check_int("budget", budget, 1)
    for name in ("window_sizes", "kernel_sizes", "poolings", "gqa_modes"):
        if not getattr(settings, name):
            raise ValueError(f"{name} is empty: give at least one candidate")
    for window in settings.window_sizes:
        if check_int("window_sizes", window, 1) >= budget:
            raise ValueError(f"budget {budget} must exceed every candidate window (got window {window}): the budget "
                             "includes the observation window; use a larger budget or smaller window_sizes")
    for kernel in settings.kernel_sizes:
        if check_int("kernel_sizes", kernel, 1) % 2 == 0:
            raise ValueError(f"kernel_sizes must be odd (pooling keeps positions aligned), got {kernel}")
    bad = [p for p in settings.poolings if p not in POOLINGS or p == "none"]
    if bad:
        raise ValueError(f"unknown pooling(s) {bad}: use maxpool and/or avgpool (kernel_sizes=(1,) means no pooling)")
    bad = [g for g in settings.gqa_modes if g not in GQA_MODES]
    if bad:
        raise ValueError(f"unknown gqa mode(s) {bad}: choose from {GQA_MODES}")
    check_samples(settings.samples)
    check_int("seed", settings.seed, 0)
    if settings.lengths is not None:
        if not settings.lengths:
            raise ValueError("lengths is empty: give prompt lengths above the budget, or None for the default")
        for length in settings.lengths:
            if check_int("lengths", length, 1) <= budget:
                raise ValueError(f"calibration prompt length {length} does not exceed the budget {budget}: nothing "
                                 "would be evicted; use longer lengths")


def default_lengths(budget: int, model=None) -> tuple[int, ...]:
    """Two prompt lengths that compress 2-8x: (max(1000, 2 x budget), max(2000, 4 x budget)), each capped at the
    model's context minus the answer; ValueError when the budget leaves no room below the context."""
    lengths = [max(1000, 2 * budget), max(2000, 4 * budget)]
    limit = None if model is None else getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None:
        lengths = [min(n, limit - MAX_NEW_TOKENS) for n in lengths]
        if lengths[0] <= budget:
            raise ValueError(f"budget {budget} leaves no room for a longer prompt in the model's context "
                             f"({limit} positions): use a budget below {limit - MAX_NEW_TOKENS}")
    return tuple(dict.fromkeys(lengths))


def calibration_fact(rng: random.Random) -> dict:
    """A fact no evaluation prompt holds: key (a colour and an animal), value (a number of 6 to 9 digits),
    sentence, question and answer prefix. (Word-and-digit codes were tried too: SmolLM2 does not answer them
    even with the full cache, so they would not tell the candidates apart.)"""
    key = f"the {rng.choice(COLOURS)} {rng.choice(ANIMALS)}"
    digits = rng.randint(6, 9)
    value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    return dict(key=key, value=value, sentence=f"The registration number of {key} is {value}.",
                question=f"What is the registration number of {key} mentioned in the provided text?",
                answer_prefix=f"The registration number of {key} mentioned in the provided text is")


def calibration_prompts(tokenizer, lengths: Sequence[int], samples: int = 3, seed: int = CALIBRATION_SEED,
                        haystack_text: str | None = None) -> list[QualityPrompt]:
    """`samples` prompts per length, exactly `length` tokens each: a `calibration_fact` at depth (i + 0.5) /
    samples of a haystack of `CALIBRATION_MODULES` docstrings (`haystack_text` replaces it), then its question.
    Built like `prompts.needle_prompts` (task "calibration"), so `runner.needle_tokens` finds the fact."""
    samples = check_samples(samples)
    text = stdlib_haystack_text(CALIBRATION_MODULES) if haystack_text is None else haystack_text
    haystack = token_ids(tokenizer, text[: 40 * max(lengths)])
    head, end = chat_parts(tokenizer)
    prompts = []
    for length in lengths:
        for sample in range(samples):
            rng = random.Random(f"calibration-{seed}-{length}-{sample}")
            fact = calibration_fact(rng)
            needle = token_ids(tokenizer, f"\n{fact['sentence']}\n")
            tail = question_tail(tokenizer, end, fact["question"], fact["answer_prefix"])
            depth = (sample + 0.5) / samples
            if length - len(head) - len(tail) - len(needle) < 1:
                raise ValueError(f"a {length}-token calibration prompt cannot hold its fact and question "
                                 f"({len(head) + len(tail) + len(needle)} tokens): use longer lengths")
            context, (start,) = fill_haystack(haystack, [(depth, needle)], length - len(head) - len(tail), rng)
            prompts.append(QualityPrompt(
                task="calibration", length=length, sample=sample, context_ids=tuple(head + context),
                tail_ids=tuple(tail), expected=(fact["value"],), scoring="contains_all", max_new_tokens=MAX_NEW_TOKENS,
                question=fact["question"], depth=depth, stop_at_newline=True, needle_position=len(head) + start,
                needle=fact["sentence"]))
    return prompts


def candidate_name(policy: SnapKV) -> str:
    return f"snapkv-w{policy.window_size}-k{policy.kernel_size}-{policy.pooling}-{policy.gqa}"


def candidate_policy(budget: int, window_size: int, kernel_size: int, pooling: str, gqa: str) -> SnapKV:
    """The registered "snapkv" method (`snapkv.method_policy`) at `budget`, `window_size` and `kernel_size`, with
    `pooling` and `gqa`: every candidate, and the policy calibration returns, is that method."""
    policy = method_policy("snapkv", budget, window_size=window_size, kernel_size=kernel_size)
    if not isinstance(policy, SnapKV):
        raise TypeError(f"the registered method 'snapkv' builds a {type(policy).__name__}; calibration chooses a "
                        "SnapKV's window, kernel, pooling and gqa, so register 'snapkv' as a SnapKV (subclass)")
    return dataclasses.replace(policy, pooling=pooling, gqa=gqa)


def candidates(settings: CalibrationSettings, budget: int) -> list[Method]:
    """The full cache, then SnapKV at `budget` with every (window, kernel, pooling, gqa) of `settings`."""
    methods = [Method("full", None, FullCache())]
    for window in settings.window_sizes:
        for kernel in settings.kernel_sizes:
            for pooling in settings.poolings:
                for gqa in settings.gqa_modes:
                    policy = candidate_policy(budget, window, kernel, pooling, gqa)
                    methods.append(Method(candidate_name(policy), budget, policy))
    return methods


# -- the choice -----------------------------------------------------------------------------------------------

RANKING = ("accuracy", "prefix_score", "value_kept")  # higher is better, in this order


def candidate_table(sweep: pd.DataFrame, methods: Sequence[Method]) -> tuple[pd.DataFrame, float]:
    """(table, full_accuracy): one row per candidate, ranked (see the module's docstring), from
    `cluster_width.needle_sweep`'s rows. Scores count the prompts the full cache answers (all prompts when it
    answers none, e.g. an untrained model)."""
    full = sweep[sweep.method == "full"]
    if full.empty:
        raise ValueError("the sweep has no full-cache rows: calibration compares against the full cache")
    keys = ["length", "sample"]
    answered = full[full.correct][keys]
    rows = sweep[sweep.method != "full"]
    if len(answered):
        rows = rows.merge(answered, on=keys)
    policies = {m.name: m.policy for m in methods if isinstance(m.policy, SnapKV)}
    table = rows.groupby("method").agg(accuracy=("score", "mean"), prefix_score=("prefix_score", "mean"),
                                       value_kept=("value_kept", "mean"), prompts=("score", "size")).reset_index()
    table = table.assign(**{name: [getattr(policies[m], name) for m in table.method]
                            for name in ("window_size", "kernel_size", "pooling", "gqa")})
    table = table.assign(_pooling=(table.pooling != "maxpool").astype(int), _gqa=(table.gqa != "mean").astype(int))
    table = table.sort_values([*RANKING, "window_size", "kernel_size", "_pooling", "_gqa"],
                              ascending=[False] * len(RANKING) + [True] * 4, kind="stable")
    table = table.drop(columns=["method", "_pooling", "_gqa"]).reset_index(drop=True)
    table = table.assign(rank=range(1, len(table) + 1), chosen=[True] + [False] * (len(table) - 1))
    columns = ["window_size", "kernel_size", "pooling", "gqa", *RANKING, "prompts", "rank", "chosen"]
    return table[columns], float(full.score.mean())


def chosen_policy(table: pd.DataFrame, budget: int) -> SnapKV:
    """The SnapKV of `table`'s chosen row at `budget`."""
    row = table[table.chosen].iloc[0]
    return candidate_policy(budget, int(row.window_size), int(row.kernel_size), str(row.pooling), str(row.gqa))


# -- the cache ------------------------------------------------------------------------------------------------


def calibration_cache_dir() -> Path:
    """``$SNAPKV_CACHE/calibration`` or ``~/.cache/snapkv/calibration`` (beside the converted models)."""
    return model_cache_root().parent / CACHE_FOLDER


def cache_key(fingerprint: str, budget: int, settings: CalibrationSettings, lengths: Sequence[int]) -> str:
    """The cache file's name: sha256 of the model fingerprint, budget, settings, lengths and CALIBRATION_VERSION."""
    payload = dict(version=CALIBRATION_VERSION, fingerprint=fingerprint, budget=budget, settings=asdict(settings),
                   lengths=list(lengths))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _write_json(path: Path, record: dict) -> None:
    try:
        atomic_write_text(path, json.dumps(record, indent=1, default=str))
    except OSError as error:
        warnings.warn(f"could not cache the calibration in {path} ({error}); the next call calibrates again. "
                      "Set SNAPKV_CACHE to a writable folder to fix this.", stacklevel=3)


def _read_cached(path: Path, key: str, settings: CalibrationSettings, budget: int) -> Calibration | None:
    """The calibration cached at `path`, or None when there is none; an unreadable or mismatching file is
    reported with a warning and ignored (it is recomputed and overwritten)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record["key"] != key or record["version"] != CALIBRATION_VERSION or record["budget"] != budget:
            raise ValueError("it belongs to another model, budget or version")
        table = pd.DataFrame.from_records(record["table"])
        saved = record["policy"]
        policy = candidate_policy(budget, saved["window_size"], saved["kernel_size"], saved["pooling"], saved["gqa"])
        if asdict(policy) != saved or int(table.chosen.sum()) != 1:
            raise ValueError("its policy or table is inconsistent")
        return Calibration(policy, table, budget, record["model_id"], settings, tuple(record["lengths"]),
                           float(record["full_accuracy"]), int(record["prompts"]), float(record["seconds"]), True,
                           path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        warnings.warn(f"ignoring the calibration cache file {path} ({type(error).__name__}: {error}); "
                      "calibrating again", stacklevel=3)
        return None


# -- the entry point ------------------------------------------------------------------------------------------


def calibrate(model, tokenizer, *, budget: int, settings: CalibrationSettings | None = None, cache: bool = True,
              force: bool = False, prefill_chunk_size: int | None = DEFAULT_PREFILL_CHUNK, progress: bool = True,
              **changes) -> Calibration:
    """Choose SnapKV's window, kernel, pooling and GQA aggregation for `model` at `budget` (prompt positions kept
    per layer, window included), on synthetic prompts (`calibration_prompts`); see the module's docstring.

    settings: the candidates and prompts (default `CalibrationSettings()`); `changes` replace its fields, e.g.
    `kernel_sizes=(5, 15)`. cache: read and write the result under `calibration_cache_dir()`; force: calibrate
    even when a cached result exists (and overwrite it). Takes a few minutes on a CPU for SmolLM2 with the
    default settings (6 prompts of 1-4K tokens, 32 candidates); cached calls take milliseconds.

        result = snapkv.calibrate(model, tokenizer, budget=256)
        with snapkv.compress(model, result.policy): ...
        result.table   # every candidate's scores, best first
    """
    settings = dataclasses.replace(settings or CalibrationSettings(), **changes)
    check_settings(settings, budget)
    lengths = tuple(settings.lengths) if settings.lengths is not None else default_lengths(budget, model)
    check_lengths_fit(lengths, model, MAX_NEW_TOKENS)
    key = cache_key(model_fingerprint(model, tokenizer), budget, settings, lengths)
    path = calibration_cache_dir() / f"{key}.json"
    if cache and not force:
        found = _read_cached(path, key, settings, budget)
        if found is not None:
            return found
    start = time.perf_counter()
    prompts = calibration_prompts(tokenizer, lengths, settings.samples, settings.seed)
    methods = candidates(settings, budget)
    sweep = needle_sweep(model, tokenizer, prompts, methods, prefill_chunk_size=prefill_chunk_size,
                         progress=progress)
    table, full_accuracy = candidate_table(sweep, methods)
    seconds = time.perf_counter() - start
    if full_accuracy == 0:
        warnings.warn(f"the full cache answers none of the {len(prompts)} calibration prompts: the choice rests on "
                      "how much of each value the candidates keep, not on answers", stacklevel=2)
    policy = chosen_policy(table, budget)
    result = Calibration(policy, table, budget, model_label(model), settings, lengths, full_accuracy, len(prompts),
                         seconds, False, path if cache else None)
    if cache:
        _write_json(path, dict(version=CALIBRATION_VERSION, key=key, budget=budget, model_id=result.model_id,
                               settings=asdict(settings), lengths=list(lengths), policy=asdict(policy),
                               table=table.to_dict("records"), full_accuracy=full_accuracy, prompts=len(prompts),
                               seconds=round(seconds, 2), created=time.strftime("%Y-%m-%dT%H:%M:%S")))
    return result


def calibrated_policy(model, tokenizer, budget: int, **kwargs) -> SnapKV:
    """`calibrate(model, tokenizer, budget=budget, **kwargs).policy` (cached per model and budget)."""
    return calibrate(model, tokenizer, budget=budget, **kwargs).policy


def calibrated_methods(model, tokenizer, budgets: Sequence[int], name: str = CALIBRATED,
                       **kwargs) -> list[Method]:
    """One `quality.Method` per budget with the calibrated SnapKV, to append to a `quality.method_grid` (notebooks
    06/07: the calibrated SnapKV beside the paper's settings)."""
    return [Method(name, budget, calibrated_policy(model, tokenizer, budget, **kwargs)) for budget in budgets]
