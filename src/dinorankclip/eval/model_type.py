"""The `dinorankclip` model type for clip-benchmark: evaluate any exported run, injected students included.

An injected student's image tower is not a stock open_clip tower, so clip-benchmark's `open_clip` type cannot
build it. `register()` adds a `dinorankclip` type to clip-benchmark's registry (the dict and list its CLI reads),
whose loader is `dinorankclip.models.clip.load_local_dir`; the model name is ignored, `pretrained` is the
exported directory. From a shell, `python -m dinorankclip.eval.model_type eval --model_type dinorankclip
--pretrained results/<study>/pretrain/<run>/model ...` takes every option of `clip_benchmark eval`.

Two of the CLI's defaults do not fit an export, so for this type the entry point replaces them unless given:
`--output`, whose default puts `pretrained` into the file name — an export's path, slashes and all, so the write
fails on a directory that does not exist — becomes `{dataset}_<the path, '/' as '_'>_{model}_{language}_{task}.json`
in the current directory; and `--model`, clip-benchmark's `ViT-B-32-quickgelu`, becomes the export's architecture,
which the JSON then records as the evaluate stage does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from clip_benchmark import models as registry

from dinorankclip.models.clip import CONFIG_FILE, arch_of, load_local_dir

MODEL_TYPE = "dinorankclip"


def load_exported(model_name: str, pretrained: str, cache_dir: str | None, device) -> tuple:
    """clip-benchmark's loader signature: (model, transform, tokenizer) of the export in `pretrained`."""
    return load_local_dir(Path(pretrained), device)


def register() -> None:
    """Make `--model_type dinorankclip` known to clip-benchmark (idempotent)."""
    registry.TYPE2FUNC[MODEL_TYPE] = load_exported
    if MODEL_TYPE not in registry.MODEL_TYPES:
        registry.MODEL_TYPES.append(MODEL_TYPE)  # the list object clip_benchmark.cli's --model_type choices hold


def export_output(pretrained: str) -> str:
    """The output template for an export at `pretrained`: its path as one file-name part (braces kept literal)."""
    slug = Path(pretrained).as_posix().strip("/").replace("/", "_").replace("{", "{{").replace("}", "}}")
    return f"{{dataset}}_{slug}_{{model}}_{{language}}_{{task}}.json"


def given(option: str, argv: list[str]) -> bool:
    return any(arg == option or arg.startswith(f"{option}=") for arg in argv)


def main() -> int:
    register()
    from clip_benchmark import cli

    argv, stock_run = sys.argv[1:], cli.run

    def run(args):  # one (model, pretrained, dataset, language) of the CLI's product
        if args.model_type == MODEL_TYPE:
            if not given("--output", argv):
                args.output = export_output(args.pretrained)
            if not given("--model", argv) and (Path(args.pretrained) / CONFIG_FILE).is_file():
                args.model = arch_of(Path(args.pretrained))
        return stock_run(args)

    cli.run = run  # main_eval calls the module's `run` for each evaluation
    sys.argv[0] = "clip_benchmark"
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())
