"""`dllm-serve` console script.

Each subcommand lives in its own module under `dllm_runtime.commands` exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported lazily so that
`dllm-serve download` does not pay for importing torch or kserve.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, str] = {
    "serve": "Serve a model over the OpenAI API on KServe's ModelServer",
    "generate": "Generate text once from the command line (prints text and decoding statistics)",
    "download": "Download a model from the Hugging Face Hub into a folder (resumable)",
    "conformance": "Replay golden vectors (*_golden.json) and check token-exact agreement",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = argv[0] if argv else None
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command's module is imported
            importlib.import_module(f"dllm_runtime.commands.{name}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(f"dllm_runtime.commands.{args.command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
