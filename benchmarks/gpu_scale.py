"""Speed and memory of SnapKV against the full cache at scale, on one GPU: a Llama-3-8B-shaped model.

    python benchmarks/gpu_scale.py [--quick] [--max-length 131072] [--budget 2048] [--batch-sizes 1 2]
                                   [--decode-tokens 64] [--prefill-chunk-size 4096] [--out reports/benchmarks]
    python benchmarks/gpu_scale.py --device cpu --tiny     # a scaled-down model on CPU, for tests

The model has Llama-3-8B's shape (hidden 4096, 32 layers, 32 query heads, 8 KV heads, intermediate 14336,
vocab 128256, rope_theta 500000, 131072 positions) and RANDOM weights in bfloat16: decoding speed and
memory do not depend on the weights' values (the JSON says so under environment.weights), and nothing
has to be downloaded. Prompts are random token ids (fixed seed), likewise.

Prompt lengths start at 4K and double up to --max-length; the doubling stops after the first length at
which SnapKV runs out of memory at every batch size. For every length, batch size and method (FullCache;
SnapKV window 32, kernel 7, maxpool, gqa mean, budget --budget) one measurement
(`snapkv.analysis.speed.decode_speed`): prefill in chunks of --prefill-chunk-size tokens, one step (SnapKV
compresses there), then --decode-tokens greedy steps; decode_ms_per_token is their median, each step
timed between torch.cuda.synchronize() calls; peak_memory_mib is torch.cuda.max_memory_allocated() over
the configuration (reset before it). An out-of-memory error is recorded as status "oom" for its
configuration (and for the same method and batch at longer prompts, without trying) and the run goes on.

Writes <out>/gpu_scale.json (speed_memory.json's schema: complete, settings, environment, rows) and
<out>/gpu_scale.png, and prints one line per configuration as it finishes.
"""

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

from snapkv.analysis.speed.measure import SNAPKV_SETTINGS

DEFAULT_OUT = "reports/benchmarks"
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, rope_theta=500000.0, max_position_embeddings=4096)
FULL = {"start_length": 4096, "max_length": 131072, "budget": 2048, "batch_sizes": [1, 2], "decode_tokens": 64,
        "prefill_chunk_size": 4096}
QUICK = FULL | {"max_length": 16384, "decode_tokens": 16}
TINY_DEFAULTS = {"start_length": 64, "max_length": 128, "budget": 48, "batch_sizes": [1, 2], "decode_tokens": 4,
                 "prefill_chunk_size": 32}
ROW_FIELDS = ("method", "budget", "batch_size", "prompt_len", "prefill_s", "first_step_s", "decode_ms_per_token",
              "kv_cache_mib", "peak_rss_mib", "peak_memory_mib", "chunked", "status")


# -- model and measurements ------------------------------------------------------------------------
def model_config(tiny: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**(TINY if tiny else LLAMA3_8B), attn_implementation="sdpa")


def build_model(config, dtype, device):
    """The model with random weights (seed 0), created directly on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def prompt_lengths(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... up to stop (inclusive)."""
    lengths, n = [], start
    while n <= stop:
        lengths.append(n)
        n *= 2
    return lengths


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, a MemoryError, or an allocator's "out of memory" RuntimeError (CPU)."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def policies(budget: int):
    import snapkv

    return [snapkv.FullCache(), snapkv.SnapKV(max_capacity_prompt=budget, **SNAPKV_SETTINGS)]


