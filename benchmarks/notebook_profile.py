"""Where the observation notebooks' time goes: one sample of each experiment in full-mode settings, profiled.

    python benchmarks/notebook_profile.py [--model NAME] [--experiments 01 02 03 04 05] [--out reports/benchmarks]

For each experiment of notebooks 01-05 (`snapkv.analysis.observation.experiments`, their full-mode settings) it
runs the first sample (the first document for 03 and 04) under cProfile and splits its wall time into the parts
that dominate: greedy generation (`model.generate`), the model forwards run while recording (`record_teacher_forced`
minus the recorder's own attention rows) and everything else (metrics, tables). Multiply by the notebook's sample
count for a per-notebook estimate (the samples are the shortest first, so later ones cost more).

Writes <out>/notebook_profile_<model>.json and .png. Measures, asserts nothing.
"""

import argparse
import cProfile
import json
import os
import pstats
import textwrap
import time
from pathlib import Path

PARTS = {  # part: (file suffix, function name) whose cumulative time counts
    "greedy generation": ("generation/utils.py", "generate"),
    "recorded forwards": ("snapkv/core/record.py", "record_teacher_forced"),
    "recorder rows": ("snapkv/core/record.py", "after_attention"),
}


def experiments(model, tokenizer, data_dir: str) -> dict:
    from snapkv.analysis.observation import experiments as E

    chat = E.shortest_records("chat", data_dir, 1)
    documents = E.shortest_records("documents", data_dir, 1)
    windows = E.WindowsAlongPromptSettings()
    return {
        "01": ("hit rate, both protocols, and the sensitivity sweep",
               lambda: E.hit_rate_experiment(model, tokenizer, chat, E.HitRateSettings())),
        "02": ("windows along the prompt", lambda: E.windows_along_prompt_experiment(
            model, tokenizer, E.windows_samples(data_dir, windows)[:1], windows)),
        "03": ("questions, same document", lambda: E.question_overlap_experiment(
            model, tokenizer, documents, E.QuestionOverlapSettings())),
        "04": ("question position", lambda: E.question_position_experiment(
            model, tokenizer, documents, E.QuestionPositionSettings())),
        "05": ("voting variants", lambda: E.voting_variants_experiment(
            model, tokenizer, chat, E.VotingVariantsSettings())),
    }


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(entry[3] for (path, _, function), entry in stats.stats.items()
               if path.endswith(suffix) and function == name)


def profile(run) -> dict:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    run()
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    parts = {part: cumulative(stats, *where) for part, where in PARTS.items()}
    parts["recorded forwards"] -= parts["recorder rows"]
    parts["other"] = max(wall - sum(parts.values()), 0.0)
    return {"wall_s": wall, **{f"{part} s": seconds for part, seconds in parts.items()}}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    frame = pd.DataFrame(rows).set_index("label")
    columns = [f"{part} s" for part in (*PARTS, "other")]
    axis = frame[columns].plot.barh(stacked=True, figsize=(9, 0.6 * len(frame) + 1.5))
    axis.set_xlabel("seconds for one sample (cProfile adds some overhead)")
    axis.set_ylabel("")
    axis.invert_yaxis()
    axis.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    axis.legend(fontsize=8)
    axis.figure.tight_layout()
    axis.figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="an embedded model's name or a path (default: SmolLM2)")
    parser.add_argument("--experiments", nargs="+", default=["01", "02", "03", "04", "05"])
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="reports/benchmarks")
    args = parser.parse_args(argv)

    import torch

    import snapkv
    from snapkv.core.environment import environment

    model, tokenizer = snapkv.load_model(args.model)
    runs = experiments(model, tokenizer, args.data)
    unknown = sorted(set(args.experiments) - set(runs))
    if unknown:
        parser.error(f"unknown experiments {unknown}: choose from {sorted(runs)}")
    rows = []
    for key in args.experiments:
        what, run = runs[key]
        rows.append({"experiment": key, "label": f"{key} {what}", **profile(run)})
        print(json.dumps(rows[-1]), flush=True)
    label = (args.model or "SmolLM2-135M-Instruct").replace("/", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(model) | {"torch_threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()}
    (out / f"notebook_profile_{label}.json").write_text(json.dumps({"rows": rows, "environment": env}, indent=2,
                                                                   default=str) + "\n")
    plot(rows, out / f"notebook_profile_{label}.png",
         f"{label}: one sample per observation experiment, full-mode settings, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
