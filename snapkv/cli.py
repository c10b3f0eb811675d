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
        help="run every notebook headless and write executed notebooks, HTML and figures",
        description="Execute every notebook (sorted by name) with papermill; write NAME.ipynb, NAME.html "
        "and figures/ under --out.",
    )
    parser.add_argument("--quick", action="store_true", help="small prompts and few tokens: a fast smoke run")
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--notebooks", default="notebooks", help="folder of notebooks (default: notebooks)")
    parser.add_argument(
        "-p", "--parameter", action="append", default=[], metavar="NAME=VALUE", type=_parameter,
        help="extra notebook parameter; VALUE is a Python literal or else a string (repeatable)",
    )
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: python3, this interpreter)")
    parser.set_defaults(handler=_reproduce)


def _reproduce(args) -> int:
    from snapkv.analysis.notebooks import run_notebooks

    runs = run_notebooks(
        args.notebooks, args.out, parameters=dict(args.parameter), quick=args.quick, kernel_name=args.kernel
    )
    print(runs[["notebook", "status", "seconds", "html"]].to_string(index=False))
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