def _free_memory(device) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_grid(model, settings: dict, on_row, measure=None) -> list[dict]:
    """Measure every (length, batch, method) of `settings`; `on_row(row)` after each. `measure(model, ids,
    policy, decode_tokens=, prefill_chunk_size=)` defaults to `snapkv.analysis.speed.decode_speed`."""
    import torch

    from snapkv.analysis.speed.measure import decode_speed, method_name

    measure = measure or decode_speed
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    exhausted: set[tuple[str, int]] = set()  # (method, batch) that ran out of memory at a shorter prompt
    rows = []
    for n in prompt_lengths(settings["start_length"], settings["max_length"]):
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=generator)
        snapkv_fits = False
        for batch in settings["batch_sizes"]:
            for policy in policies(settings["budget"]):
                method, budget = method_name(policy)
                base = {"method": method, "budget": budget, "batch_size": batch, "prompt_len": n,
                        "chunked": settings["prefill_chunk_size"] is not None}
                if (method, batch) in exhausted:
                    row = base | {"status": "oom", "error": "not tried: ran out of memory at a shorter prompt"}
                else:
                    try:
                        row = measure(model, ids.expand(batch, -1).to(device), policy,
                                      decode_tokens=settings["decode_tokens"],
                                      prefill_chunk_size=settings["prefill_chunk_size"])
                    except Exception as error:  # noqa: BLE001 (out of memory is a result; anything else too)
                        status = "oom" if is_out_of_memory(error) else "error"
                        row = base | {"status": status, "error": f"{type(error).__name__}: {str(error)[:300]}"}
                        if status == "oom":
                            exhausted.add((method, batch))
                    finally:
                        _free_memory(device)
                if method == "SnapKV" and row.get("status") == "ok":
                    snapkv_fits = True
                row = {field: row.get(field) for field in ROW_FIELDS} | row
                rows.append(row)
                on_row(row)
        if not snapkv_fits:
            break
    return rows


# -- output ----------------------------------------------------------------------------------------
def random_model_environment(model) -> dict:
    """`snapkv.core.environment.environment` of the random-weights model, saying what it is."""
    from snapkv.core.environment import environment

    return environment(
        model,
        model_id="random-weights Llama-3-8B-shaped LlamaConfig" if model.config.hidden_size == 4096
        else "random-weights tiny LlamaConfig",
        model_config={k: getattr(model.config, k, None) for k in LLAMA3_8B if k != "rope_theta"}
        | {"rope_parameters": getattr(model.config, "rope_parameters", None)},
        weights="random (seed 0): speed and memory do not depend on the weights' values",
        prompt="random token ids (seed 0): speed and memory do not depend on the text",
    )


def write_results(out: Path, settings: dict, env: dict, rows: list[dict], complete: bool) -> dict:
    from snapkv.core.files import atomic_write_text

    results = {"complete": complete, "settings": settings, "environment": env, "rows": rows}
    atomic_write_text(out / "gpu_scale.json", json.dumps(results, indent=2, default=str) + "\n")
    return results


def plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(rows)
    frame["config"] = [m if b is None or pd.isna(b) else f"{m} {int(b)}" for m, b in zip(frame.method, frame.budget)]
    frame["series"] = frame["config"] + ", batch " + frame["batch_size"].astype(str)
    ok, oom = frame[frame.status == "ok"], frame[frame.status == "oom"]
    sns.set_theme(style="whitegrid")
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    memory = ("peak_memory_mib", "peak memory allocated (GiB)")
    if "peak_memory_mib" not in ok or ok["peak_memory_mib"].isna().all():  # CPU: no allocator peak
        memory = ("memory_mib", "weights + KV cache (GiB)")
    panels = [("decode_ms_per_token", "decode ms / token (median)"), memory]
    for axis, (column, label) in zip(axes, panels):
        if len(ok) and ok[column].notna().any():
            values = ok.assign(value=ok[column] / (1024 if column.endswith("_mib") else 1))
            sns.lineplot(data=values, x="prompt_len", y="value", hue="config", style="batch_size", markers=True,
                         ax=axis)
        if len(oom):
            top = axis.get_ylim()[1]
            axis.scatter(oom.prompt_len, [top] * len(oom), marker="x", color="#cf222e", label="out of memory")
        axis.set_xscale("log", base=2)
        lengths = sorted(frame.prompt_len.unique())
        axis.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set(xlabel="prompt tokens", ylabel=label)
    if env.get("gpu_memory_gib"):
        axes[1].axhline(env["gpu_memory_gib"], color="black", lw=1, label=f"{env['gpu']} memory")
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(f"{env['model_id']}, {env['dtype']} on {env.get('gpu') or env['device']}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _line(row: dict) -> str:
    what = f"{row['method']:<9} {row['budget'] or '-':>5} batch {row['batch_size']} n={row['prompt_len']:>6}"
    if row["status"] != "ok":
        return f"{what}  {row['status']}: {row.get('error')}"
    peak = row.get("peak_memory_mib")
    peak = "-" if peak is None else f"{peak / 1024:.2f} GiB"
    return (f"{what}  prefill {row['prefill_s']:.2f}s  decode {row['decode_ms_per_token']:.2f} ms/token  "
            f"KV {row['kv_cache_mib']:.1f} MiB  peak {peak}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="prompts up to 16K, 16 decode tokens")
    parser.add_argument("--tiny", action="store_true", help="a scaled-down Llama config (tests, CPU)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default) or float32 (default with --tiny)")
    parser.add_argument("--start-length", type=int)
    parser.add_argument("--max-length", type=int, help="longest prompt (default 131072; 16384 with --quick)")
    parser.add_argument("--budget", type=int, help="SnapKV max_capacity_prompt (default 2048)")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--decode-tokens", type=int, help="timed decoding steps (default 64)")
    parser.add_argument("--prefill-chunk-size", type=int, help="prefill chunk (default 4096)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    defaults = TINY_DEFAULTS if args.tiny else (QUICK if args.quick else FULL)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.budget <= SNAPKV_SETTINGS["window_size"]:
        parser.error(f"--budget must exceed the window size ({SNAPKV_SETTINGS['window_size']}), got {args.budget}")
    if args.start_length < 1 or args.max_length < args.start_length:
        parser.error(f"--max-length ({args.max_length}) must be at least --start-length ({args.start_length})")
    if args.prefill_chunk_size < SNAPKV_SETTINGS["window_size"]:
        parser.error(f"--prefill-chunk-size must be at least the window size ({SNAPKV_SETTINGS['window_size']})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_scale: no CUDA device here; use --device cpu --tiny for a scaled-down run", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    model = build_model(model_config(args.tiny), dtype, args.device)
    settings = {
        "start_length": args.start_length, "max_length": args.max_length, "budget": args.budget,
        "batch_sizes": args.batch_sizes, "decode_tokens": args.decode_tokens,
        "prefill_chunk_size": args.prefill_chunk_size, "snapkv": SNAPKV_SETTINGS, "quick": args.quick,
        "tiny": args.tiny, "greedy": True,
        "measurement": "snapkv.analysis.speed.decode_speed: chunked prefill, one step, then decode_tokens steps; "
                       "decode_ms_per_token = median, each step between torch.cuda.synchronize(); peak_memory_mib = "
                       "torch.cuda.max_memory_allocated over the configuration (None on CPU); status 'oom' when the "
                       "configuration ran out of memory",
    }
    env = random_model_environment(model)
    out = Path(args.out)
    print(f"gpu_scale: {env['model_id']} ({env['parameters'] / 1e9:.2f}B parameters, {env['dtype']}) on "
          f"{env['gpu'] or env['device']}", flush=True)
    rows: list[dict] = []

    def on_row(row):
        print(_line(row), flush=True)
        write_results(out, settings, env, rows, complete=False)

    run_grid(model, settings, lambda row: (rows.append(row), on_row(row)))
    env["total_s"] = time.perf_counter() - started
    write_results(out, settings, env, rows, complete=True)
    plot(rows, env, out / "gpu_scale.png")
    print(f"wrote {out / 'gpu_scale.json'} and {out / 'gpu_scale.png'}")
    return 0 if all(row["status"] in ("ok", "oom") for row in rows) else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
