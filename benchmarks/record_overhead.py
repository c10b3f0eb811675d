"""What recording costs: `snapkv.record` around `generate` on SmolLM2-135M-Instruct, on CPU.

1. An ~8K-token prompt (Python standard library source) + 128 generated tokens: plain `generate` vs
   `generate` under `snapkv.record`, alternated side by side, median of `--repeats` runs each, in wall
   time and in process CPU time (split into prefill = the first forward, and decoding = the others);
   the generated tokens must be identical. CPU time is the figure to trust on a shared machine: wall
   time there mostly measures the other processes. `--threads` (default 1) keeps OpenMP from spinning.
   Trace size in bytes vs `estimate_trace_bytes`, and the memory `output_attentions=True` would need
   (layers x heads x n x n x 4 bytes, computed, not run).
2. A 16K-token prompt recorded within max_bytes=4 GiB (chunked prefill, a few new tokens), in a fresh
   process so that its peak memory is its own.

Writes reports/benchmarks/record_overhead.json and .png (reports/ is git-ignored).
Run: python benchmarks/record_overhead.py [--repeats 3] [--out reports/benchmarks]
"""

import argparse
import json
import multiprocessing
import os
import queue as queues
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 4 * 2**30


def stdlib_ids(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens) ids of Python standard library source text (no module headers)."""
    from snapkv.analysis.text import stdlib_source_ids

    return torch.tensor([stdlib_source_ids(tokenizer, tokens, headers=False)])


def trace_bytes(trace) -> int:
    return sum(t.numel() * t.element_size() for t in trace.tensors.values())


def output_attentions_bytes(config, n: int) -> int:
    """What output_attentions=True would hold for one sequence of n tokens: layers x heads x n x n float32."""
    return config.num_hidden_layers * config.num_attention_heads * n * n * 4


def peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ForwardClock:
    """Wall and CPU seconds of every model forward (hooks outside any snapkv hook)."""

    def __init__(self, model):
        self.forwards: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after)]

    def _before(self, module, args):
        self._start = (time.perf_counter(), time.process_time())

    def _after(self, module, args, output):
        self.forwards.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))

    def split(self) -> dict:
        """{"prefill_cpu_s", "decode_cpu_s", "prefill_wall_s", "decode_wall_s"} of the forwards so far."""
        (prefill_wall, prefill_cpu), rest = self.forwards[0], self.forwards[1:]
        self.forwards = []
        return {"prefill_cpu_s": prefill_cpu, "decode_cpu_s": sum(c for _, c in rest),
                "prefill_wall_s": prefill_wall, "decode_wall_s": sum(w for w, _ in rest)}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def overhead_run(prompt_tokens: int, new_tokens: int, repeats: int, window_size: int) -> dict:
    import snapkv
    from snapkv.core.record import estimate_trace_bytes

    model, tokenizer = snapkv.load_model()
    config = model.config
    ids = stdlib_ids(tokenizer, prompt_tokens)
    generate = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    runs = {"plain": [], "record": []}
    sequences, trace = {}, None
    from tqdm.auto import tqdm

    clock = ForwardClock(model)
    order = [("plain", "record") if r % 2 == 0 else ("record", "plain") for r in range(repeats)]
    with tqdm(total=2 * repeats, desc=f"generate {prompt_tokens}+{new_tokens} tokens") as bar:
        for pair in order:
            for mode in pair:
                wall, cpu = time.perf_counter(), time.process_time()
                if mode == "plain":
                    out = model.generate(ids, **generate)
                else:
                    trace = None  # let the previous trace go before recording the next one
                    with snapkv.record(model, window_size=window_size, max_new_tokens=new_tokens) as rec:
                        out = model.generate(ids, **generate)
                    trace = rec.trace
                    del rec
                runs[mode].append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                                   **clock.split()})
                sequences.setdefault(mode, out)
                bar.update()
    clock.remove()
    estimate = estimate_trace_bytes(layers=config.num_hidden_layers, heads=config.num_attention_heads, batch=1,
                                    prompt_length=prompt_tokens, window_size=window_size, generated=new_tokens - 1)
    def median(mode, field):
        return statistics.median(run[field] for run in runs[mode])

    medians = {f"median_{field}_{mode}": median(mode, field) for mode in runs
               for field in ("wall_s", "cpu_s", "prefill_cpu_s", "decode_cpu_s")}
    ratios = {f"ratio_{field}": median("record", field) / median("plain", field)
              for field in ("wall_s", "cpu_s", "prefill_cpu_s", "decode_cpu_s")}
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "window_size": window_size,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "runs_plain": runs["plain"],
        "runs_record": runs["record"],
        **medians,
        **ratios,
        "paired_cpu_ratios": [r["cpu_s"] / p["cpu_s"] for p, r in zip(runs["plain"], runs["record"])],
        "paired_wall_ratios": [r["wall_s"] / p["wall_s"] for p, r in zip(runs["plain"], runs["record"])],
        "tokens_identical": bool(torch.equal(sequences["plain"], sequences["record"])),
        "trace_generated_rows": trace.generated,
        "trace_bytes": trace_bytes(trace),
        "estimate_bytes": estimate["total"],
        "estimate_observation_bytes": estimate["observation"],
        "estimate_generation_bytes": estimate["generation"],
        "output_attentions_bytes": output_attentions_bytes(config, prompt_tokens + new_tokens),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def long_prompt_run(prompt_tokens: int, new_tokens: int, chunk: int, window_size: int, threads: int, queue) -> None:
    """In a fresh process: record a long prompt within the default max_bytes, with chunked prefill."""
    torch.set_num_threads(threads)
    import snapkv
    from snapkv.core.record import estimate_trace_bytes

    model, tokenizer = snapkv.load_model()
    ids = stdlib_ids(tokenizer, prompt_tokens)
    loaded_rss = peak_rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    with snapkv.record(model, window_size=window_size, max_bytes=DEFAULT_MAX_BYTES, max_new_tokens=new_tokens) as rec:
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       prefill_chunk_size=chunk)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    trace, config = rec.trace, model.config
    estimate = estimate_trace_bytes(layers=config.num_hidden_layers, heads=config.num_attention_heads, batch=1,
                                    prompt_length=prompt_tokens, window_size=window_size, generated=new_tokens - 1)
    queue.put({
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_chunk_size": chunk,
        "window_size": window_size,
        "max_bytes": DEFAULT_MAX_BYTES,
        "wall_s": seconds,
        "cpu_s": cpu_seconds,
        "torch_threads": torch.get_num_threads(),
        "trace_prompt_length": trace.prompt_length,
        "trace_generated_rows": trace.generated,
        "trace_bytes": trace_bytes(trace),
        "estimate_bytes": estimate["total"],
        "output_attentions_bytes": output_attentions_bytes(config, prompt_tokens + new_tokens),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_model_load_bytes": loaded_rss,
    })


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    short = results["overhead"]
    times = pd.DataFrame([
        {"mode": mode, "clock": clock, "seconds": run[field]}
        for mode in ("plain", "record") for run in short[f"runs_{mode}"]
        for clock, field in (("wall", "wall_s"), ("CPU", "cpu_s"), ("CPU prefill", "prefill_cpu_s"),
                             ("CPU decoding", "decode_cpu_s"))
    ])
    n = short["prompt_tokens"]
    rows = [
        (f"{n}-token trace (measured)", short["trace_bytes"]),
        (f"{n}-token trace (estimate)", short["estimate_bytes"]),
        (f"{n}-token output_attentions", short["output_attentions_bytes"]),
    ]
    long = results.get("long_prompt")
    if long:
        n = long["prompt_tokens"]
        rows += [(f"{n}-token trace (measured)", long["trace_bytes"]),
                 (f"{n}-token output_attentions", long["output_attentions_bytes"])]
    sizes = pd.DataFrame([{"what": what, "GiB": count / 2**30} for what, count in rows])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    sns.barplot(times, x="clock", y="seconds", hue="mode", ax=left, errorbar=None, estimator="median")
    sns.stripplot(times, x="clock", y="seconds", hue="mode", dodge=True, ax=left, palette="dark:black", size=4,
                  legend=False)
    left.set_title(f"generate {short['prompt_tokens']}+{short['new_tokens']} tokens on CPU, "
                   f"{short['torch_threads']} thread(s)\nrecord / plain: CPU {short['ratio_cpu_s']:.3f}, "
                   f"wall {short['ratio_wall_s']:.2f} (median of {short['repeats']})")
    left.set_xlabel("")
    sns.barplot(sizes, y="what", x="GiB", ax=right, errorbar=None)
    right.set_xscale("log")
    right.axvline(DEFAULT_MAX_BYTES / 2**30, color="red", linestyle="--", label="max_bytes default (4 GiB)")
    right.legend(loc="lower right")
    right.set_title("memory: recorded trace vs output_attentions=True")
    right.set_ylabel("")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` through a temporary file, so the file is whole or absent."""
    from snapkv.core.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def main(argv=None) -> int:
    from snapkv.core.environment import environment
    from snapkv.core.loading import DEFAULT_MODEL_ID

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=8064,
                        help="prompt length (default 8064: prompt + 128 new tokens fit SmolLM2's 8192 context)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window-size", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=16384, help="prompt length of part 2 (0 skips it)")
    parser.add_argument("--long-new-tokens", type=int, default=4)
    parser.add_argument("--long-chunk", type=int, default=2048, help="prefill_chunk_size of part 2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    parser.add_argument("--out", default="reports/benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(model_id=DEFAULT_MODEL_ID, device="cpu"), "config": vars(args)}
    results["overhead"] = overhead_run(args.prompt_tokens, args.new_tokens, args.repeats, args.window_size)
    print(json.dumps(results["overhead"], indent=2))
    write_json(out / "record_overhead.json", results | {"complete": False})  # part 1 survives a failed part 2
    if args.long_tokens:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=long_prompt_run, args=(args.long_tokens, args.long_new_tokens,
                                                              args.long_chunk, args.window_size, args.threads,
                                                              queue))
        child.start()
        while True:
            try:
                results["long_prompt"] = queue.get(timeout=5)
                break
            except queues.Empty:  # still running, unless the child died
                if not child.is_alive():
                    raise RuntimeError(f"the long-prompt run failed (exit code {child.exitcode})") from None
        child.join()
        print(json.dumps(results["long_prompt"], indent=2))
    results["environment"]["loadavg_end"] = os.getloadavg()
    write_json(out / "record_overhead.json", results | {"complete": True})
    plot(results, out / "record_overhead.png")
    print(f"wrote {out / 'record_overhead.json'} and {out / 'record_overhead.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
