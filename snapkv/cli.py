"""The ``snapkv`` command.

Each subcommand is one ``add_<name>_command(subparsers)`` function that declares its arguments and
sets ``handler`` to a function taking the parsed arguments and returning an exit code; to add one,
write such a function and append it to ``COMMANDS``.
"""

import argparse
import ast
import sys


def add_reproduce_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="run every notebook and benchmark, write their outputs and one index.html",
        description="Execute every notebook (sorted by name) with papermill, in the default profile (every figure, "
        "sample counts sized for each headline's precision), --full (paper scale) or --quick (a smoke run); then the "
        "cross-model notebooks again on the other embedded models into --out/models/NAME/ (when their wheels are "
        "installed and --model is not given): 01, 03, 06, 07 on gemma-3-270m and 01, 10 on "
        "qwen2.5-coder-0.5b-instruct (smaller counts) by default, 01, 06, 07, 10, 14 on every model (the 1.5B "
        "too) in --full, everything with --all-models; then 12_across_models, which compares them; then every "
        "benchmark script of the "
        "benchmarks/ folder next to the notebooks. Before it starts it prints each part's expected minutes on a 2-core "
        "CPU; notebooks run --workers at a time. It writes NAME.ipynb, NAME.html, figures/, benchmarks/ and "
        "index.html (every figure, its data, settings and the environment) under --out. Parts that finished "
        "earlier with the same parameters are skipped (--force reruns them); a failing part is reported on the "
        "page and in the exit code (1) without stopping the others.",
    )
    _profile_arguments(parser, quick="a smoke run of tiny prompts, a few minutes (the test suite's)",
                       full="paper-scale sample counts and method grids, meant for a GPU (--device cuda --dtype "
                            "bfloat16); hours on a CPU")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="notebooks run side by side (default: 2 on a CPU of 2 or more cores, each on one torch "
                             "thread; 1 on a GPU)")
    parser.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                        help="model for the notebooks that declare a `model_name` parameter: an embedded model's "
                             "name (e.g. gemma-3-270m), a folder, a .gguf file or a cached hub id (default: their "
                             "own, the embedded SmolLM2-135M-Instruct); choosing one skips the other models' passes")
    parser.add_argument("--all-models", action="store_true",
                        help="run every other model's pass whatever the profile (the Qwen 1.5B runs in --full "
                             "only otherwise; at the default profile's Qwen counts it adds about an hour here)")
    parser.add_argument("--device", default=None,
                        help="device of the notebooks' model, e.g. cuda (default: their own, cpu)")
    parser.add_argument("--dtype", default=None,
                        help="precision of the notebooks' model, e.g. bfloat16 (default: their own, float32)")
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--force", action="store_true", help="rerun parts that already finished")
    parser.add_argument("--notebooks", default="notebooks", help="folder of notebooks (default: notebooks)")
    parser.add_argument("--benchmarks", default=None, metavar="FOLDER",
                        help="folder of benchmark scripts (default: benchmarks/ next to the notebooks folder)")
    parser.add_argument("--no-benchmarks", action="store_true", help="run the notebooks only")
    parser.add_argument(
        "-p", "--parameter", action="append", default=[], metavar="NAME=VALUE", type=_parameter,
        help="extra notebook parameter; VALUE is a Python literal or else a string (repeatable)",
    )
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: python3, this interpreter)")
    parser.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                        help="fail a notebook whose cell runs longer than this (default: no limit)")
    parser.set_defaults(handler=_reproduce)


def _reproduce(args) -> int:
    from pathlib import Path

    from snapkv.analysis.reporting.reproduce import INDEX, default_benchmarks, reproduce

    benchmarks = None
    if args.no_benchmarks:
        benchmarks = []
    elif args.benchmarks is not None:
        benchmarks = default_benchmarks(args.benchmarks)
        if not benchmarks:
            raise ValueError(f"--benchmarks {args.benchmarks!r} holds no known benchmark script "
                             "(speed_memory.py, gpu_scale.py)")
    parts = reproduce(args.out, notebook_dir=args.notebooks, profile=_profile(args), model_name=args.model,
                      device=args.device, dtype=args.dtype, parameters=dict(args.parameter), force=args.force,
                      benchmarks=benchmarks, workers=args.workers, all_models=args.all_models,
                      kernel_name=args.kernel, execution_timeout=args.cell_timeout)
    print(parts[["part", "status", "seconds", "output"]].to_string(index=False))
    print(f"index: {Path(args.out) / INDEX}")
    failed = parts[parts.status == "failed"]
    if len(failed):
        lines = [f"  {row.part}: {row.error}" for row in failed.itertuples()]
        print(f"snapkv reproduce: {len(failed)} of {len(parts)} part(s) failed:\n" + "\n".join(lines),
              file=sys.stderr)
        return 1
    return 0


