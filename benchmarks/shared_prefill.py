"""What the quality notebooks' shared prefill costs: one prompt prefilled three ways on SmolLM2-135M-Instruct.

`quality.answers_with_shared_prefill` prefills each prompt once under an observing session that keeps what every
method needs: the last window of queries (SnapKV and its successors), and, when H2O is in the grid, the attention
every key receives summed over all prompt queries (`selection.accumulated_attention`, block by block). This times
one prefill of a `--length`-token prompt (Python standard library source, the runner's chunk size) plain, observed
for a window of 32, and observed for H2O, alternated over `--rounds` rounds in one process (best of the rounds).

Writes reports/benchmarks/shared_prefill.json and .png (reports/ is git-ignored).
Run: python benchmarks/shared_prefill.py [--length 8000] [--rounds 1] [--threads 1] [--out reports/benchmarks]
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import snapkv  # noqa: E402
from snapkv import H2O, SnapKV  # noqa: E402
from snapkv.analysis.quality.runner import DEFAULT_PREFILL_CHUNK  # noqa: E402
from snapkv.analysis.text import stdlib_source_ids  # noqa: E402
from snapkv.core.compat import new_cache, prefill  # noqa: E402
from snapkv.core.compress import CompressionSession, attach  # noqa: E402

WINDOW = 32
OBSERVERS = {  # the runner's own observer for a grid without H2O and for one with it
    "plain": None,
    f"observed: last {WINDOW} queries": [SnapKV(window_size=WINDOW)],
    "observed: H2O's accumulated attention": [SnapKV(window_size=WINDOW), H2O(window_size=WINDOW)],
}


def prefill_seconds(model, ids: torch.Tensor, policies) -> float:
    cache = new_cache(model)
    start = time.perf_counter()
    with torch.no_grad():
        if policies is None:
            prefill(model, ids, cache, chunk_size=DEFAULT_PREFILL_CHUNK)
        else:
            with attach(model, CompressionSession.observer(model, policies, DEFAULT_PREFILL_CHUNK)):
                prefill(model, ids, cache, chunk_size=DEFAULT_PREFILL_CHUNK)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8000, help="prompt tokens (default 8000)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best is kept (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="reports/benchmarks", help="output folder")
    args = parser.parse_args()
    if args.length < 2 * WINDOW or args.rounds < 1 or args.threads < 1:
        raise ValueError(f"--length must be at least {2 * WINDOW}, --rounds and --threads at least 1")
    torch.set_num_threads(args.threads)
    model, tokenizer = snapkv.load_model("SmolLM2-135M-Instruct")
    ids = torch.tensor([stdlib_source_ids(tokenizer, args.length, headers=False)])
    times = {name: [] for name in OBSERVERS}
    for _ in range(args.rounds):
        for name, policies in OBSERVERS.items():
            times[name].append(prefill_seconds(model, ids, policies))
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    best = {name: min(values) for name, values in times.items()}
    result = dict(settings=dict(length=args.length, rounds=args.rounds, threads=args.threads,
                                prefill_chunk=DEFAULT_PREFILL_CHUNK, window=WINDOW, torch=torch.__version__),
                  seconds=times, best_seconds=best, ratio_to_plain={n: best[n] / best["plain"] for n in best})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_prefill.json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.barh(list(best), list(best.values()), color=["grey", "tab:blue", "tab:orange"])
    for y, value in enumerate(best.values()):
        ax.text(value, y, f" {value:.0f} s ({value / best['plain']:.2f}x)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title=f"One {args.length}-token prefill, SmolLM2, {args.threads} thread(s)")
    ax.set_xlim(0, max(best.values()) * 1.3)
    fig.tight_layout()
    fig.savefig(out / "shared_prefill.png", dpi=130)
    print(json.dumps(result["ratio_to_plain"], indent=1))


if __name__ == "__main__":
    main()
