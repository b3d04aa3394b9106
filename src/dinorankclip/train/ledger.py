"""What the training steps since the last host sync left on the device: their losses and a non-finite flag.

Reading a device value on the host (`loss.item()`, `bool(torch.isfinite(loss))`) makes the host wait until the GPU
has finished everything queued, so a loop that does it every step never runs ahead of the GPU. Each step instead
appends its global-batch loss and folds "is the loss or the gradient norm non-finite" into a flag, all with device
operations; the loop reads them once per check point (log step, checkpoint step, epoch end) with one copy.

By the time a non-finite step is seen, its update has been applied: AdamW has turned the weights and its moments
into NaN, and every later step is non-finite too. So the first offending step is kept (step, loss, gradient norm)
for the message, and the loop rolls back to its last checkpoint rather than skipping the step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class NonFinite(NamedTuple):
    """The first step since the last check point whose loss or gradient norm was not finite."""

    step: int
    loss: float
    grad_norm: float

    def __str__(self) -> str:
        return f"non-finite loss {self.loss} (gradient norm {self.grad_norm}) at step {self.step}"


class StepLedger:
    """Per-step losses and the first non-finite step since the last `settle`, kept on `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.first = torch.zeros(3, dtype=torch.float64, device=self.device)  # step, loss, grad norm
        self.flag = torch.zeros((), dtype=torch.bool, device=self.device)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Note step `step`'s loss and gradient norm; launches device work only.

        Under DDP pass the loss averaged over ranks: with the gradient norm of DDP's averaged gradients, every rank
        then records the same flag and all of them roll back (or stop) at the same check point."""
        loss, grad_norm = loss.detach().double(), grad_norm.detach().double()
        new = ~(loss.isfinite() & grad_norm.isfinite()) & ~self.flag
        self.first = torch.where(new, torch.stack([loss.new_full((), step), loss, grad_norm]), self.first)
        self.flag = self.flag | new
        self.losses.append(loss)

    def settle(self) -> tuple[list[float], NonFinite | None]:
        """(the recorded losses, the first non-finite step or None), in one device-to-host copy; then empty."""
        if not self.losses:
            return [], None
        *losses, step, loss, grad_norm, flag = torch.cat([torch.stack(self.losses), self.first,
                                                          self.flag.double()[None]]).tolist()
        self.clear()
        return losses, NonFinite(int(step), loss, grad_norm) if flag else None
