"""The benchmarks measure with the library's pieces: their rows keep the keys speed_memory.json has always
had, and the one environment record keeps the keys its readers use (figure JSONs, traces, the run record)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from snapkv.analysis.reporting.notebooks import run_environment
from snapkv.core.environment import environment

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SPEED_MEMORY_ROW = {"method", "budget", "prompt_len", "prefill_s", "first_step_s", "decode_ms_per_token",
                    "kv_cache_mib", "peak_rss_mib", "chunked", "prefill_cpu_s", "first_step_cpu_s",
                    "decode_cpu_ms_per_token", "decode_ms_p10", "decode_ms_p90", "decode_tokens", "kv_slots_layer0",
                    "rss_after_decode_mib", "generated_head"}


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("method", "budget"), [("FullCache", None), ("SnapKV", 48), ("record", None)])
def test_speed_memory_rows_keep_their_keys(method, budget):
    speed_memory = load_benchmark("speed_memory")
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(0))
    config = {"method": method, "budget": budget, "prompt_len": 70, "chunked": False, "decode_tokens": 3}
    row = speed_memory.measure_config(model, ids, config)
    assert SPEED_MEMORY_ROW <= row.keys()
    assert (row["method"], row["budget"]) == (method, budget) and row["peak_rss_mib"] > 0
    assert row["kv_slots_layer0"] == (48 if method == "SnapKV" else 70) + 4
    assert row["record_window"] == (speed_memory.SNAPKV_SETTINGS["window_size"] if method == "record" else None)


def test_environment_keeps_the_keys_its_readers_use():
    env = environment(tiny_model("llama"), torch_threads=3)
    assert {"model_id", "dtype", "device", "torch_version", "transformers_version", "date"} <= env.keys()
    assert env["torch_threads"] == 3 and env["device"] == "cpu" and env["parameters"] > 0
    assert json.loads(json.dumps(env)) == env  # traces store it in JSON and compare it after loading
    record = run_environment()
    assert {"python", "platform", "versions", "machine"} <= record.keys()
    assert {"cpu", "cpu_count", "memory_gib", "gpu"} <= record["machine"].keys()
    assert record["versions"]["torch"] and record["python"] == env["python_version"]


def test_speed_memory_takes_any_embedded_model_by_name_and_names_its_files_after_it():
    speed_memory = load_benchmark("speed_memory")
    assert speed_memory.parse_args(["--quick"]).model is None and speed_memory.output_name(None) == "speed_memory"
    args = speed_memory.parse_args(["--model", "qwen2.5-coder-1.5b-instruct"])
    assert speed_memory.output_name(args.model) == "speed_memory_qwen2.5-coder-1.5b-instruct"
    with pytest.raises(SystemExit):
        speed_memory.parse_args(["--model", "llama-7b"])  # not an embedded model: refused before any work


def test_peers_ratios_make_kvpress_keep_exactly_the_budget():
    peers = load_benchmark("peers")
    for n in (129, 1000, 2000, 8192):
        for budget in sorted({1, 64, 128, 256, 512, n - 1} & set(range(1, n))):
            ratio = peers.scorer_ratio(budget, n)  # kvpress's ScorerPress keeps max(1, int(n * (1 - ratio)))
            assert 0 <= ratio < 1 and max(1, int(n * (1 - ratio))) == budget
            for layers, heads in ((30, 3), (32, 8), (1, 1)):
                ratio = peers.kvzip_ratio(budget, n, layers, heads)  # KVzipPress prunes, per layer or in all
                assert int(heads * n * ratio) == heads * (n - budget)
                assert int(layers * heads * n * ratio) == layers * heads * (n - budget)


def test_peers_compare_kept_positions_and_sum_up_identical_answers_per_pair():
    peers = load_benchmark("peers")
    assert peers.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert peers.first_divergence([1, 2, 3], [1, 5, 3]) == 1 and peers.first_divergence([1, 2], [1, 2, 3]) == 2
    ours = torch.zeros(2, 2, 10, dtype=torch.bool)
    ours[..., :4] = True
    peer = ours.clone()
    peer[1, 1, 0], peer[1, 1, 9] = False, True  # layer 1, head 1 keeps position 9 instead of 0
    compared = peers.kept_comparison(ours, peer, needle_span=(8, 10), prefix=(0, 2))
    assert compared["kept_overlap"] == 15 / 16 and compared["heads_identical"] == 3 / 4
    assert compared["layers_identical"] == 1 and compared["first_differing_layer"] == 1
    assert compared["layer_overlap"] == [1.0, 0.875] and compared["kept_slots_ours"] == compared["kept_slots_peer"]
    assert compared["needle_kept_ours"] == 0 and compared["needle_kept_peer"] == 1 / 8
    assert compared["prefix_kept_ours"] == 2 and compared["prefix_kept_peer"] == 7 / 4
    assert peers.kept_comparison(ours, ours, (8, 10), (0, 2))["first_differing_layer"] is None

    def row(pair, method, budget, identical, correct, **more):
        return {"pair": pair, "method": method, "budget": budget, "identical": identical, "correct": correct} | more

    rows = [row("KNorm", "snapkv.KNorm", 128, True, True, needle_kept_ours=0.5),
            row("KNorm", "kvpress.KnormPress", 128, True, True, kept_overlap=1.0, heads_identical=1.0,
                needle_kept_peer=0.5),
            row("KNorm", "snapkv.KNorm", 128, False, False, needle_kept_ours=0.1),
            row("KNorm", "kvpress.KnormPress", 128, False, True, kept_overlap=0.5, heads_identical=0.0,
                needle_kept_peer=0.3),
            row("KVzip", "snapkv.KVzip", 256, True, True),
            row("KVzip", "kvpress.KVzipPress", 256, True, True, kept_overlap=0.8),
            row("KVzip", "kvpress.KVzipPress[layerwise=False]", 256, False, False, kept_overlap=0.6)]
    summary = peers.pair_summary(rows)
    assert set(summary) == {"KNorm", "KVzip"}  # pairs without rows are left out
    knorm = summary["KNorm"]["budgets"]["128"]
    assert summary["KNorm"]["peers"] == ["kvpress.KnormPress"] and knorm["prompts"] == 2
    assert knorm["identical"] == {"kvpress.KnormPress": 1}
    assert knorm["value_held"] == {"snapkv.KNorm": 1, "kvpress.KnormPress": 2}
    assert knorm["kept_overlap"] == {"kvpress.KnormPress": 0.75}
    assert knorm["heads_identical"] == {"kvpress.KnormPress": 0.5}
    assert knorm["needle_kept"] == {"snapkv.KNorm": 0.3, "kvpress.KnormPress": 0.4}
    kvzip = summary["KVzip"]
    assert kvzip["peers"] == ["kvpress.KVzipPress", "kvpress.KVzipPress[layerwise=False]"]  # no [whole context] rows
    assert kvzip["budgets"]["256"]["identical"] == {"kvpress.KVzipPress": 1, "kvpress.KVzipPress[layerwise=False]": 0}
    assert kvzip["budgets"]["256"]["needle_kept"]["snapkv.KVzip"] is None
    table = peers.pair_table(summary).splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| KNorm | KnormPress | 128 | 1 / 2 | 1 / 2 | 0.750 |")
    assert "| KVzipPress[layerwise=False] | 256 | 0 / 1 | 1 / 0 | 0.600 | - |" in table[4]
