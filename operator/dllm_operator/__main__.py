"""`python -m dllm_operator [-A | -n NS ...] [--standalone] [--liveness URL] [--verbose]`: kopf's `run`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from kopf.cli import main as kopf_cli

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "run":  # `python -m dllm_operator run ...` reads naturally too
        args = args[1:]
    try:
        kopf_cli.main(["run", "--module", "dllm_operator.handlers", *args], prog_name="python -m dllm_operator")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
