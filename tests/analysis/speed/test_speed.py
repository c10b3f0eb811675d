"""`snapkv.analysis.speed` on a tiny model, and `benchmarks/gpu_scale.py --device cpu --tiny` (no real model)."""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

import snapkv  # noqa: E402
from snapkv.analysis import speed  # noqa: E402
from snapkv.core import compat  # noqa: E402

GPU_SCALE = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_scale.py"


pytestmark = pytest.mark.usefixtures("one_thread")


class CharTokenizer:
    """Enough of a tokenizer for `speed.prompt_ids`: one token per character."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [ord(c) % 120 + 1 for c in text]})()


def test_chunk_bounds_never_end_on_a_single_token():
    assert compat.chunk_bounds(0, 10, 3) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert compat.chunk_bounds(0, 10, None) == [(0, 10)]
    assert compat.chunk_bounds(4, 12, 4) == [(4, 8), (8, 12)]
    assert compat.chunk_bounds(5, 5, 4) == []


@pytest.mark.parametrize("chunk", [None, 16])
def test_decode_speed_measures_the_cache_it_decoded_with(chunk):
    model = tiny_model("llama")
    config = model.config
    ids = torch.randint(1, 128, (2, 70), generator=torch.Generator().manual_seed(0))
    per_slot = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size // 4) * 4
    full = speed.decode_speed(model, ids, snapkv.FullCache(), decode_tokens=3, prefill_chunk_size=chunk)
    assert full["kv_slots_layer0"] == 70 + 4  # prompt + first step + 3 timed steps
    assert full["kv_cache_mib"] * 2**20 == 2 * per_slot * 74
    assert full["kv_bytes_per_slot"] == per_slot
    assert full["decode_tokens"] == 3 and full["decode_ms_per_token"] > 0 and full["status"] == "ok"
    assert full["weights_mib"] * 2**20 == speed.model_bytes(model)
    assert full["chunked"] is (chunk is not None) and full["peak_memory_mib"] is None  # CPU

    policy = snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3)
    snap = speed.decode_speed(model, ids, policy, decode_tokens=3, prefill_chunk_size=chunk)
    assert (snap["method"], snap["budget"]) == ("SnapKV", 24)
    assert snap["kv_slots_layer0"] == 24 + 4
    assert snap["kv_cache_mib"] * 2**20 == 2 * per_slot * 28


def test_decode_speed_counts_sliding_and_compressed_layers_apart():
    model = tiny_model("gemma3")  # layers: sliding (window 16), full, sliding
    config = model.config
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    policy = snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3)
    snap = speed.decode_speed(model, ids, policy, decode_tokens=3)
    full = speed.decode_speed(model, ids, snapkv.FullCache(), decode_tokens=3)
    assert snap["kv_slots_global"] == 24 + 4 and full["kv_slots_global"] == 70 + 4
    assert snap["kv_slots_sliding"] == full["kv_slots_sliding"] == snap["kv_slots_layer0"] == 16 - 1
    assert snap["sliding_layers"] == 2 and (snap["compressed_layers"], snap["compressed_layer_ids"]) == (1, "1")
    assert (full["compressed_layers"], full["compressed_layer_ids"]) == (0, "")
    per_slot_layer = 2 * config.num_key_value_heads * config.head_dim * 4
    assert snap["kv_cache_mib"] * 2**20 == per_slot_layer * (2 * 15 + 28)
    assert snap["kv_bytes_per_slot"] == per_slot_layer * 3  # one position in every layer
    llama = speed.decode_speed(tiny_model("llama"), ids, policy, decode_tokens=3)
    assert llama["kv_slots_sliding"] is None and llama["kv_slots_global"] == llama["kv_slots_layer0"] == 28
    assert (llama["sliding_layers"], llama["compressed_layer_ids"]) == (0, "0,1,2")


def test_a_shared_prefix_gives_the_same_cache_as_a_whole_prefill():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    prefix = compat.new_cache(model)
    with torch.inference_mode():
        compat.prefill(model, ids[:, :40], prefix)
    copied = compat.copy_cache(prefix, batch_size=3)
    assert copied.layers[0].keys.shape[0] == 3 and copied.get_seq_length() == 40
    policy = snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3)
    row = speed.decode_speed(model, ids.expand(3, -1), policy, decode_tokens=2, cache=copied)
    assert row["prefilled_tokens"] == 20 and row["batch_size"] == 3 and row["kv_slots_layer0"] == 24 + 3


def test_decode_speed_records_cpu_time_tokens_and_recording():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    plain = speed.decode_speed(model, ids, snapkv.FullCache(), decode_tokens=3)
    assert min(plain["prefill_cpu_s"], plain["first_step_cpu_s"], plain["decode_cpu_ms_per_token"]) > 0
    assert len(plain["generated_head"]) == 4 and plain["record_window"] is None  # prefill's token + 3 steps
    recorded = speed.decode_speed(model, ids, snapkv.FullCache(), decode_tokens=3, record_window=8)
    assert recorded["generated_head"] == plain["generated_head"] and recorded["record_window"] == 8
    assert recorded["kv_cache_mib"] == plain["kv_cache_mib"]


def test_decode_speed_runs_a_press_as_its_own_context():
    entered = []

    class Press:  # what kvpress's presses offer: press(model) is a context manager
        @contextlib.contextmanager
        def __call__(self, model):
            entered.append(model)
            yield

    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    row = speed.decode_speed(model, ids, Press(), decode_tokens=2)
    assert entered == [model] and row["method"] == "Press" and row["kv_slots_layer0"] == 40 + 3
    assert row["compressed_layers"] is None  # unknown for a press
    with pytest.raises(TypeError, match="snapkv policy"):
        speed.decode_speed(model, ids, "SnapKV", decode_tokens=2)


def test_shared_prefix_is_the_prompt_start_in_a_full_cache():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    prefix, cost = speed.measure.shared_prefix(model, ids, 44, prefill_chunk_size=16)
    assert prefix.get_seq_length() == 44 and cost["shared_prefix_len"] == 44
    assert cost["prefix_prefill_s"] > 0 and cost["prefix_prefill_cpu_s"] > 0
    whole, _ = speed.measure.shared_prefix(model, ids, 44)
    torch.testing.assert_close(prefix.layers[1].keys, whole.layers[1].keys)


def test_table_extrapolation_and_figure():
    model = tiny_model("llama")
    table = speed.speed_memory_table(model, CharTokenizer(), prompt_lengths=[48, 96], budgets=[24, 64],
                                     batch_sizes=[1, 2], decode_tokens=2, window_size=8, kernel_size=3,
                                     progress=False)
    configs = set(zip(table.method, table.budget.fillna(0).astype(int), table.batch_size, table.prompt_len))
    assert configs == {(m, b, batch, n) for batch in (1, 2) for n in (48, 96)
                       for m, b in [("FullCache", 0), ("SnapKV", 24), ("SnapKV", 64)] if b < n}
    assert set(speed.ROW_FIELDS) <= set(table.columns) and (table.status == "ok").all()
    assert (table.shared_prefix_len == table.prompt_len - 8).all() and (table.prefix_prefill_s > 0).all()

    lengths = [48, 96, 192, 100_000]
    extrapolated = speed.memory_extrapolation(table, lengths)
    full = table[(table.method == "FullCache") & (table.batch_size == 2) & (table.prompt_len == 96)].iloc[0]
    predicted = extrapolated[(extrapolated.config == "FullCache") & (extrapolated.batch_size == 2)
                             & (extrapolated.prompt_len == 96)].iloc[0]
    assert predicted.memory_gib * 1024 == pytest.approx(full.memory_mib)  # reproduces what was measured
    snap = extrapolated[(extrapolated.config == "SnapKV 24") & (extrapolated.batch_size == 1)]
    assert snap.kv_cache_gib.nunique() == 1  # a compressed cache does not grow with the prompt
    grows = extrapolated[(extrapolated.config == "FullCache") & (extrapolated.batch_size == 1)].kv_cache_gib
    assert grows.is_monotonic_increasing and grows.iloc[-1] > 100 * grows.iloc[0]

    limit = (full.weights_mib + 0.5 * full.kv_cache_mib) / 1024  # room for about half this cache
    longest = speed.longest_prompt_within(table, limit).set_index("batch_size").longest_prompt
    assert 0 < longest[2] < 96 and longest[1] > longest[2]
    assert speed.longest_prompt_within(table, full.weights_mib / 2048).longest_prompt.isna().all()

    figure, interactive = speed.speed_memory_figure(table, extrapolated, memory_limit_gib=limit, caption="tiny")
    assert len(figure.axes) == 4  # 2 rows x 2 batch sizes
    assert len(interactive.data) == 3 * 3 * 2  # 3 configs x (speed, extrapolated, measured) x 2 batch sizes
    assert any(shape.y0 == limit for shape in interactive.layout.shapes)


def test_extrapolation_predicts_a_hybrid_cache_at_an_unmeasured_length():
    """Gemma 3's sliding layers stop growing at their window: the prediction at a longer prompt, made from
    shorter ones, equals what decode_speed then measures there (full cache and SnapKV)."""
    model = tiny_model("gemma3")  # layers: sliding (window 16), global, sliding
    table = speed.speed_memory_table(model, CharTokenizer(), prompt_lengths=[40, 64], budgets=[24],
                                     batch_sizes=[1], decode_tokens=2, window_size=8, kernel_size=3,
                                     progress=False)
    assert (table.sliding_layers == 2).all() and (table.layers == 3).all()
    assert (table.kv_slots_sliding < table.prompt_len).all()  # the sliding layers were full when measured
    extrapolated = speed.memory_extrapolation(table, [160]).set_index("config")
    for policy, config in [(snapkv.FullCache(), "FullCache"),
                           (snapkv.SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=3), "SnapKV 24")]:
        measured = speed.decode_speed(model, speed.prompt_ids(CharTokenizer(), 160), policy, decode_tokens=2)
        assert extrapolated.loc[config, "kv_cache_gib"] * 1024 == pytest.approx(measured["kv_cache_mib"])
    full_at_160 = speed.decode_speed(model, speed.prompt_ids(CharTokenizer(), 160), snapkv.FullCache(),
                                     decode_tokens=2)
    limit = (table.weights_mib.iloc[0] + full_at_160["kv_cache_mib"]) / 1024
    longest = speed.longest_prompt_within(table, limit).longest_prompt.iloc[0]
    assert longest == 160  # the full cache of a 160-token prompt fills the limit exactly


def test_prompt_ids_are_real_text_of_the_requested_length():
    ids = speed.prompt_ids(CharTokenizer(), 500)
    assert ids.shape == (1, 500)
    with pytest.raises(ValueError, match="tail"):
        speed.speed_memory_table(tiny_model(), CharTokenizer(), prompt_lengths=[8], window_size=8, progress=False)


# -- benchmarks/gpu_scale.py -----------------------------------------------------------------------
def load_gpu_scale():
    spec = importlib.util.spec_from_file_location("gpu_scale", GPU_SCALE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scale_runs_on_cpu_with_a_tiny_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(GPU_SCALE), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_scale.json").read_text())
    assert results["complete"] is True
    assert {"complete", "settings", "environment", "rows"} <= results.keys()  # speed_memory.json's schema
    assert "random" in results["environment"]["weights"] and results["environment"]["device"] == "cpu"
    rows = pd.DataFrame(results["rows"])
    assert set(rows.prompt_len) == {64, 128} and set(rows.batch_size) == {1, 2}
    assert set(rows.method) == {"FullCache", "SnapKV"} and (rows.status == "ok").all()
    assert {"method", "budget", "prompt_len", "prefill_s", "first_step_s", "decode_ms_per_token", "kv_cache_mib",
            "peak_rss_mib", "chunked"} <= set(rows.columns)
    snap = rows[(rows.method == "SnapKV") & (rows.prompt_len == 128)]
    full = rows[(rows.method == "FullCache") & (rows.prompt_len == 128)]
    assert (snap.kv_cache_mib.to_numpy() < full.kv_cache_mib.to_numpy()).all()
    assert (tmp_path / "gpu_scale.png").stat().st_size > 0
    assert "decode" in done.stdout  # one printed line per configuration


def test_gpu_scale_records_out_of_memory_and_stops_doubling():
    gpu_scale = load_gpu_scale()
    model = tiny_model("llama")
    settings = {"start_length": 64, "max_length": 1024, "budget": 48, "batch_sizes": [1, 2], "decode_tokens": 2,
                "prefill_chunk_size": 32}
    tried = []

    def measure(model, ids, policy, **kwargs):
        batch, n = ids.shape
        tried.append((type(policy).__name__, batch, n))
        if n * batch >= 256 and type(policy).__name__ == "FullCache" or n >= 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"method": type(policy).__name__, "budget": getattr(policy, "max_capacity_prompt", None),
                "batch_size": batch, "prompt_len": n, "status": "ok"}

    rows = gpu_scale.run_grid(model, settings, lambda row: None, measure=measure)
    status = {(r["method"], r["batch_size"], r["prompt_len"]): r["status"] for r in rows}
    assert status[("FullCache", 2, 128)] == "oom" and status[("SnapKV", 2, 128)] == "ok"
    assert status[("SnapKV", 1, 256)] == "oom" and status[("SnapKV", 2, 256)] == "oom"
    assert max(n for _, _, n in status) == 256  # SnapKV ran out of memory at every batch: no 512
    assert ("FullCache", 2, 256) not in tried  # known to run out of memory already
    not_tried = next(r for r in rows if (r["method"], r["batch_size"], r["prompt_len"]) == ("FullCache", 2, 256))
    assert "not tried" in not_tried["error"]
    assert gpu_scale.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not gpu_scale.is_out_of_memory(ValueError("other"))
    assert gpu_scale.prompt_lengths(4096, 131072) == [4096, 8192, 16384, 32768, 65536, 131072]
