"""Local-loss plumbing for batch-spanning losses under DDP (METHOD.md §2, "Distributed (local loss)").

Every loss in this package compares each query (a row) against every candidate of the global batch (the columns).
Under DDP a rank holds only its own b = B/world pairs, so it gathers the candidates from all ranks *with gradient*
and computes only the rows of its own queries, as open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``.
No rank then materialises more than b×B of any matrix: every term of the loss family needs, for a rank's query
rows, only that rank's rows of S, Sᵀ, G_I and G_T (the reference of a row of S is the same row of Sᵀ and vice
versa; the reference of a row of G_I is the same row of G_T), and those are its local features against the
gathered ones.

Normalisation convention: a rank's local loss is the mean over its own rows of the per-row loss (with the lists
still of global length B), so the mean of the local losses over ranks equals the global-batch loss, and the sum of
``local_loss / world`` equals it too. ``all_gather`` with gradient routes every rank's row gradients back to the
owner of each feature (backward sums them across ranks), so the feature gradient a rank holds after backward is
world × the global-batch gradient of its own features; DDP's mean of parameter gradients over ranks then gives
exactly the global-batch gradient. Parameters used directly by the loss (logit scale, transition weights) get the
per-rank gradient of the local loss, and DDP's mean again gives the global one — so those parameters must be
averaged like the model's (register the loss module inside the DDP-wrapped module, or all-reduce-mean its grads).

With no process group (or world size 1) nothing here touches ``torch.distributed`` communication.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    """True only when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 when there is no process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 when there is no process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order), keeping the autograd graph.

    Backward sums the gradients of each slice over ranks and returns it to the rank that owns it. Every rank must
    pass the same shape (use equal per-rank batches, e.g. ``drop_last``). Identity without a process group.
    """
    if not is_distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


@dataclass(frozen=True)
class LocalBatch:
    """One rank's view of the global batch: its query rows and all candidates (the columns).

    image, text: [b, d] this rank's features (the rows it computes); all_image, all_text: [B, d] the global batch
    in rank order, gathered with gradient; offset: global index of this rank's first row, so its positives are
    columns offset .. offset + b − 1. In a single process the rows are the whole batch and offset is 0.
    """

    image: torch.Tensor
    text: torch.Tensor
    all_image: torch.Tensor
    all_text: torch.Tensor
    offset: int

    @property
    def num_candidates(self) -> int:
        """B, the global batch size = the length of every ranked list."""
        return self.all_image.shape[0]


def local_batch(image: torch.Tensor, text: torch.Tensor, gather: bool) -> LocalBatch:
    """Build a rank's `LocalBatch` from its own features; ``gather=False`` treats them as the whole batch.

    With ``gather=True`` and a process group of several ranks the candidates are gathered with gradient and the
    offset is rank × b; otherwise (no group, world 1, or ``gather=False``) rows and candidates are the inputs.
    """
    if not (gather and is_distributed()):
        return LocalBatch(image, text, image, text, 0)
    return LocalBatch(image, text, all_gather_with_grad(image), all_gather_with_grad(text), get_rank() * image.shape[0])


def rank_rows(local: int) -> tuple[int, slice]:
    """(global batch size, this rank's rows of it) for equal per-rank batches of `local` samples: a per-sample
    draw made for the global batch and sliced here is the same draw at any world size."""
    rank, world = get_rank(), get_world_size()
    return local * world, slice(rank * local, (rank + 1) * local)


def step_generator(seed: int, step: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` for the draws of one training step; `stream` keeps different draws independent.

    Drawing on the device of the batch keeps the step free of host copies; the CPU's generator gives the draws of
    earlier versions, a GPU's its own (the same on every rank and resume of one job)."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 101 + stream)
