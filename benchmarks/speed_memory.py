"""Speed and memory of SnapKV against the full cache on an embedded model (CPU; default SmolLM2-135M-Instruct).

    python benchmarks/speed_memory.py [--quick] [--lengths 1024 2048 4096 8192] [--long-lengths 16384 32768]
                                      [--budgets 256 512 1024 2048] [--decode-tokens 64] [--out reports/benchmarks]
                                      [--model qwen2.5-coder-1.5b-instruct]

For every prompt length and method (FullCache; SnapKV window 32, kernel 7, maxpool, gqa mean at each
budget below the prompt length) one fresh subprocess loads the model and measures it with the library's
`snapkv.analysis.speed.decode_speed`: it prefills a prompt of real text (`speed.prompt_ids`: the Python
standard library's own source) under `snapkv.compress`, then decodes greedily with a manual loop
`model(next_token, cache=cache)`. It reports

  prefill_s            the prompt forward(s); in one forward SnapKV also selects and gathers each layer's kept
                       positions right after its attention (chunked prefill: at the first step instead)
  first_step_s         the first single-token step
  decode_ms_per_token  median over `--decode-tokens` further steps (wall clock; *_cpu_* is process CPU time)
  kv_cache_mib         keys + values bytes over cache.layers after decoding
  peak_rss_mib         the subprocess's peak resident memory (getrusage), model included

Prompts longer than the model's 8K training context (`--long-lengths`) are prefilled in chunks of
4096 tokens under `snapkv.compress(..., prefill_chunk_size=4096)`; they measure speed, not quality.
Their prefill is the same computation for every method (the engine only records the last window's
queries while prefilling), and it is most of the run time, so one subprocess per long length prefills
all but the last 256 tokens once, then each method continues its own copy of that cache: its
prefill_s is the shared part plus its own last 256 tokens, and its peak_rss_mib is not reported.
The FullCache run at a 1024-token prompt is the "native 1K" reference: the decode speed a cache of
1024 prompt slots allows. kvpress's SnapKVPress is measured at the same cache size when `import
kvpress` works (it needs transformers < 5.3, so it is normally recorded as not installed).

`--record` adds a "record" row at every unchunked length: FullCache under `snapkv.record` (window 32, one
attention row per decoding step), so its compress_overhead / decode_speedup_vs_full columns are what
recording costs (benchmarks/record_overhead.py measures it side by side, with trace sizes).

Peak RSS depends on glibc's allocator: by default its mmap threshold rises as large blocks are freed, so later
prefill temporaries land on the heap and freed ones stay resident. `MALLOC_MMAP_THRESHOLD_=65536 python
benchmarks/speed_memory.py ...` fixes the threshold for the workers (recorded in the JSON's environment): peaks
then follow what is alive, at the cost of a slower prefill (every large temporary is fresh pages).

`--model NAME` measures another embedded model; its files are named speed_memory_NAME.json/.png. Every row
carries `kv_bytes_per_token` (keys + values of one prompt position over every layer: 2 x layers x KV heads x
head_dim x 4 bytes): SmolLM2 (30 layers, 3 KV heads of 64) holds 46 KiB per token, Qwen2.5-Coder-1.5B (28 layers,
2 KV heads of 128, the shape of 7B-class models) 56 KiB.

Writes <out>/speed_memory.json (rows, settings, environment, target ratios at 8K / budget 1024) and
<out>/speed_memory.png. Wall-clock numbers depend on what else the machine runs: the JSON records the
load average before and after every configuration.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from snapkv.analysis.speed.measure import SNAPKV_SETTINGS

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192]
DEFAULT_LONG_LENGTHS = [16384, 32768]
DEFAULT_BUDGETS = [256, 512, 1024, 2048]
DEFAULT_DECODE_TOKENS = 64
QUICK = {"lengths": [1024, 2048], "long_lengths": [], "budgets": [256, 512], "decode_tokens": 16}
DEFAULT_OUT = "reports/benchmarks"

THREADS = 2
PREFILL_CHUNK_SIZE = 4096
WARMUP_TOKENS = 64
NATIVE_REFERENCE_LENGTH = 1024
TARGET = {"prompt_len": 8192, "budget": 1024}
TARGETS = {  # name: (threshold, "min" = the value must be at least it, "max" = at most)
    "decode_speedup_vs_full": (4.0, "min"),
    "decode_vs_native_1k": (0.10, "max"),
    "kv_memory_ratio": (7.5, "min"),
    "prefill_overhead": (0.05, "max"),
}
SHARED_PREFIX_TAIL = 256  # long prompts: tokens each configuration prefills itself after the shared prefix
WORKER_TIMEOUT_S = 3600  # per configuration
ROW_PREFIX = "SPEED_MEMORY_ROW "

ROW_FIELDS = ("method", "budget", "prompt_len", "prefill_s", "first_step_s", "decode_ms_per_token",
              "kv_cache_mib", "peak_rss_mib", "chunked")


# -- configurations ---------------------------------------------------------------------------------
def configurations(lengths, long_lengths, budgets, decode_tokens, kvpress_available, record=False):
    """One dict per measured (method, budget, prompt length), FullCache first at each length."""
    configs = []
    for prompt_len, chunked in [(n, False) for n in lengths] + [(n, True) for n in long_lengths]:
        common = {"prompt_len": prompt_len, "chunked": chunked, "decode_tokens": decode_tokens}
        configs.append({"method": "FullCache", "budget": None, **common})
        if record and not chunked:  # a recorder must see the whole prompt: not the shared-prefix jobs
            configs.append({"method": "record", "budget": None, **common})
        for budget in budgets:
            if budget >= prompt_len:
                continue
            configs.append({"method": "SnapKV", "budget": budget, **common})
            if kvpress_available and not chunked:
                configs.append({"method": "kvpress.SnapKVPress", "budget": budget, **common})
    if not any(c["method"] == "FullCache" and c["prompt_len"] == NATIVE_REFERENCE_LENGTH and not c["chunked"]
               for c in configs):
        configs.insert(0, {"method": "FullCache", "budget": None, "prompt_len": NATIVE_REFERENCE_LENGTH,
                           "chunked": False, "decode_tokens": decode_tokens})
    return configs


def kvpress_status() -> dict:
    """Whether `import kvpress` works here (checked in a subprocess: importing it may fail loudly)."""
    probe = subprocess.run([sys.executable, "-c", "import kvpress; print(getattr(kvpress, '__version__', '?'))"],
                           capture_output=True, text=True, check=False)
    if probe.returncode == 0:
        return {"available": True, "version": probe.stdout.strip()}
    last_line = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
    installed = "No module named 'kvpress'" not in probe.stderr
    return {"available": False, "status": "import failed" if installed else "not installed", "error": last_line}


# -- worker: one configuration in a fresh process ---------------------------------------------------
def _rss_mib() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _policy(config):
    """The configuration's method: a snapkv policy, or kvpress's SnapKVPress at the same cache size."""
    import snapkv

    if config["method"] in ("FullCache", "record"):
        return snapkv.FullCache()
    if config["method"] == "SnapKV":
        return snapkv.SnapKV(max_capacity_prompt=config["budget"], **SNAPKV_SETTINGS)
    if config["method"] == "kvpress.SnapKVPress":
        from kvpress import SnapKVPress

        return SnapKVPress(compression_ratio=1 - config["budget"] / config["prompt_len"],
                           window_size=SNAPKV_SETTINGS["window_size"], kernel_size=SNAPKV_SETTINGS["kernel_size"])
    raise ValueError(f"unknown method {config['method']!r}")


def measure_config(model, ids, config: dict, cache=None) -> dict:
    """`snapkv.analysis.speed.decode_speed` of the configuration (continuing `cache` when given), with the
    configuration's method and budget and this process's peak and current resident memory."""
    from snapkv.analysis.speed.measure import decode_speed

    row = decode_speed(model, ids, _policy(config), decode_tokens=config["decode_tokens"],
                       prefill_chunk_size=PREFILL_CHUNK_SIZE if config["chunked"] else None, cache=cache,
                       record_window=SNAPKV_SETTINGS["window_size"] if config["method"] == "record" else None)
    return row | {"method": config["method"], "budget": config["budget"], "peak_rss_mib": _peak_rss_mib(),
                  "rss_after_decode_mib": _rss_mib()}


def measure(job: dict, emit) -> None:
    """`emit(row)` for each configuration of `job`: a single configuration from an empty cache, or
    (`shared_prefix`) every configuration of one long prompt, each continuing its own copy of one
    shared prefix prefilled in chunks (prefill_s = the shared prefix's time + its own tail's)."""
    import torch
    import transformers

    import snapkv
    from snapkv.analysis.speed.measure import prompt_ids, shared_prefix, warm_up
    from snapkv.core.compat import copy_cache, model_label

    torch.set_num_threads(job.get("threads", THREADS))
    transformers.logging.set_verbosity_error()
    load_before = os.getloadavg()[0]
    model, tokenizer = snapkv.load_model(job.get("model"))
    configs = job["configs"]
    ids = prompt_ids(tokenizer, configs[0]["prompt_len"])

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32 keys + values

    def finish(row):
        row.update(loadavg_before=load_before, loadavg_after=os.getloadavg()[0], model_id=model_label(model),
                   kv_bytes_per_token=per_token)
        emit(row)

    with torch.inference_mode():
        warm_up(model, ids[:, :WARMUP_TOKENS])
        rss_before = _rss_mib()
        if not job["shared_prefix"]:
            (config,) = configs
            finish({**measure_config(model, ids, config), "rss_before_prefill_mib": rss_before})
        else:
            prefix, cost = shared_prefix(model, ids, ids.shape[-1] - SHARED_PREFIX_TAIL,
                                         prefill_chunk_size=PREFILL_CHUNK_SIZE)
            for config in configs:
                row = measure_config(model, ids, config, cache=copy_cache(prefix))
                row.update(prefill_s=row["prefill_s"] + cost["prefix_prefill_s"],
                           prefill_cpu_s=row["prefill_cpu_s"] + cost["prefix_prefill_cpu_s"],
                           prefill_shared_prefix_s=cost["prefix_prefill_s"],
                           shared_prefix_len=cost["shared_prefix_len"],
                           peak_rss_mib=None, peak_rss_all_configs_mib=row["peak_rss_mib"])
                finish(row)
                load_before = os.getloadavg()[0]


def jobs(configs: list[dict]) -> list[dict]:
    """One job per unchunked configuration; one job per long (chunked) prompt length, whose
    configurations share the prefill of everything but the last SHARED_PREFIX_TAIL tokens."""
    result, long = [], {}
    for config in configs:
        if config["chunked"]:
            long.setdefault(config["prompt_len"], []).append(config)
        else:
            result.append({"shared_prefix": False, "configs": [config]})
    return result + [{"shared_prefix": True, "configs": group} for group in long.values()]


def run_worker(job: dict, on_row, threads: int = THREADS, model: str | None = None) -> None:
    """Measure `job` in a fresh subprocess (timings and peak memory belong to it alone) on the embedded `model`
    (None: the default); `on_row(row)` for every row as it arrives, a failed row for every configuration it did
    not report."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker",
               json.dumps({**job, "threads": threads, "model": model})]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    reported = 0
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        deadline = threading.Timer(WORKER_TIMEOUT_S * len(job["configs"]), process.kill)
        deadline.start()
        try:
            for line in process.stdout:
                if line.startswith(ROW_PREFIX):
                    on_row(json.loads(line[len(ROW_PREFIX):]))
                    reported += 1
            status = process.wait()
        finally:
            deadline.cancel()
            if process.poll() is None:  # interrupted: do not leave the worker running
                process.kill()
                process.wait()
        stderr.seek(0)
        tail = (stderr.read().strip().splitlines() or ["no output"])[-1]
    for config in job["configs"][reported:]:
        on_row(_failed_row(config, f"worker exit status {status}: {tail}"))