def _profile_arguments(parser, *, quick: str, full: str) -> None:
    """--quick and --full (one or neither: the default profile, `snapkv.analysis.reporting.setup.PROFILES`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help=f"the quick profile: {quick}")
    group.add_argument("--full", action="store_true", help=f"the full profile: {full}")


def _profile(args) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def _profile_help(kind) -> dict:
    """--quick / --full help texts that list what each profile of the settings dataclass `kind` changes."""
    from snapkv.analysis.reporting.setup import profile_overrides

    def listed(values: dict) -> str:
        return "; ".join(f"{name} {_listed(value) if isinstance(value, tuple) else value}"
                         for name, value in values.items())

    full = kind()
    paper = {name: getattr(full, name) for name in profile_overrides(kind, "default")}
    return dict(quick=f"{listed(profile_overrides(kind, 'quick'))}; options given explicitly still apply",
                full=f"paper scale ({listed(paper)}); options given explicitly still apply")


def _parameter(text: str) -> tuple[str, object]:
    name, separator, value = text.partition("=")
    if not separator or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME a Python identifier, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def add_build_data_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-data", help="regenerate the prompt sets in data/ from the Python standard library",
        description="Build documents.jsonl and chat.jsonl (fixed seeds) with the default model's tokenizer.",
    )
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    parser.set_defaults(handler=_build_data)


def _build_data(args) -> int:
    from snapkv.analysis.text import build_prompt_sets
    from snapkv.core.loading import load_model

    _, tokenizer = load_model()
    for name, path in build_prompt_sets(tokenizer, args.out).items():
        print(f"{name}: {sum(1 for _ in path.open())} records -> {path}")
    return 0


COMMANDS = [add_reproduce_command, add_build_data_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapkv", description="SnapKV prompt KV-cache compression and attention recording toolkit."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (RuntimeError, ValueError) as error:
        print(f"snapkv {args.command}: error: {error}", file=sys.stderr)
        return 1


# -- long-context quality: `snapkv needle` and `snapkv tasks` ---------------------------------------------------


def _comma_list(text, kind, name: str) -> list:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise ValueError(f"--{name} expects a comma-separated list of {kind.__name__}s, got {text!r}") from None


def _given_list(text, kind, name: str) -> tuple | None:
    """A comma-separated option as a tuple; None when it was not given (the settings' default then)."""
    return None if text is None else tuple(_comma_list(text, kind, name))


def _given_one(text, kind, name: str):
    """A one-value option; None when it was not given."""
    if text is None:
        return None
    values = _comma_list(text, kind, name)
    if len(values) != 1:
        raise ValueError(f"--{name} expects one {kind.__name__}, got {text!r}")
    return values[0]


def _listed(values) -> str:
    return ",".join(map(str, values))


def _quality_arguments(parser, what: str, kind) -> None:
    """The options `snapkv needle` and `snapkv tasks` share; their defaults are those of `kind`
    (quality.methods.NeedleSettings or TaskSettings) in the full profile; without --full the default profile's
    values apply, with --quick the quick profile's."""
    import snapkv
    from snapkv.analysis import quality
    from snapkv.analysis.reporting.setup import resolve_settings

    default = resolve_settings(kind, "default")  # what the help calls the default: the default profile's values
    _model_arguments(parser)
    parser.add_argument("--methods", default=None, help=f"comma-separated: {', '.join(snapkv.method_names())} "
                        f"(default: {_listed(default.methods)})")
    parser.add_argument("--budgets", default=None, help=f"comma-separated prompt budgets (default: "
                        f"{_listed(default.budgets)})")
    parser.add_argument("--ablation-budgets", default=None, help=f"budgets of the pooling ablation "
                        f"({', '.join(quality.ABLATION_METHODS)}; default: {_listed(default.ablation_budgets)})")
    parser.add_argument("--lengths", default=None, help=f"comma-separated prompt lengths in tokens (default: "
                        f"{_listed(default.lengths)})")
    parser.add_argument("--samples", default=None, help=f"{what} per length (default: {default.samples})")
    parser.add_argument("--modes", default=None, help=f"comma-separated: {', '.join(quality.MODES)} (default: "
                        f"{_listed(default.modes)})")
    parser.add_argument("--haystack", default=None, help="text file to use as haystack (default: stdlib docstrings)")
    parser.add_argument("--seed", default=None, help=f"seed of the generated prompts (default: {default.seed})")
    parser.add_argument("--prefill-chunk", default=None,
                        help=f"prefill chunk in tokens (default: {quality.DEFAULT_PREFILL_CHUNK})")
    parser.add_argument("--out", default=None, help="output folder (default: reports/quality)")
    _profile_arguments(parser, **_profile_help(kind))
    parser.add_argument("--window-size", default=None, help="observation window of SnapKV, H2O and random eviction "
                        f"(default: {default.window_size}, the paper's needle setting; its LongBench runs use "
                        f"{snapkv.SnapKV.window_size})")
    parser.add_argument("--kernel-size", default=None, help=f"SnapKV pooling kernel (default: {default.kernel_size}; "
                        f"LongBench runs: {snapkv.SnapKV.kernel_size})")


def add_needle_command(subparsers) -> None:
    from snapkv.analysis.quality.methods import NeedleSettings

    parser = subparsers.add_parser(
        "needle", help="needle-in-a-haystack: SnapKV against baselines over context lengths and depths",
        description="Insert a fact at each depth of a haystack at each length, ask for it, score the greedy answer; "
        "every method decodes from one shared prefill per prompt. Writes needle.{csv,json,png,html} (and "
        "needle_pooling.* when the pooling ablation ran) under --out.",
    )
    _quality_arguments(parser, "needles", NeedleSettings)
    parser.add_argument("--depths", default=None, help="comma-separated depths in [0, 1] (default: 0,0.1,...,1)")
    parser.add_argument("--needle-format", default=None, help="number (default) or passphrase")
    parser.set_defaults(handler=_needle)


def add_tasks_command(subparsers) -> None:
    from snapkv.analysis.quality.methods import TaskSettings
    from snapkv.analysis.reporting.setup import resolve_settings

    default = resolve_settings(TaskSettings, "default")
    parser = subparsers.add_parser(
        "tasks", help="RULER-style task suite and next-line code completion: accuracy against budget",
        description="Single/multi-key and multi-value retrieval, variable tracking and code completion at each "
        "length; (task, length) groups the full cache fails (score < --threshold after --calibration-samples "
        "prompts) are dropped. Writes tasks.* and tasks_calibration.* under --out.",
    )
    _quality_arguments(parser, "prompts per task", TaskSettings)
    parser.add_argument("--tasks", default=None, help=f"comma-separated: {', '.join(default.tasks)} (default: all)")
    parser.add_argument("--threshold", default=None,
                        help=f"full-cache score a group needs (default: {default.threshold})")
    parser.add_argument("--calibration-samples", default=None,
                        help=f"prompts per group before deciding (default: {default.calibration_samples})")
    parser.set_defaults(handler=_tasks)


def _quality_settings(args, kind, **given):
    """`kind` (quality.methods.NeedleSettings or TaskSettings) from the options shared by both commands and `given`
    (the command's own), checked before any model is loaded."""
    from snapkv.analysis import quality
    from snapkv.analysis.reporting.reproduce import check_device
    from snapkv.analysis.reporting.setup import resolve_settings
    from snapkv.core import check_int

    settings = resolve_settings(
        kind, _profile(args), methods=_given_list(args.methods, str, "methods"),
        budgets=_given_list(args.budgets, int, "budgets"),
        ablation_budgets=_given_list(args.ablation_budgets, int, "ablation-budgets"),
        lengths=_given_list(args.lengths, int, "lengths"), modes=_given_list(args.modes, str, "modes"),
        samples=_given_one(args.samples, int, "samples"), haystack=args.haystack,
        seed=_given_one(args.seed, int, "seed"), window_size=_given_one(args.window_size, int, "window-size"),
        kernel_size=_given_one(args.kernel_size, int, "kernel-size"), **given)
    quality.check_samples(settings.samples)
    quality.check_lengths(settings.lengths)
    check_int("--seed", settings.seed, 0)
    check_int("--window-size", settings.window_size, 1)
    if check_int("--kernel-size", settings.kernel_size, 1) % 2 == 0:
        raise ValueError(f"--kernel-size must be a positive odd int, got {settings.kernel_size}")
    quality.check_methods(settings.methods, settings.budgets, settings.ablation_budgets,
                          window_size=settings.window_size)
    unknown = [m for m in settings.modes if m not in quality.MODES]
    if unknown or not settings.modes:
        raise ValueError(f"unknown mode(s) {unknown or settings.modes}: choose from {', '.join(quality.MODES)}")
    check_device(args.device, args.dtype)
    return settings


def _prefill_chunk(args, window_size: int) -> int:
    from snapkv.analysis import quality
    from snapkv.core import check_int

    chunk = _given_one(args.prefill_chunk, int, "prefill-chunk")
    return quality.DEFAULT_PREFILL_CHUNK if chunk is None else check_int("--prefill-chunk", chunk, window_size)


def _run_record(args, settings, prefill_chunk: int) -> dict:
    """The settings written next to the results: the experiment's, the model's and the prefill chunk."""
    from dataclasses import asdict

    return asdict(settings) | dict(prefill_chunk_size=prefill_chunk, model=args.model, device=args.device,
                                   dtype=args.dtype, profile=_profile(args))


def _load_for_quality(args, lengths, max_new_tokens: int):
    from snapkv.analysis import quality
    from snapkv.core import loading

    model, tokenizer = loading.load_model(args.model, device=args.device, dtype=args.dtype)
    quality.check_lengths_fit(lengths, model, max_new_tokens)  # before any prefill
    return model, tokenizer


def _needle(args) -> int:
    import time

    import matplotlib

    matplotlib.use("Agg")
    from snapkv.analysis import quality
    from snapkv.analysis.quality import plots as quality_plots
    from snapkv.analysis.quality.ablation import pooling_ablation
    from snapkv.analysis.quality.methods import NeedleSettings
    from snapkv.analysis.reporting.results import save_result
    from snapkv.analysis.text import load_haystack
    from snapkv.core.compat import model_label

    settings = _quality_settings(args, NeedleSettings, depths=_given_list(args.depths, float, "depths"),
                                 needle_format=args.needle_format)
    if not settings.depths or not all(0 <= d <= 1 for d in settings.depths):
        raise ValueError(f"--depths must be fractions in [0, 1], got {args.depths!r}")
    if settings.needle_format not in quality.NEEDLE_FORMATS:
        raise ValueError(f"unknown --needle-format {settings.needle_format!r}: choose from {quality.NEEDLE_FORMATS}")
    prefill_chunk = _prefill_chunk(args, settings.window_size)
    record = _run_record(args, settings, prefill_chunk)
    haystack = load_haystack(settings.haystack)
    quality.check_methods(settings.methods, settings.budgets, settings.ablation_budgets,
                          window_size=settings.window_size)  # before the model loads
    model, tokenizer = _load_for_quality(args, settings.lengths, 12)
    methods = quality.method_grid(settings.methods, settings.budgets, settings.ablation_budgets,
                                  window_size=settings.window_size, kernel_size=settings.kernel_size,
                                  tokenizer=tokenizer)
    start = time.perf_counter()
    prompts = quality.needle_prompts(tokenizer, lengths=settings.lengths, depths=settings.depths,
                                     samples=settings.samples, seed=settings.seed, haystack_text=haystack,
                                     needle_format=settings.needle_format)
    table = quality.evaluate(model, tokenizer, prompts, methods, modes=settings.modes,
                             prefill_chunk_size=prefill_chunk)
    record["seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or "reports/quality"
    caption = f"{model_label(model)}, {len(prompts)} prompts"
    for mode in settings.modes:
        figure, interactive = quality_plots.needle_heatmap_figure(table, caption, mode)
        name = "needle" if mode == settings.modes[0] else f"needle_{mode.replace('-', '_')}"
        paths = save_result(name, table, figure, interactive, record, out, model)
        print(f"{mode}: {paths['png']}")
    ablation = pooling_ablation(table, settings.ablation_budgets, settings.modes[0])
    if ablation is not None:
        rows, summary = ablation
        figure, interactive = quality_plots.pooling_ablation_figure(summary, caption)
        save_result("needle_pooling", rows, figure, interactive, record, out, model)
    means = table.groupby(["mode", "method", "budget"], dropna=False).score.mean().rename("mean score")
    print(means.reset_index().to_string(index=False))
    checks = quality.target_checks(table, mode=settings.modes[0])
    if len(checks):
        print(checks.to_string(index=False))
    print(f"{len(prompts)} prompts in {record['seconds']} s -> {out}")
    return 0


def _tasks(args) -> int:
    import time

    import matplotlib

    matplotlib.use("Agg")
    from snapkv.analysis import quality
    from snapkv.analysis.quality import plots as quality_plots
    from snapkv.analysis.quality.methods import TaskSettings
    from snapkv.analysis.reporting.results import save_result
    from snapkv.analysis.text import load_haystack
    from snapkv.core import check_int
    from snapkv.core.compat import model_label

    settings = _quality_settings(args, TaskSettings, tasks=_given_list(args.tasks, str, "tasks"),
                                 threshold=_given_one(args.threshold, float, "threshold"),
                                 calibration_samples=_given_one(args.calibration_samples, int, "calibration-samples"))
    unknown = [t for t in settings.tasks if t not in quality.TASKS]
    if unknown or not settings.tasks:
        raise ValueError(f"unknown task(s) {unknown or args.tasks!r}: choose from {', '.join(quality.TASKS)}")
    check_int("--calibration-samples", settings.calibration_samples, 1)
    if "full" not in settings.methods:
        raise ValueError("--methods must include full: the suite calibrates on the full cache")
    prefill_chunk = _prefill_chunk(args, settings.window_size)
    record = _run_record(args, settings, prefill_chunk)
    haystack = load_haystack(settings.haystack)
    quality.check_methods(settings.methods, settings.budgets, settings.ablation_budgets,
                          window_size=settings.window_size)  # before the model loads
    model, tokenizer = _load_for_quality(args, settings.lengths, 40)
    methods = quality.method_grid(settings.methods, settings.budgets, settings.ablation_budgets,
                                  window_size=settings.window_size, kernel_size=settings.kernel_size,
                                  tokenizer=tokenizer)
    start = time.perf_counter()
    prompts = quality.task_prompts(tokenizer, tasks=settings.tasks, lengths=settings.lengths,
                                   samples=settings.samples, seed=settings.seed, haystack_text=haystack)
    table, calibration = quality.calibrated_evaluate(
        model, tokenizer, prompts, methods, threshold=settings.threshold,
        calibration_samples=settings.calibration_samples, modes=settings.modes, prefill_chunk_size=prefill_chunk)
    record["seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or "reports/quality"
    caption = f"{model_label(model)}, {len(prompts)} prompts"
    figure, interactive = quality_plots.calibration_figure(calibration, caption, settings.threshold)
    save_result("tasks_calibration", calibration, figure, interactive, record, out, model)
    print(calibration[["task", "length", "full_score", "samples", "reason"]].to_string(index=False))
    if table.empty:
        print(f"the full cache solves no (task, length) group at threshold {settings.threshold}: nothing to compare")
        return 0
    summary = quality.summarize_quality(table)
    retention = quality.retention_table(table, ["mode", "task", "method", "budget"])
    figure, interactive = quality_plots.accuracy_vs_budget_figure(summary, retention, caption)
    paths = save_result("tasks", table, figure, interactive, record, out, model)
    print(summary.to_string(index=False))
    checks = quality.target_checks(suite_table=table, mode=settings.modes[0])
    if len(checks):
        print(checks.to_string(index=False))
    print(f"{len(prompts)} prompts in {record['seconds']} s -> {paths['png']}")
    return 0


COMMANDS += [add_needle_command, add_tasks_command]


# -- `snapkv calibrate`: SnapKV's window, kernel, pooling and GQA per model and budget --------------------------


def add_calibrate_command(subparsers) -> None:
    from snapkv.analysis.quality.calibration import CalibrationSettings
    from snapkv.analysis.reporting.setup import resolve_settings

    default = resolve_settings(CalibrationSettings, "default")
    parser = subparsers.add_parser(
        "calibrate", help="choose SnapKV's window, kernel, pooling and GQA mode for a model and budget",
        description="Try every candidate SnapKV setting on synthetic retrieval prompts (never the needle or task "
        "prompts), rank them by accuracy on what the full cache answers, then by how much of each value they keep, "
        "print the ranking and cache the choice per model and budget under $SNAPKV_CACHE/calibration (default "
        "~/.cache/snapkv/calibration); `snapkv.calibrate(model, tokenizer, budget=...)` reads the same cache.",
    )
    parser.add_argument("--budgets", required=True, help="comma-separated prompt budgets, e.g. 256,1024")
    _model_arguments(parser)
    parser.add_argument("--window-sizes", default=None, help=f"candidate observation windows (default: "
                        f"{_listed(default.window_sizes)})")
    parser.add_argument("--kernel-sizes", default=None, help=f"candidate pooling kernels, odd (default: "
                        f"{_listed(default.kernel_sizes)})")
    parser.add_argument("--poolings", default=None, help=f"candidate poolings (default: {_listed(default.poolings)})")
    parser.add_argument("--gqa", default=None, help=f"candidate GQA aggregations (default: "
                        f"{_listed(default.gqa_modes)})")
    parser.add_argument("--lengths", default=None, help="calibration prompt lengths in tokens (default: 2x and 4x "
                        "the budget, at least 1000 and 2000)")
    parser.add_argument("--samples", default=None, help=f"prompts per length (default: {default.samples})")
    parser.add_argument("--seed", default=None, help=f"seed of the calibration prompts (default: {default.seed})")
    parser.add_argument("--force", action="store_true", help="calibrate again even when a cached result exists")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    _profile_arguments(parser, **_profile_help(CalibrationSettings))
    parser.set_defaults(handler=_calibrate)


def _calibrate(args) -> int:
    from snapkv.analysis.quality.calibration import CalibrationSettings, calibrate, check_settings
    from snapkv.analysis.reporting.reproduce import check_device
    from snapkv.analysis.reporting.setup import resolve_settings
    from snapkv.core import loading

    budgets = _comma_list(args.budgets, int, "budgets")
    if not budgets:
        raise ValueError("--budgets is empty: give at least one budget, e.g. --budgets 256")
    settings = resolve_settings(
        CalibrationSettings, _profile(args), window_sizes=_given_list(args.window_sizes, int, "window-sizes"),
        kernel_sizes=_given_list(args.kernel_sizes, int, "kernel-sizes"),
        poolings=_given_list(args.poolings, str, "poolings"), gqa_modes=_given_list(args.gqa, str, "gqa"),
        lengths=_given_list(args.lengths, int, "lengths"), samples=_given_one(args.samples, int, "samples"),
        seed=_given_one(args.seed, int, "seed"))
    for budget in budgets:
        check_settings(settings, budget)  # every budget, before the model loads
    check_device(args.device, args.dtype)
    model, tokenizer = loading.load_model(args.model, device=args.device, dtype=args.dtype)
    for budget in budgets:
        result = calibrate(model, tokenizer, budget=budget, settings=settings, cache=not args.no_cache,
                           force=args.force)
        p = result.policy
        source = f"cached in {result.path}" if result.cached else (
            f"calibrated in {result.seconds:.1f} s" + (f", cached in {result.path}" if result.path else ""))
        print(f"budget {budget}: SnapKV(window_size={p.window_size}, kernel_size={p.kernel_size}, "
              f"pooling={p.pooling!r}, gqa={p.gqa!r}) - {source}; {result.prompts} prompts of "
              f"{', '.join(map(str, result.lengths))} tokens, full cache accuracy {result.full_accuracy:.2f}")
        print(result.table.to_string(index=False))
    return 0


COMMANDS += [add_calibrate_command]


# -- KV packs: `snapkv pack` and `snapkv ask` ---------------------------------------------------------------------


def _model_arguments(parser) -> None:
    from snapkv.core.loading import DEFAULT_MODEL_ID, EMBEDDED_MODEL_NAMES

    parser.add_argument("--model", default=None, help=f"an embedded model ({', '.join(EMBEDDED_MODEL_NAMES)}), a "
                        f"model folder, .gguf file or cached hub id (default: embedded {DEFAULT_MODEL_ID})")
    parser.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="model precision, e.g. bfloat16 (default: float32)")


def add_pack_command(subparsers) -> None:
    from snapkv import SnapKV

    parser = subparsers.add_parser(
        "pack", help="prefill a document once and save its KV cache, to ask it many questions (snapkv ask)",
        description="Prefill FILE as the start of a one-turn chat (the model's chat template; the plain "
        "Question/Answer format without one) and save its KV cache to --out: the full cache, or with --budget the "
        "cache compressed by --policy (any registered method, e.g. snapkv, knorm, expected-attention, kvzip, "
        "knorm+span; default snapkv) at the end of the document, before any question exists. "
        "`snapkv ask DIR QUESTION` then answers from it without reading the document again.",
    )
    parser.add_argument("file", help="the document: a UTF-8 text file")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the pack to")
    parser.add_argument("--budget", type=int, default=None,
                        help="prompt positions each head keeps, window included (default: keep the full cache, exact)")
    parser.add_argument("--policy", default="snapkv", metavar="NAME",
                        help="the registered method that compresses (snapkv.method_names(); default: snapkv)")
    parser.add_argument("--window-size", type=int, default=SnapKV.window_size,
                        help=f"last document tokens always kept (and SnapKV's observation window; default "
                             f"{SnapKV.window_size})")
    parser.add_argument("--kernel-size", type=int, default=SnapKV.kernel_size,
                        help=f"SnapKV's pooling kernel (default {SnapKV.kernel_size})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pack in --out")
    _model_arguments(parser)
    parser.set_defaults(handler=_pack)


def _pack(args) -> int:
    import time
    from pathlib import Path

    import snapkv
    from snapkv.analysis.quality.packs import document_ids
    from snapkv.analysis.quality.runner import DEFAULT_PREFILL_CHUNK
    from snapkv.analysis.reporting.reproduce import check_device
    from snapkv.core import loading

    path = Path(args.file)
    if not path.is_file():
        raise ValueError(f"no document at {path}: give a text file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty: give a document to pack")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists: pass --overwrite or choose another folder")
    if args.policy not in snapkv.method_names():
        raise ValueError(f"unknown --policy {args.policy!r}: choose from {', '.join(snapkv.method_names())}")
    if args.budget is not None and args.budget <= args.window_size:
        raise ValueError(f"--budget ({args.budget}) must exceed --window-size ({args.window_size}): the budget "
                         "includes the window")
    check_device(args.device, args.dtype)
    model, tokenizer = loading.load_model(args.model, device=args.device, dtype=args.dtype)
    policy = None if args.budget is None else snapkv.method_policy(
        args.policy, args.budget, window_size=args.window_size, kernel_size=args.kernel_size, tokenizer=tokenizer)
    context = document_ids(tokenizer, text)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and context.shape[1] >= limit:
        raise ValueError(f"{path} is {context.shape[1]} tokens, more than the model's context ({limit} positions) "
                         "leaves for a question: pack a shorter document")
    start = time.perf_counter()
    packed = snapkv.pack(model, context, policy, tokenizer=tokenizer, prefill_chunk_size=DEFAULT_PREFILL_CHUNK)
    out = packed.save(args.out, overwrite=args.overwrite)
    print(f"{out}: {packed.context_length} context tokens, {packed.policy!r}, {packed.nbytes / 2**20:.1f} MiB, "
          f"packed in {time.perf_counter() - start:.1f} s")
    return 0


def add_ask_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "ask", help="answer questions from a pack written by snapkv pack",
        description="Load the pack in DIR (with the model it was made with: --model) and answer each QUESTION "
        "greedily, from a copy of the pack: the document is not read again, and the pack never changes.",
    )
    parser.add_argument("pack", metavar="DIR", help="a folder written by snapkv pack")
    parser.add_argument("questions", nargs="+", metavar="QUESTION", help="one or more questions")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer tokens at most (default: 64)")
    _model_arguments(parser)
    parser.set_defaults(handler=_ask)


def _ask(args) -> int:
    from pathlib import Path

    import snapkv
    from snapkv.analysis.quality.packs import question_ids
    from snapkv.analysis.reporting.reproduce import check_device
    from snapkv.core import check_int, loading
    from snapkv.core.pack import read_metadata

    check_int("--max-new-tokens", args.max_new_tokens, 1)
    try:
        read_metadata(Path(args.pack))  # a pack of this format, before the model loads
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    check_device(args.device, args.dtype)
    model, tokenizer = loading.load_model(args.model, device=args.device, dtype=args.dtype)
    packed = snapkv.KVPack.load(args.pack, model, tokenizer)
    for question in args.questions:
        ids = question_ids(tokenizer, question)
        out = packed.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = tokenizer.decode(out[0, packed.context_length + ids.shape[1]:], skip_special_tokens=True)
        print(f"Q: {question}\nA: {answer.strip()}\n")
    return 0


COMMANDS += [add_pack_command, add_ask_command]


if __name__ == "__main__":
    sys.exit(main())
