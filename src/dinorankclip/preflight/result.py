"""One preflight finding (`Check`) and the two ways a user reads them: a table on stdout, and JSON for tools."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("ok", "warn", "fail", "skip")


@dataclass
class Check:
    """What was checked (`name`), how it went, what was found, and for a failure the fix. `device_only` marks what
    only a machine with the study's GPUs can measure (driver, peak memory, projected time); `values` keeps the
    numbers behind `detail` for the JSON."""

    name: str
    status: str
    detail: str
    fix: str = ""
    device_only: bool = False
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Check.status must be one of {STATUSES}, not {self.status!r}")


def failed(checks: list[Check]) -> list[Check]:
    return [check for check in checks if check.status == "fail"]


def as_json(checks: list[Check], **header: Any) -> dict:
    return {**header, "ok": not failed(checks), "checks": [asdict(check) for check in checks]}


def table(checks: list[Check], width: int = 118) -> str:
    """A plain-text table: status, check, what was found; a failure's fix on the line below it."""
    name_width = max(len(check.name) for check in checks) + 2
    lines = []
    for check in checks:
        status = check.status.upper() + (" (device)" if check.device_only else "")
        body = textwrap.wrap(check.detail, width - name_width - 15) or [""]
        lines.append(f"{status:<14} {check.name:<{name_width}}{body[0]}")
        lines += [" " * (15 + name_width) + more for more in body[1:]]
        if check.fix:
            fix = textwrap.wrap(f"fix: {check.fix}", width - name_width - 15)
            lines += [" " * (15 + name_width) + line for line in fix]
    return "\n".join(lines)