def _failed_row(config, error):
    row = {field: None for field in ROW_FIELDS}
    row.update(method=config["method"], budget=config["budget"], prompt_len=config["prompt_len"],
               chunked=config["chunked"], error=error)
    return row


# -- results ----------------------------------------------------------------------------------------
def add_relative_columns(rows: list[dict]) -> None:
    """Per compressed row: overhead, speedup and memory ratio against FullCache at the same length."""
    full = {(r["prompt_len"], r["chunked"]): r for r in rows
            if r["method"] == "FullCache" and r.get("prefill_s") is not None}
    for row in rows:
        reference = full.get((row["prompt_len"], row["chunked"]))
        if row["method"] == "FullCache" or reference is None or row.get("prefill_s") is None:
            continue
        time_to_first = row["prefill_s"] + row["first_step_s"]
        reference_time = reference["prefill_s"] + reference["first_step_s"]
        row["compress_overhead"] = time_to_first / reference_time - 1
        # the prefill forward is the same computation for every method: the first step alone carries
        # the compression, without the prefill's run-to-run noise
        row["compress_overhead_first_step"] = (row["first_step_s"] - reference["first_step_s"]) / reference_time
        row["decode_speedup_vs_full"] = reference["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["kv_memory_ratio"] = reference["kv_cache_mib"] / row["kv_cache_mib"]


def target_ratios(rows: list[dict], method: str = "SnapKV") -> dict:
    """The four targets at 8K prompt / budget 1024, each with its threshold and whether it is met."""
    n, budget = TARGET["prompt_len"], TARGET["budget"]
    pick = {(r["method"], r["budget"], r["prompt_len"]): r for r in rows
            if r.get("prefill_s") is not None and not r["chunked"]}
    snap, full = pick.get((method, budget, n)), pick.get(("FullCache", None, n))
    native = pick.get(("FullCache", None, NATIVE_REFERENCE_LENGTH))
    result = {"prompt_len": n, "budget": budget, "method": method}
    if snap is None or full is None:
        result["note"] = f"not measured: needs FullCache and {method} rows at prompt_len {n}, budget {budget}"
        return result
    values = {
        "decode_speedup_vs_full": full["decode_ms_per_token"] / snap["decode_ms_per_token"],
        "decode_vs_native_1k": (snap["decode_ms_per_token"] / native["decode_ms_per_token"] - 1
                                if native else None),
        "kv_memory_ratio": full["kv_cache_mib"] / snap["kv_cache_mib"],
        "prefill_overhead": ((snap["prefill_s"] + snap["first_step_s"])
                             / (full["prefill_s"] + full["first_step_s"]) - 1),
    }
    values_cpu = {
        "decode_speedup_vs_full": full["decode_cpu_ms_per_token"] / snap["decode_cpu_ms_per_token"],
        "decode_vs_native_1k": (snap["decode_cpu_ms_per_token"] / native["decode_cpu_ms_per_token"] - 1
                                if native else None),
        "prefill_overhead": ((snap["prefill_cpu_s"] + snap["first_step_cpu_s"])
                             / (full["prefill_cpu_s"] + full["first_step_cpu_s"]) - 1),
    }
    for name, (threshold, kind) in TARGETS.items():
        value = values[name]
        met = None if value is None else (value >= threshold if kind == "min" else value <= threshold)
        result[name] = {"value": value, "target": threshold, "kind": kind, "met": met,
                        "cpu_time_value": values_cpu.get(name)}
    result["prefill_overhead"]["first_step_only_value"] = (
        (snap["first_step_s"] - full["first_step_s"]) / (full["prefill_s"] + full["first_step_s"]))
    result["rows"] = {"SnapKV": _short(snap), "FullCache": _short(full), "native_1k": _short(native)}
    return result


def _short(row):
    if row is None:
        return None
    return {k: row[k] for k in ("prefill_s", "first_step_s", "decode_ms_per_token", "decode_cpu_ms_per_token",
                                "kv_cache_mib", "peak_rss_mib")}


def plot(rows: list[dict], path: Path, threads: int = THREADS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame([r for r in rows if r.get("decode_ms_per_token") is not None])
    frame["config"] = [m if pd.isna(b) else f"{m} {int(b)}" for m, b in zip(frame["method"], frame["budget"])]
    order = sorted(frame["config"].unique(), key=lambda c: (c != "FullCache", c.split(" ")[0],
                                                           float(c.split(" ")[-1]) if " " in c else 0))
    sns.set_theme(style="whitegrid")
    figure, axes = plt.subplots(1, 3, figsize=(19, 5))
    panels = [("decode_ms_per_token", "decode ms / token (median, log scale)", "log"),
              ("kv_cache_mib", "KV cache MiB after decoding (log scale)", "log"),
              ("peak_rss_mib", "process peak RSS MiB, model included\n(one process per prompt)", "linear")]
    lengths = sorted(frame["prompt_len"].unique())
    frame["peak_rss_mib"] = pd.to_numeric(frame["peak_rss_mib"])  # None for the shared-prefix (chunked) rows
    for axis, (column, label, scale) in zip(axes, panels):
        sns.lineplot(data=frame, x="prompt_len", y=column, hue="config", hue_order=order, marker="o", ax=axis)
        axis.set_xscale("log", base=2)
        axis.set_yscale(scale)
        axis.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xlabel("prompt tokens")
        axis.set_ylabel(label)
        chunked = frame.loc[frame["chunked"], "prompt_len"]
        if len(chunked):
            unchunked = frame.loc[~frame["chunked"], "prompt_len"]
            left = math.sqrt(unchunked.max() * chunked.min()) if len(unchunked) else chunked.min()
            axis.axvspan(left, chunked.max() * 1.2, color="0.9", zorder=0)
            axis.text(left, axis.get_ylim()[1], " chunked prefill\n (beyond 8K training context)",
                      va="top", fontsize=8, color="0.35")
    native = frame[(frame["method"] == "FullCache") & (frame["prompt_len"] == NATIVE_REFERENCE_LENGTH)]
    if len(native):
        axes[0].axhline(float(native["decode_ms_per_token"].iloc[0]), ls=":", color="0.3", lw=1,
                        label=f"native {NATIVE_REFERENCE_LENGTH} prompt")
        axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    figure.suptitle("SnapKV vs full cache, SmolLM2-135M-Instruct, CPU "
                    f"({threads} threads, float32, batch 1)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summary_table(rows: list[dict]) -> str:
    header = (f"{'method':<22}{'budget':>7}{'prompt':>7}{'prefill_s':>10}{'first_s':>9}{'ms/tok':>9}"
              f"{'cpu ms/tok':>11}{'KV MiB':>9}{'peak MiB':>10}{'overhead':>10}{'speedup':>9}")
    lines = [header]
    for r in rows:
        if r.get("prefill_s") is None:
            lines.append(f"{r['method']:<22}{r['budget']!s:>7}{r['prompt_len']:>7}  failed: {r.get('error')}")
            continue
        overhead = f"{100 * r['compress_overhead']:+.1f}%" if "compress_overhead" in r else ""
        speedup = f"{r['decode_speedup_vs_full']:.2f}x" if "decode_speedup_vs_full" in r else ""
        peak = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(
            f"{r['method']:<22}{r['budget'] or '-'!s:>7}{r['prompt_len']:>7}{r['prefill_s']:>10.2f}"
            f"{r['first_step_s']:>9.3f}{r['decode_ms_per_token']:>9.1f}{r['decode_cpu_ms_per_token']:>11.1f}"
            f"{r['kv_cache_mib']:>9.1f}{peak:>10}{overhead:>10}{speedup:>9}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1K and 2K prompts, budgets 256 and 512, 16 decode tokens (for tests)")
    parser.add_argument("--lengths", type=int, nargs="*", help=f"prompt lengths (default {DEFAULT_LENGTHS})")
    parser.add_argument("--long-lengths", type=int, nargs="*",
                        help=f"prompt lengths prefilled in chunks of {PREFILL_CHUNK_SIZE}, speed only "
                             f"(default {DEFAULT_LONG_LENGTHS})")
    parser.add_argument("--budgets", type=int, nargs="*", help=f"SnapKV budgets (default {DEFAULT_BUDGETS})")
    parser.add_argument("--decode-tokens", type=int, help=f"timed decoding steps (default {DEFAULT_DECODE_TOKENS})")
    parser.add_argument("--record", action="store_true",
                        help="also measure FullCache under snapkv.record at every unchunked length")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch threads per measurement (default {THREADS})")
    parser.add_argument("--model", default=None,
                        help="an embedded model's name (default: SmolLM2-135M-Instruct); the output files carry it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one configuration as JSON
    args = parser.parse_args(argv)
    if args.model is not None:
        from snapkv.core.loading import EMBEDDED_MODEL_NAMES

        if args.model not in EMBEDDED_MODEL_NAMES:
            parser.error(f"--model must be an embedded model ({', '.join(EMBEDDED_MODEL_NAMES)}), got {args.model!r}")
    defaults = QUICK if args.quick else {"lengths": DEFAULT_LENGTHS, "long_lengths": DEFAULT_LONG_LENGTHS,
                                         "budgets": DEFAULT_BUDGETS, "decode_tokens": DEFAULT_DECODE_TOKENS}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("lengths", "long_lengths", "budgets"):
        bad = [v for v in getattr(args, name) if v <= SNAPKV_SETTINGS["window_size"]]
        if bad:
            parser.error(f"--{name.replace('_', '-')} values must exceed the window size "
                         f"({SNAPKV_SETTINGS['window_size']}), got {bad}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.decode_tokens < 1:
        parser.error(f"--decode-tokens must be at least 1, got {args.decode_tokens}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        measure(json.loads(args.worker), lambda row: print(ROW_PREFIX + json.dumps(row), flush=True))
        return 0

    from tqdm.auto import tqdm

    from snapkv.core.environment import environment
    from snapkv.core.loading import DEFAULT_MODEL_ID

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kvpress = kvpress_status()
    env = environment(model_id=args.model or DEFAULT_MODEL_ID, device="cpu", dtype="float32",
                      torch_threads=args.threads,
                      kvpress=kvpress, malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    configs = configurations(args.lengths, args.long_lengths, args.budgets, args.decode_tokens,
                             kvpress["available"], record=args.record)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    rows = []
    started = time.perf_counter()
    with tqdm(total=len(configs), desc="speed/memory", unit="config") as progress:

        def on_row(row):
            rows.append(row)
            progress.update()
            write_results(out, args, env, rows, complete=False)  # partial results survive an interruption

        for job in jobs(configs):
            first = job["configs"][0]
            progress.set_postfix_str(f"n={first['prompt_len']} {first['method']} {first['budget'] or ''}".strip())
            run_worker(job, on_row, args.threads, args.model)
    env["loadavg_end"] = os.getloadavg()
    env["total_s"] = time.perf_counter() - started
    results = write_results(out, args, env, rows, complete=True)
    plot(rows, out / f"{output_name(args.model)}.png", args.threads)
    print(summary_table(rows))
    print(json.dumps(results["targets"], indent=2))
    print(f"wrote {out / output_name(args.model)}.json and .png")
    return 0 if all(r.get("prefill_s") is not None for r in rows) else 1


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def output_name(model: str | None) -> str:
    """speed_memory (the default model) or speed_memory_NAME."""
    return "speed_memory" if model is None else f"speed_memory_{model}"


def write_results(out: Path, args, env: dict, rows: list[dict], complete: bool) -> dict:
    """Write <out>/speed_memory.json (atomically) and return what it holds."""
    from snapkv.analysis.text import SOURCE_MODULES
    from snapkv.core.files import atomic_write_text

    add_relative_columns(rows)
    results = {
        "complete": complete,
        "settings": {
            "lengths": args.lengths, "long_lengths": args.long_lengths, "budgets": args.budgets,
            "decode_tokens": args.decode_tokens, "quick": args.quick, "prefill_chunk_size": PREFILL_CHUNK_SIZE,
            "snapkv": SNAPKV_SETTINGS, "threads": args.threads, "model": args.model, "batch_size": 1, "greedy": True,
            "prompt": "Python standard library source (snapkv.analysis.speed.prompt_ids), modules: "
                      + ", ".join(SOURCE_MODULES),
            "native_reference": f"FullCache after a native {NATIVE_REFERENCE_LENGTH}-token prompt",
            "measurement": "one fresh subprocess per configuration; decode_ms_per_token is the median "
                           "wall time of the steps after the first; *_cpu_* columns are process CPU time",
            "long_prompts": f"one subprocess per long length: all but the last {SHARED_PREFIX_TAIL} tokens "
                            "prefilled once (chunked) and copied for every method; prefill_s = shared part "
                            "+ the method's own tail; peak_rss_mib not reported (shared process)",
            "targets": {name: {"target": t, "kind": k} for name, (t, k) in TARGETS.items()},
        },
        "environment": env,
        "rows": rows,
        "targets": {"SnapKV": target_ratios(rows)},
    }
    if env["kvpress"]["available"]:
        results["targets"]["kvpress.SnapKVPress"] = target_ratios(rows, "kvpress.SnapKVPress")
    atomic_write_text(out / f"{output_name(args.model)}.json", json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
