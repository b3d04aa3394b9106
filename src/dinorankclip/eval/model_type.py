"""The `dinorankclip` model type for clip-benchmark: evaluate any exported run, injected students included.

An injected student's image tower is not a stock open_clip tower, so clip-benchmark's `open_clip` type cannot
build it. `register()` adds a `dinorankclip` type to clip-benchmark's registry (the dict and list its CLI reads),
whose loader is `dinorankclip.models.clip.load_local_dir`; the model name is ignored, `pretrained` is the
exported directory. From a shell, `python -m dinorankclip.eval.model_type eval --model_type dinorankclip
--pretrained results/<study>/pretrain/<run>/model ...` takes every option of `clip_benchmark eval`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from clip_benchmark import models as registry

from dinorankclip.models.clip import load_local_dir

MODEL_TYPE = "dinorankclip"


def load_exported(model_name: str, pretrained: str, cache_dir: str | None, device) -> tuple:
    """clip-benchmark's loader signature: (model, transform, tokenizer) of the export in `pretrained`."""
    return load_local_dir(Path(pretrained), device)


def register() -> None:
    """Make `--model_type dinorankclip` known to clip-benchmark (idempotent)."""
    registry.TYPE2FUNC[MODEL_TYPE] = load_exported
    if MODEL_TYPE not in registry.MODEL_TYPES:
        registry.MODEL_TYPES.append(MODEL_TYPE)  # the list object clip_benchmark.cli's --model_type choices hold


def main() -> int:
    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    sys.argv[0] = "clip_benchmark"
    return clip_benchmark_main() or 0


if __name__ == "__main__":
    sys.exit(main())
