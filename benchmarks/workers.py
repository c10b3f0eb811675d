"""How `snapkv reproduce` should use a 2-core CPU: two notebooks side by side on one torch thread each, or one at a
time on two threads.

The unit of work is what the notebooks spend their time on: a greedy answer after a prompt on SmolLM2-135M-Instruct
(one `--length`-token prefill of standard-library source, then `--new-tokens` decoding steps, under
`snapkv.compress` with SnapKV). Two such jobs run either as two processes at once with 1 thread each ("2 workers x
1 thread") or one after the other in one process with 2 threads ("1 worker x 2 threads"); the rounds alternate the
two ways, and each way's best round is kept. The ratio of the two wall times decides `reproduce.default_workers`.

Writes reports/benchmarks/workers.json and .png (reports/ is git-ignored).
Run: python benchmarks/workers.py [--length 2048] [--new-tokens 64] [--rounds 2] [--out reports/benchmarks]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

WAYS = ("2 workers x 1 thread", "1 worker x 2 threads")


def job(length: int, new_tokens: int, threads: int, repeats: int) -> None:
    """`repeats` greedy answers after a `length`-token prompt, on `threads` torch threads (run in a subprocess)."""
    import torch

    import snapkv
    from snapkv.analysis.text import stdlib_source_ids

    torch.set_num_threads(threads)
    model, tokenizer = snapkv.load_model()
    ids = torch.tensor([stdlib_source_ids(tokenizer, length)])
    for _ in range(repeats):
        with torch.no_grad(), snapkv.compress(model, snapkv.SnapKV(max_capacity_prompt=512)):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)


def timed(commands: list[list[str]]) -> float:
    """Wall seconds for `commands` started together, until the last one ends."""
    start = time.perf_counter()
    processes = [subprocess.Popen(command) for command in commands]
    codes = [process.wait() for process in processes]
    if any(codes):
        raise RuntimeError(f"a job failed (exit codes {codes})")
    return time.perf_counter() - start


def plot(result: dict, path: Path) -> None:
    """The best wall time of each way, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best, settings = result["best"], result["settings"]
    fig, ax = plt.subplots(figsize=(6.5, 2.6))
    ax.barh(list(best), list(best.values()), color=["#4c72b0", "#dd8452"])
    for y, value in enumerate(best.values()):
        ax.text(value, y, f" {value:.1f} s", va="center")
    ax.set_xlabel("wall seconds for two greedy answers (best round)")
    ax.set_title(f"Two jobs on this CPU: {settings['length']}-token prompt + {settings['new_tokens']} tokens, "
                 "SmolLM2-135M", fontsize=9)
    ax.set_xlim(0, max(best.values()) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy decoding steps (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best is kept (default 2)")
    parser.add_argument("--out", default="reports/benchmarks", help="output folder")
    parser.add_argument("--job", nargs=3, type=int, help=argparse.SUPPRESS)  # internal: threads repeats _
    args = parser.parse_args()
    if args.job:
        job(args.length, args.new_tokens, args.job[0], args.job[1])
        return
    if args.length < 600 or args.new_tokens < 1 or args.rounds < 1:
        raise ValueError("--length must be at least 600 (above the budget), --new-tokens and --rounds at least 1")

    def command(threads: int, repeats: int) -> list[str]:
        return [sys.executable, __file__, "--length", str(args.length), "--new-tokens", str(args.new_tokens),
                "--job", str(threads), str(repeats), "0"]

    # a load of the model on its own, so both ways start from a converted, cached model
    load = timed([command(1, 0)])
    seconds = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        seconds[WAYS[0]].append(timed([command(1, 1), command(1, 1)]) - load)
        seconds[WAYS[1]].append(timed([command(2, 2)]) - load)
    best = {way: min(times) for way, times in seconds.items()}
    result = {"settings": vars(args) | {"job": None}, "model_load_seconds": load, "seconds": seconds, "best": best,
              "ratio_2x1_to_1x2": best[WAYS[0]] / best[WAYS[1]],
              "faster": min(best, key=best.get)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "workers.json").write_text(json.dumps(result, indent=1) + "\n")

    plot(result, out / "workers.png")
    print(json.dumps({"best": best, "ratio_2x1_to_1x2": result["ratio_2x1_to_1x2"]}, indent=1))


if __name__ == "__main__":
    main()
