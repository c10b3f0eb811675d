"""`snapkv.analysis.explorer` on synthetic traces and on traces recorded from a tiny model (no real model)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

import snapkv  # noqa: E402
from snapkv.analysis import explorer  # noqa: E402
from snapkv.core.trace import FORMAT_VERSION, Trace  # noqa: E402

HEADS, WINDOW, PROMPT, GENERATED = 4, 4, 24, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_trace(reducer="raw", policy=None, kv_heads=None) -> Trace:
    """Two layers. Layer 0: every window query of head h puts half its mass on position 2 + h, the rest
    spread evenly; generated rows attend to position 2 + h (0.6) and position 10 (0.4)."""
    n = PROMPT
    tensors = {"attention_mask": torch.ones(1, n, dtype=torch.long),
               "input_ids": torch.arange(n + GENERATED)[None] + 100}
    for layer in (0, 1):
        observation = torch.zeros(1, HEADS, WINDOW, n)
        generation = torch.zeros(1, HEADS, GENERATED, n)
        for head in range(HEADS):
            for row in range(WINDOW):
                visible = n - WINDOW + row + 1
                observation[0, head, row, :visible] = 0.5 / visible
                observation[0, head, row, 2 + head] += 0.5
            generation[0, head, :, 2 + head] = 0.6
            generation[0, head, :, 10] = 0.4
        tensors[f"observation.{layer}"] = observation
        tensors[f"generated_mass.{layer}"] = torch.zeros(1, HEADS, GENERATED)
        if reducer == "raw":
            tensors[f"generation.{layer}"] = generation
        elif reducer == "window_sum":
            tensors[f"generation_window_sums.{layer}"] = generation.sum(2, keepdim=True)
        else:
            top = generation.topk(2, dim=-1)
            tensors[f"generation_topk_positions.{layer}"] = top.indices.int()
            tensors[f"generation_topk_values.{layer}"] = top.values
    if reducer == "window_sum":
        tensors["window_token_counts"] = torch.tensor([GENERATED])
    metadata = {"format_version": FORMAT_VERSION, "model_id": "synthetic", "tokenizer": None, "mode": "generate",
                "window_size": WINDOW, "generation": True, "reducer": reducer, "reduce_window": 128, "top_k": 2,
                "policy": policy, "batch": 1, "prompt_length": n, "generated": GENERATED, "layers": [0, 1],
                "sliding_layers": [], "compressed_layers": [], "num_attention_heads": HEADS, "text": None,
                "tensor_names": sorted(tensors)}
    if kv_heads:
        metadata["num_key_value_heads"] = kv_heads
    return Trace(tensors, metadata)


class FakeTokenizer:
    name_or_path = "fake"

    def decode(self, ids):
        return "".join("\n" if i == 105 else f"<{i}>" for i in ids)


def test_votes_and_kept_positions_on_a_synthetic_trace():
    trace = synthetic_trace()
    votes = explorer.window_votes(trace, 0)
    assert votes.shape == (HEADS, PROMPT - WINDOW)
    assert votes.argmax(-1).tolist() == [2, 3, 4, 5]
    kept = explorer.kept_positions(trace, 0, budget=WINDOW + 2, kernel_size=1, pooling="none", gqa="expand")
    assert kept.shape == (HEADS, WINDOW + 2)
    for head in range(HEADS):
        assert 2 + head in kept[head].tolist()
        assert kept[head, -WINDOW:].tolist() == list(range(PROMPT - WINDOW, PROMPT))  # the window is always kept
    everything = explorer.kept_positions(trace, 0, budget=PROMPT + 5, gqa="expand")
    assert everything.shape == (HEADS, PROMPT) and everything[0].tolist() == list(range(PROMPT))


def test_a_smaller_window_uses_the_last_recorded_window_queries():
    trace = synthetic_trace()
    votes = explorer.window_votes(trace, 0, window_size=2)
    observation = trace.observation_attention(0, row=0)
    assert torch.allclose(votes, observation[:, -2:, : PROMPT - 2].sum(1))


def test_head_and_generation_tables():
    trace = synthetic_trace()
    selection = dict(budget=WINDOW + 2, kernel_size=1, pooling="none", gqa="expand")
    table = explorer.head_table(trace, 0, 1, tokenizer=FakeTokenizer(), **selection)
    assert len(table) == PROMPT and table.kept.sum() == WINDOW + 2
    assert table.in_window.sum() == WINDOW and table.vote[table.in_window].isna().all()
    assert table.token[0] == "<100>" and table.token[5] == "\u23ce"  # newline shown as a symbol
    assert table.loc[3, "kept"] and table.loc[3, "generation_mean"] == pytest.approx(0.6)

    steps = explorer.generation_table(trace, 0, 1, **selection)
    assert len(steps) == GENERATED and steps.token.tolist() == ["id 124", "id 125", "id 126"]
    kept_ten = bool(table.loc[10, "kept"])
    assert steps.kept_share.tolist() == pytest.approx([1.0 if kept_ten else 0.6] * GENERATED)
    assert steps.top_position.tolist() == [3] * GENERATED and steps.top_kept.all()

    overview = explorer.kept_attention_table(trace, **selection)
    assert len(overview) == 2 * HEADS and overview.kept_share.between(0.6, 1.0).all()


def test_gqa_modes_need_the_kv_head_count():
    with pytest.raises(ValueError, match="kv_heads"):
        explorer.kept_positions(synthetic_trace(), 0, budget=8, gqa="mean")
    assert explorer.default_gqa(synthetic_trace()) == "expand"
    grouped = synthetic_trace(kv_heads=2)
    assert explorer.default_gqa(grouped) == "mean"
    kept = explorer.kept_positions(grouped, 0, budget=8)
    assert kept.shape == (2, 8)
    assert explorer.cache_head_of(3, HEADS, 2) == 1
    policy = "SnapKV(window_size=4, max_capacity_prompt=8, kernel_size=7, pooling='maxpool', gqa='max')"
    assert explorer.default_gqa(synthetic_trace(policy=policy, kv_heads=2)) == "max"


def test_bad_settings_are_refused_with_the_fix():
    trace = synthetic_trace()
    with pytest.raises(ValueError, match="exceeds window_size"):
        explorer.kept_positions(trace, 0, budget=WINDOW)
    with pytest.raises(ValueError, match="recorded window"):
        explorer.kept_positions(trace, 0, budget=10, window_size=WINDOW + 1)
    with pytest.raises(ValueError, match="odd"):
        explorer.kept_positions(trace, 0, budget=10, kernel_size=4)
    with pytest.raises(ValueError, match="head must be"):
        explorer.head_table(trace, 0, HEADS, budget=10)
    with pytest.raises(ValueError, match="was not recorded"):
        explorer.kept_positions(trace, 7, budget=10)


@pytest.mark.parametrize("reducer", ["window_sum", "topk"])
def test_reduced_traces_give_dense_rows(reducer):
    trace = synthetic_trace(reducer)
    rows, what = explorer.generation_rows(trace, 0)
    assert rows.shape[0] == HEADS and rows.shape[-1] == PROMPT
    assert rows[1, 0, 3] == pytest.approx(0.6) and rows[1, 0, 10] == pytest.approx(0.4)
    assert ("window" in what) == (reducer == "window_sum")
    figure = explorer.explorer_figure(trace, 0, 1, budget=8)
    assert isinstance(figure, go.Figure)


def test_figures_show_tokens_under_the_cursor(tmp_path):
    trace = synthetic_trace()
    figure = explorer.explorer_figure(trace, 1, 2, budget=8, tokenizer=FakeTokenizer())
    assert isinstance(figure, go.Figure)
    kinds = [type(t).__name__ for t in figure.data]
    assert "Heatmap" in kinds and kinds.count("Scatter") >= 4
    scores = figure.data[0]
    assert list(scores.customdata[:2]) == ["<100>", "<101>"] and "customdata" in scores.hovertemplate
    heatmap = next(t for t in figure.data if isinstance(t, go.Heatmap))
    assert np.asarray(heatmap.z).shape == (GENERATED, PROMPT)
    assert "<103>" in heatmap.customdata[0][3]
    static = explorer.static_figure(trace, 1, 2, budget=8)
    static.savefig(tmp_path / "static.png")
    assert (tmp_path / "static.png").stat().st_size > 0
    overview = explorer.kept_attention_figure(explorer.kept_attention_table(trace, budget=8), 8)
    assert isinstance(overview, go.Figure)


def record_tiny(policy=None, new_tokens=5, prompt=80):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if policy is None:
            with snapkv.record(model, window_size=8) as rec:
                model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        else:
            with snapkv.compress(model, policy), snapkv.record(model, window_size=8) as rec:
                model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return rec.trace, model, ids


@pytest.mark.parametrize("gqa", ["mean", "expand"])
def test_kept_positions_match_what_the_engine_kept(gqa, tmp_path):
    policy = snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=5, pooling="maxpool", gqa=gqa)
    trace, _, _ = record_tiny(policy)
    trace = Trace.load(trace.save(tmp_path / "trace"))  # the explorer works from the file alone
    assert explorer.default_gqa(trace) == gqa
    for layer in trace.layers:
        engine = trace.kept_positions(layer, row=0)
        mine = explorer.kept_positions(trace, layer, budget=24, kernel_size=5, pooling="maxpool")
        assert torch.equal(mine, engine.sort(-1).values), layer
    # generation could only read what the engine kept
    steps = explorer.generation_table(trace, 1, 3, budget=24, kernel_size=5, pooling="maxpool")
    assert steps.kept_share.tolist() == pytest.approx([1.0] * len(steps))


@pytest.mark.parametrize("method", ["adakv", "pyramidkv", "chunkkv"])
def test_successors_kept_positions_match_what_the_engine_kept(method, tmp_path):
    policy = snapkv.method_policy(method, 24, window_size=8, kernel_size=5)
    trace, _, _ = record_tiny(policy)
    trace = Trace.load(trace.save(tmp_path / "trace"))
    for layer in trace.layers:
        mine = explorer.kept_positions(trace, layer, budget=24, kernel_size=5, method=method, gqa="mean")
        assert torch.equal(mine, trace.kept_positions(layer, row=0)), layer
    steps = explorer.generation_table(trace, 1, 3, budget=24, kernel_size=5, method=method, gqa="mean")
    assert steps.kept_share.tolist() == pytest.approx([1.0] * len(steps))  # AdaKV's -1 slots mark nothing


def test_a_full_cache_trace_predicts_what_compression_would_keep():
    """Prefill is the same with or without compression, so the explorer's selection on a full-cache trace
    equals what the engine keeps for the same prompt."""
    full, _, _ = record_tiny()
    policy = snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=5, pooling="avgpool", gqa="max")
    compressed, _, _ = record_tiny(policy)
    assert full.metadata["num_key_value_heads"] == 2 and explorer.default_gqa(full) == "mean"  # the engine's
    for layer in full.layers:
        mine = explorer.kept_positions(full, layer, budget=24, kernel_size=5, pooling="avgpool", gqa="max")
        assert torch.equal(mine, compressed.kept_positions(layer, row=0).sort(-1).values), layer


def test_token_labels_from_a_recorded_trace():
    trace, _, ids = record_tiny(new_tokens=4)
    prompt, generated = explorer.token_labels(trace)
    assert prompt == [f"id {i}" for i in ids[0].tolist()]
    assert len(generated) == trace.generated == 3
    assert explorer.load_tokenizer(trace) is None  # a tiny model has no tokenizer to find: ids are shown
