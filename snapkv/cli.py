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
        description="Execute every notebook (sorted by name) with papermill, then every benchmark script of the "
        "benchmarks/ folder next to the notebooks; write NAME.ipynb, NAME.html, figures/, benchmarks/ and "
        "index.html (every figure, its data, settings and the environment) under --out. Parts that finished "
        "earlier with the same parameters are skipped (--force reruns them); a failing part is reported on the "
        "page and in the exit code (1) without stopping the others.",
    )
    parser.add_argument("--quick", action="store_true", help="small prompts and few tokens: a fast smoke run")
    parser.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                        help="model for the notebooks that declare a `model_name` parameter (default: their own, "
                             "the embedded SmolLM2-135M-Instruct)")
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
    parser.set_defaults(handler=_reproduce)


def _reproduce(args) -> int:
    from pathlib import Path

    from snapkv.analysis.reproduce import INDEX, default_benchmarks, reproduce

    benchmarks = None
    if args.no_benchmarks:
        benchmarks = []
    elif args.benchmarks is not None:
        benchmarks = default_benchmarks(args.benchmarks)
        if not benchmarks:
            raise ValueError(f"--benchmarks {args.benchmarks!r} holds no known benchmark script "
                             "(speed_memory.py, gpu_scale.py)")
    parts = reproduce(args.out, notebook_dir=args.notebooks, quick=args.quick, model_name=args.model,
                      parameters=dict(args.parameter), force=args.force, benchmarks=benchmarks,
                      kernel_name=args.kernel)
    print(parts[["part", "status", "seconds", "output"]].to_string(index=False))
    print(f"index: {Path(args.out) / INDEX}")
    failed = parts[parts.status == "failed"]
    if len(failed):
        lines = [f"  {row.part}: {row.error}" for row in failed.itertuples()]
        print(f"snapkv reproduce: {len(failed)} of {len(parts)} part(s) failed:\n" + "\n".join(lines),
              file=sys.stderr)
        return 1
    return 0


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
    from snapkv.analysis.prompts import build_prompt_sets
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


if __name__ == "__main__":
    sys.exit(main())
