"""What an evaluation suite in clip-benchmark's webdataset layout must satisfy before a metric is computed from it.

clip-benchmark reads `classnames.txt`, `zeroshot_classification_templates.txt` and the split's tars without
cross-checking them: a class list one line short scores every sample of the missing class as wrong (top-1 on
demo-colour fell from 99.7% to 38.1%, exit 0), a template without `{c}` gives every class the same prompt, and a
retrieval sample without a caption ends in a traceback inside webdataset. These checks read the tar headers and
the small label and caption members (not the images) and raise an InputError naming the file and the sample.
"""

from __future__ import annotations

import re
import tarfile
from collections import defaultdict
from pathlib import Path

from dinorankclip.errors import InputError

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # what clip-benchmark's wds builder decodes
SHOWN = 5  # problems quoted in one error; the rest are counted


def check_class_names(root: Path, classes: list[str] | None) -> None:
    """Class names (`classnames.txt`): present, none blank, none twice."""
    names = root / "classnames.txt"
    if not classes:
        raise InputError(f"{names}: missing or empty; a classification suite needs one class name a line")
    blank = [i + 1 for i, name in enumerate(classes) if not name]
    if blank:
        raise InputError(f"{names}: blank class name on line(s) {blank[:SHOWN]}")
    seen: dict[str, int] = {}
    for i, name in enumerate(classes, 1):
        if name in seen:
            raise InputError(f"{names}: line {i} repeats the class name {name!r} of line {seen[name]}")
        seen[name] = i


def check_templates(root: Path, templates: list[str] | None) -> None:
    """Zero-shot templates: present, each a format string of `{c}` alone."""
    prompts = root / "zeroshot_classification_templates.txt"
    if not templates:
        raise InputError(f"{prompts}: missing or empty; a zero-shot classification suite needs templates with {{c}}")
    for i, template in enumerate(templates, 1):
        try:
            filled = template.format(c="\0")
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(f"{prompts}: line {i} {template!r} is not a format string of {{c}} alone ({err!r})") \
                from None
        if "\0" not in filled:
            raise InputError(f"{prompts}: line {i} {template!r} has no {{c}}: every class would get the same prompt")


def _samples(tar_path: Path) -> dict[str, dict[str, bytes | None]]:
    """{key: {extension: bytes of the label/caption members, None for images}} of one tar, as webdataset groups
    members (key: the file name up to its first dot)."""
    samples: dict[str, dict[str, bytes | None]] = defaultdict(dict)
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = re.fullmatch(r"((?:.*/)?[^./]+)\.([^/]*)", member.name)
                if match is None:
                    continue
                key, ext = match.groups()
                small = ext in ("cls", "txt")
                samples[key][ext.lower()] = tar.extractfile(member).read() if small else None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputError(f"{tar_path}: not a readable tar ({err}); rebuild or re-download the suite") from None
    return samples


def _problem(sample: dict, task: str, num_classes: int | None, names: Path) -> str | None:
    if not any(ext in sample for ext in IMAGE_EXTENSIONS):
        return f"no image ({'/'.join(IMAGE_EXTENSIONS)})"
    if task == "zeroshot_retrieval":
        text = (sample.get("txt") or b"").decode("utf-8", errors="replace")
        return None if any(line.strip() for line in text.splitlines()) else "no caption (txt is missing or blank)"
    raw = sample.get("cls")
    if raw is None:
        return "no label (cls)"
    try:
        label = int(raw.decode().strip())
    except ValueError:
        return f"label {raw[:20]!r} is not an integer"
    if not 0 <= label < num_classes:
        return (f"label {label} is outside the {num_classes} classes of {names} (0..{num_classes - 1}): the class "
                "list is shorter than the labels")
    return None


def check_wds_split(root: Path, split: str, task: str, num_classes: int | None = None) -> int:
    """Every sample of `root/split`'s tars has an image and, for classification (and the linear probe), a label
    in 0..num_classes-1, for retrieval at least one caption line; return the number of samples."""
    nshards_file = root / split / "nshards.txt"
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError:
        raise InputError(f"{nshards_file}: not a shard count") from None
    names, problems, count = root / "classnames.txt", [], 0
    for i in range(nshards):
        tar_path = root / split / f"{i}.tar"
        if not tar_path.is_file():
            raise InputError(f"{tar_path}: missing ({nshards_file} says {nshards} shards)")
        for key, sample in _samples(tar_path).items():
            count += 1
            problem = _problem(sample, task, num_classes, names)
            if problem:
                problems.append(f"{tar_path}: sample {key}: {problem}")
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise InputError(f"evaluation suite {root} ({split}): {len(problems)} bad sample(s):\n  "
                         + "\n  ".join(problems[:SHOWN]) + more)
    if count == 0:
        raise InputError(f"{root / split}: the split holds no samples")
    return count
