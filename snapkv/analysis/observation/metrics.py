"""Observation metrics of the paper's Section 3, as pure functions of recorded attention.

Shapes: observation attention (batch, heads, window, prompt_len); generated rows
(batch, heads, generated, prompt_len). The prefix is the prompt minus its observation window.
"""

import itertools

import numpy as np
import pandas as pd
import torch
from scipy import stats

from snapkv.core.selection import aggregate_gqa, pool_scores


def voted_set(observation: torch.Tensor, top_k: float | int = 0.05, prefix_len: int | None = None, *,
              kernel_size: int = 1, gqa: str = "expand", kv_heads: int | None = None) -> torch.Tensor:
    """Prefix positions the observation window votes for, per head: bool (batch, heads, prompt_len).

    top_k: a fraction of the prompt length (the authors' `int(0.05 * prompt_len)`) or a count.
    Votes are the window's summed attention over the prefix (default: all positions before the
    window); the paper's observation uses no pooling (kernel_size 1) and one set per query head
    (gqa "expand"). kernel_size > 1 max-pools the votes as SnapKV does; gqa "mean"/"max" make one set
    per KV group (kv_heads groups) that all its query heads share.
    """
    window, prompt_len = observation.shape[-2:]
    prefix_len = prompt_len - window if prefix_len is None else prefix_len
    k = int(top_k * prompt_len) if isinstance(top_k, float) else int(top_k)
    if not 0 < k <= prefix_len:
        raise ValueError(f"top_k gives {k} positions; it must be between 1 and the prefix length "
                         f"{prefix_len}: use a larger prompt or another top_k")
    votes = pool_scores(observation[..., :prefix_len].sum(dim=-2), kernel_size, "maxpool")
    heads = votes.shape[1]
    votes = aggregate_gqa(votes, kv_heads or heads, gqa)
    chosen = torch.zeros(*votes.shape[:-1], observation.shape[-1], dtype=torch.bool, device=votes.device)
    chosen.scatter_(-1, votes.topk(k, dim=-1).indices, True)
    return chosen.repeat_interleave(heads // chosen.shape[1], dim=1)


REFERENCES = ("random", "recency", "streaming")


def reference_set(kind: str, shape: tuple, window: int, k: int, *, sink_size: int = 4, seed: int = 0) -> torch.Tensor:
    """A reference voted set of k prefix positions per head, the size SnapKV's has: bool `shape`
    (batch, heads, prompt_len), never inside the observation window.

    "random": uniform per head (reproducible with `seed`); "recency": the k positions just before the
    window; "streaming": the first `sink_size` positions plus the most recent ones (StreamingLLM).
    """
    prompt_len = shape[-1]
    prefix = prompt_len - window
    if not 0 < k <= prefix:
        raise ValueError(f"k ({k}) must be between 1 and the prefix length ({prefix})")
    chosen = torch.zeros(shape, dtype=torch.bool)
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        scores = torch.rand(*shape[:-1], prefix, generator=generator)
        chosen.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    elif kind == "recency":
        chosen[..., prefix - k : prefix] = True
    elif kind == "streaming":
        sinks = min(sink_size, k)
        chosen[..., :sinks] = True
        chosen[..., prefix - (k - sinks) : prefix] = True
    else:
        raise ValueError(f"unknown reference {kind!r}: choose one of {REFERENCES}")
    return chosen


def sink_positions(observation: torch.Tensor, sink_size: int = 4, cutoff: float | None = None) -> torch.Tensor:
    """Attention-sink positions per head: bool (batch, heads, prompt_len). The first `sink_size`
    positions, and with `cutoff` also any prefix position whose mean attention over the window exceeds it."""
    window, prompt_len = observation.shape[-2:]
    sinks = torch.zeros(observation.shape[:-2] + (prompt_len,), dtype=torch.bool)
    sinks[..., :sink_size] = True
    if cutoff is not None:
        sinks[..., : prompt_len - window] |= observation[..., : prompt_len - window].mean(dim=-2).cpu() > cutoff
    return sinks


def important_positions(rows: torch.Tensor, threshold: float = 0.05) -> tuple[torch.Tensor, ...]:
    """The (batch, head, token, position) indices where `rows > threshold`: a token's important positions.
    Attention rows sum to 1, so each token has fewer than 1 / threshold of them: a short list, not a matrix."""
    return (rows > threshold).nonzero(as_tuple=True)


def _masses(prefix: torch.Tensor, voted: torch.Tensor) -> torch.Tensor:
    """Attention mass of each row of `prefix` (batch, heads, tokens, n) on each set of `voted` (batch, heads, n,
    sets): a gather of the k positions when every set holds k per head (as SnapKV's and its reference sets
    do), a product otherwise."""
    sizes = voted.sum(-2)
    if not (sizes == sizes.flatten()[0]).all():
        return prefix @ voted.to(prefix.dtype)
    positions = voted.transpose(-1, -2).nonzero(as_tuple=True)[-1].view(*voted.shape[:2], -1)  # sorted per set
    picked = prefix.gather(-1, positions[:, :, None].expand(-1, -1, prefix.shape[2], -1))
    return picked.view(*picked.shape[:3], voted.shape[-1], -1).sum(-1)


def token_metrics(rows: torch.Tensor, sets: dict[str, list[torch.Tensor]], sinks: torch.Tensor, window: int,
                  threshold: float = 0.05, important: tuple[torch.Tensor, ...] | None = None
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Per (batch, head, generated token) counts and masses behind every observation metric, for each
    reference of `sets` ({name: [voted set, ...]}; a list of several draws, e.g. random seeds, is averaged).

    hits / important: |I & V| and |I|; *_no_sinks: the same with sink positions left out; on_sinks:
    |I & sinks|; voted_mass / prefix_mass: attention mass on V and on the whole prefix (their ratio is
    the threshold-free attention-mass recall). I is the prefix positions above `threshold`; every count
    adds up 0/1 position indicators over I's few entries, exact in float32 (integers below 2**24).
    important: `important_positions(rows, threshold)` of rows that may run past these (positions after the
    prefix are dropped), for a caller that measures several prefixes of the same rows; None: computed here.
    """
    prefix_len = rows.shape[-1] - window
    prefix = rows[..., :prefix_len]
    important = important_positions(prefix, threshold) if important is None else important
    batch, head, token, position = (index[important[3] < prefix_len] for index in important)
    names, sizes = list(sets), [len(candidates) for candidates in sets.values()]
    voted = torch.stack([v[..., :prefix_len] for candidates in sets.values() for v in candidates], dim=-1)
    sinks = sinks[..., :prefix_len, None]
    indicators = torch.cat([torch.ones_like(sinks), ~sinks, sinks, voted, voted & ~sinks], dim=-1).float()
    counts = torch.zeros(*prefix.shape[:-1], indicators.shape[-1], device=prefix.device)
    counts.index_put_((batch, head, token), indicators[batch, head, position], accumulate=True)
    masses = _masses(prefix, voted)
    shared = dict(important=counts[..., 0], important_no_sinks=counts[..., 1], on_sinks=counts[..., 2],
                  prefix_mass=prefix.sum(-1))
    total, start, result = voted.shape[-1], 0, {}
    for name, size in zip(names, sizes):
        part = slice(start, start + size)
        result[name] = dict(shared, hits=counts[..., 3:][..., part].mean(-1),
                            hits_no_sinks=counts[..., 3 + total :][..., part].mean(-1),
                            voted_mass=masses[..., part].mean(-1))
        start += size
    return result


COUNTS = ("hits", "important", "hits_no_sinks", "important_no_sinks", "on_sinks")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ratios(counts) -> dict:
    """hit_rate, hit_rate_no_sinks and sink_share from summed counts."""
    return dict(hit_rate=_ratio(counts["hits"], counts["important"]),
                hit_rate_no_sinks=_ratio(counts["hits_no_sinks"], counts["important_no_sinks"]),
                sink_share=_ratio(counts["on_sinks"], counts["important"]))


def pool(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Merge rows of an observation table per `by` (e.g. all generation windows of a sample): counts
    and tokens add up, ratios are recomputed from the sums, mass_recall is averaged weighted by tokens."""
    table = table.assign(recall_tokens=table.mass_recall * table.tokens)
    sums = table.groupby(by, as_index=False)[[*COUNTS, "tokens", "recall_tokens"]].sum()
    sums["mass_recall"] = sums.pop("recall_tokens") / sums.tokens
    return pd.concat([sums, pd.DataFrame([ratios(row) for _, row in sums.iterrows()], index=sums.index)], axis=1)


def reference_sets(voted: torch.Tensor, window: int, references=REFERENCES, *, sink_size: int = 4,
                   seeds: int = 3) -> dict[str, list[torch.Tensor]]:
    """{"snapkv": [voted], "random": [one set per seed], "recency": [...], "streaming": [...]}, all the
    size of the voted set (per head)."""
    k = int(voted[0, 0].sum())
    sets = {"snapkv": [voted]}
    for kind in references:
        count = seeds if kind == "random" else 1
        sets[kind] = [reference_set(kind, voted.shape, window, k, sink_size=sink_size, seed=s) for s in range(count)]
    return sets


def metric_records(rows: torch.Tensor, sets: dict, sinks: torch.Tensor, *, window: int, threshold: float,
                   generation_window: int, by_head: bool = False, important: tuple[torch.Tensor, ...] | None = None,
                   **tags) -> list[dict]:
    """Rows of the observation tables: for each set (a list is averaged, e.g. random seeds), each
    generation window of `generation_window` tokens (and each head with by_head): hits, important,
    hit_rate, hit_rate_no_sinks, sink_share, mass_recall, tokens, plus `tags` (`important`: see
    `token_metrics`)."""
    records = []
    steps = rows.shape[2]
    for reference, totals in token_metrics(rows, sets, sinks, window, threshold, important).items():
        recall = totals["voted_mass"] / totals["prefix_mass"].clamp(min=1e-12)
        heads = range(rows.shape[1]) if by_head else [slice(None)]
        for start, head in itertools.product(range(0, steps, generation_window), heads):
            part = (slice(None), head, slice(start, min(start + generation_window, steps)))
            sums = {name: float(value[part].sum()) for name, value in totals.items()}
            record = dict(tags, window=start // generation_window, reference=reference,
                          **{name: sums[name] for name in COUNTS}, mass_recall=float(recall[part].mean()),
                          tokens=rows.shape[0] * (part[2].stop - start))
            record |= ratios(record)
            records.append(record | ({"head": head} if by_head else {}))
    return records


def hit_rate_table(observation: dict, generated: dict, *, window_size: int, generation_window: int,
                   top_k: float | int = 0.05, threshold: float = 0.05, by_head: bool = False,
                   references=REFERENCES, sink_size: int = 4, sink_cutoff: float | None = None,
                   seeds: int = 3) -> pd.DataFrame:
    """Hit rate per layer and generation window, the paper's Fig. 2 quantity, next to reference sets.

    observation / generated: {layer: tensor} as recorded. One row per layer, generation window
    (0-based) and `reference` ("snapkv": the window's voted set; "random" (mean over `seeds` seeds),
    "recency", "streaming": sets of the same size). Columns: hits, important, hit_rate (= hits /
    important over heads, batch rows and tokens), hit_rate_no_sinks (sink positions left out),
    sink_share (share of important entries on sinks), mass_recall (mean share of each token's prefix
    attention mass that falls on the set), tokens, and the counts behind the ratios (see `pool`);
    by_head adds `head` and gives each head its own row.
    """
    records = []
    for layer, obs in observation.items():
        obs = obs[..., -window_size:, :]
        sets = reference_sets(voted_set(obs, top_k), window_size, references, sink_size=sink_size, seeds=seeds)
        records += metric_records(generated[layer], sets, sink_positions(obs, sink_size, sink_cutoff),
                                  window=window_size, threshold=threshold, generation_window=generation_window,
                                  by_head=by_head, layer=layer)
    return pd.DataFrame.from_records(records)


def sensitivity_table(observation: dict, generated: dict, *, window_size: int,
                      thresholds=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2), top_ks=(0.01, 0.02, 0.05, 0.1, 0.2),
                      threshold: float = 0.05, top_k: float = 0.05, references=("random",)) -> pd.DataFrame:
    """Hit rate as the threshold (at top_k) and the top-k fraction (at threshold) vary: rows tagged
    sweep ("threshold" or "top_k") and value, for the voted set and `references`, all tokens together."""
    frames = []
    for sweep, values in (("threshold", thresholds), ("top_k", top_ks)):
        for value in values:
            settings = dict(threshold=threshold, top_k=top_k) | {sweep: value}
            table = hit_rate_table(observation, generated, window_size=window_size, references=references,
                                   generation_window=next(iter(generated.values())).shape[2], **settings)
            frames.append(table.assign(sweep=sweep, value=value))
    return pd.concat(frames, ignore_index=True)


def summarize(table: pd.DataFrame, by: list[str], value: str, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Mean of `value` over samples per group, with a bootstrap confidence interval (scipy).

    Returns columns *by, mean, ci_low, ci_high, samples.
    """
    records = []
    for key, group in table.groupby(by, sort=True):
        values = group[value].dropna().to_numpy(dtype=float)
        low = high = float(values.mean()) if len(values) else float("nan")
        if len(values) > 1 and np.ptp(values) > 0:
            result = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=2000,
                                     random_state=np.random.default_rng(seed))
            low, high = result.confidence_interval
        key = key if isinstance(key, tuple) else (key,)
        records.append(dict(zip(by, key), mean=float(values.mean()) if len(values) else float("nan"),
                            ci_low=float(low), ci_high=float(high), samples=len(values)))
    return pd.DataFrame.from_records(records)


DEPTH_METRICS = {"hit_rate": "with sinks", "hit_rate_no_sinks": "without sinks"}


def main_protocol(table: pd.DataFrame) -> str:
    """The protocol a summary of notebook 01's table uses: "reference" (teacher-forced answers) when present."""
    protocols = sorted(set(table.protocol))
    return "reference" if "reference" in protocols else protocols[0]


def hit_rate_by_depth(table: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """Notebook 01's hit rates of several models on one relative depth axis.

    table: notebook 01's tables stacked with a `model` column (`reporting.runs.read_across_models`).
    protocol: which answers (None: `main_protocol`). Each model's layer count is taken from its rows
    (largest layer + 1); depth = layer / (layers - 1): 0 is the first layer, 1 the last.
    Returns one row per (model, sinks, reference, layer): mean over samples of the hit rate with all
    generation windows and heads pooled, with a 95% bootstrap interval; columns model, sinks ("with sinks" /
    "without sinks"), reference, layer, mean, ci_low, ci_high, samples, layers, depth, protocol.
    """
    protocol = protocol or main_protocol(table)
    part = table[table.protocol == protocol]
    layers = part.groupby("model").layer.max() + 1
    pooled = pool(part, ["model", "sample", "layer", "reference"])
    long = pooled.melt(id_vars=["model", "sample", "layer", "reference"], value_vars=list(DEPTH_METRICS),
                       var_name="sinks")
    long["sinks"] = long.sinks.map(DEPTH_METRICS)
    summary = summarize(long, ["model", "sinks", "reference", "layer"], "value")
    summary["layers"] = summary.model.map(layers).astype(int)
    summary["depth"] = summary.layer / (summary.layers - 1).clip(lower=1)
    return summary.assign(protocol=protocol)
