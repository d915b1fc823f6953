"""`python -m dllm_runtime` is `dllm-serve serve` (what a ServingRuntime container runs)."""

import sys

from dllm_runtime.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
