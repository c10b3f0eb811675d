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
