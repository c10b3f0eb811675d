"""benchmarks/speed_memory.py end to end in --quick mode (real model, a few minutes on CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_memory.py"
ROW_FIELDS = {"method", "budget", "prompt_len", "prefill_s", "first_step_s", "decode_ms_per_token",
              "kv_cache_mib", "peak_rss_mib", "chunked"}


@pytest.mark.slow
def test_speed_memory_quick(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    results = json.loads((tmp_path / "speed_memory.json").read_text())
    rows = results["rows"]
    measured = {(row["method"], row["budget"], row["prompt_len"]) for row in rows}
    expected = {("FullCache", None, n) for n in (1024, 2048)} | {
        ("SnapKV", b, n) for n in (1024, 2048) for b in (256, 512)
    }
    assert expected <= measured
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert "error" not in row, row
        assert row["chunked"] is False
        assert row["prefill_s"] > 0 and row["decode_ms_per_token"] > 0 and row["peak_rss_mib"] > 0
    assert {"torch", "transformers", "cpu_count", "threads", "date", "model_id"} <= results["environment"].keys()
    assert results["settings"]["decode_tokens"] == 16

    kv = {(row["method"], row["budget"], row["prompt_len"]): row["kv_cache_mib"] for row in rows}
    for n in (1024, 2048):
        for budget in (256, 512):
            assert kv[("SnapKV", budget, n)] < kv[("FullCache", None, n)]
        assert kv[("SnapKV", 256, n)] < kv[("SnapKV", 512, n)]
    # a compressed cache does not grow with the prompt
    assert kv[("SnapKV", 256, 1024)] == pytest.approx(kv[("SnapKV", 256, 2048)])

    assert (tmp_path / "speed_memory.png").stat().st_size > 0
