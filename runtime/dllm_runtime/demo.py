"""The built-in demo model: a few-million-parameter LLaDA trained on GSM8K (hack/train_demo_model.py).

It ships inside the package so that `dllm-serve serve` / `dllm-serve generate` without `--model`
serve real requests offline on a laptop. It is a normal LLaDA model folder (config.json with
`model_type: llada`, model.safetensors, tokenizer files), loaded by the same code path as any
released checkpoint; see demo_model/README.md for how it was made.
"""

from __future__ import annotations

from pathlib import Path

#: Files that make a usable model folder; checked so a broken install fails with a clear message.
REQUIRED_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class DemoModelMissingError(FileNotFoundError):
    """The demo model folder is absent or incomplete (e.g. a source tree without the committed files)."""


def demo_model_path() -> Path:
    """Folder of the built-in demo model; raises `DemoModelMissingError` naming the missing files."""
    return check_model_folder(Path(__file__).resolve().parent / "demo_model")


def check_model_folder(folder: Path) -> Path:
    """`folder` if it holds every file of `REQUIRED_FILES`, else `DemoModelMissingError`."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise DemoModelMissingError(
            f"built-in demo model is incomplete at {folder} (missing: {', '.join(missing)}); "
            "pass --model /path/to/model or rebuild it with `python hack/train_demo_model.py`"
        )
    return folder
