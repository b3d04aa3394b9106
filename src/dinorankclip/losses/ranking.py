"""Plackett–Luce ranking consistency (METHOD.md §2): ListMLE, RankCLIP (order 1) and the high-order family.

One routine (`_ranking_parts`) computes the CLIP term and the four ranking terms — cross-modal S ranked by Sᵀ and
Sᵀ by S, in-modal G_I ranked by G_T and G_T by G_I — for `rankclip_loss` and for every order of
`HighOrderRankLoss`; an order ≥ 2 only adds transition utilities for the first `window` ranking positions. So
order 1 runs the RankCLIP code path itself and is equal to it bit for bit.

Ties in a reference row (identical captions give identical embeddings, hence equal scores) are ordered by a column
permutation drawn from a generator seeded by (tie_seed, step) on the device of the features: the same on every rank
and on every re-run of that step, so a resumed run is bit-exact, with no host copy per step. ``tie_seed=None``
orders tied columns by their index instead.

Component logging: every loss has a ``*_terms`` companion (`rankclip_terms`, `HighOrderRankLoss.terms`) returning
a `LossTerms` whose ``total`` is what the plain call returns and whose detached ``parts`` are "clip",
"rank_cross", "rank_in" (the unweighted L_cross, L_in) and, for order ≥ 2, "gamma_r" for each transition gate and
"transition_strength_r", std_j(γ_r·φ_r)/std_j(P_j) averaged over the window positions and rows of the four terms:
how much order r moves the utilities against the spread of the first-order scores (on the steps that compute
diagnostics: `dinorankclip.diagnostics`).
"""

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dinorankclip import diagnostics
from dinorankclip.losses.contrastive import (
    LossTerms,
    Scale,
    clip_from_logits,
    clip_loss,
    compute_dtype,
    cross_logits,
    full_precision,
    prepare,
)
from dinorankclip.losses.distributed import LocalBatch

# Maps a reference order π [N, n] and the first-order scores P [N, n] to the utilities P + Σ_r γ_r·φ_r [N, K, n] of
# the first K ≤ n positions.
Context = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# RankCLIP's released list_MLE adds this inside the log; only reproduced on request (`listmle(released_eps=True)`).
_RELEASED_EPS = 1e-10


def tie_permutation(n: int, seed: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tie-breaking column permutation for lists of length n at (seed, step), drawn on `device`.

    Drawn from a private generator (never the global RNG) whose seed hashes (seed, step), so it is the same on
    every rank and every resume, and neighbouring (seed, step) pairs do not alias. The generator lives on `device`
    — the CPU's gives the permutations of earlier versions; a GPU's draws there, so a training step copies nothing
    from the host. A GPU draw depends on the device's generator, so it is the same on every rank and resume of one
    job (same GPU model and torch), not equal to the CPU's.
    """
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    generator = torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randperm(n, generator=generator, device=device)


def _tie_break(n: int, tie_seed: int | None, step: int, device: torch.device) -> torch.Tensor | None:
    """`tie_permutation` on `device` unless tie-breaking by column index was asked for (tie_seed None)."""
    return None if tie_seed is None else tie_permutation(n, tie_seed, step, device)


def reference_order(ref: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """π [N, n]: each row's columns in descending order of ref, without gradient.

    A stable sort of the permuted columns orders equal values by their place in ``perm`` (by column index when
    perm is None); mapping back through perm gives original column indices. perm lives on ref's device.
    """
    ref = ref.detach()
    if perm is None:
        return torch.sort(ref, dim=1, descending=True, stable=True).indices
    return perm[torch.sort(ref[:, perm], dim=1, descending=True, stable=True).indices]


class _PrefixLogSumExpTotal(torch.autograd.Function):
    """Σ_m log Σ_{j≤m} exp(q_j) per row of q [N, n], with a hand-written backward.

    On scores in ascending reference order, prefixes are the Plackett–Luce suffixes, so this is the sum over
    positions of the normaliser terms. Autograd's generic logcumsumexp backward handles arbitrary upstream gradients
    (two extra reverse scans, sign splits); here the upstream gradient is one scalar per row, so the exact
    gradient is g·exp(q_j + log Σ_{m≥j} exp(−L_m)) with L the prefix log-sums — every summand exp(q_j − L_m) ≤ 1,
    so it cannot overflow, and it needs one reverse scan.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor) -> torch.Tensor:
        prefix = q.logcumsumexp(dim=1)
        ctx.save_for_backward(q, prefix)
        return prefix.sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        q, prefix = ctx.saved_tensors
        tail = (-prefix).flip(1).logcumsumexp(dim=1).flip(1)
        return grad.unsqueeze(1) * (q + tail).exp()


def _first_order_nll(ascending: torch.Tensor, released_eps: bool = False) -> torch.Tensor:
    """Per-row Σ_k [log Σ_{m≥k} exp(p_m) − p_k] for scores given in *ascending* reference order, [N].

    Σ_k p_k needs no ordering. ``released_eps`` reproduces RankCLIP's released code instead (row max subtracted,
    eps inside the log), which caps every term whose suffix mass is below eps — for comparison only.
    """
    if released_eps:
        shifted = ascending - ascending.max(dim=1, keepdim=True).values
        return (torch.log(shifted.exp().cumsum(dim=1) + _RELEASED_EPS) - shifted).sum(dim=1)
    return _PrefixLogSumExpTotal.apply(ascending) - ascending.sum(dim=1)


class _WindowedChoiceNLL(torch.autograd.Function):
    """Σ_{k<K} [log Σ_{j not yet placed} exp(u_kj) − u_k,π(k)] per row of utilities u [N, K, n], order π [N, n].

    Fuses the masking of placed items and the softmax-minus-one-hot gradient: only the masked utilities are kept
    for backward (no boolean mask, no scattered one-hot, no separate masked-fill gradient), which roughly halves
    the [N, K, n] traffic and peak memory of the high-order terms. Placed items get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, utility: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        _, window, n = utility.shape
        position = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
        placed = position.unsqueeze(1) < torch.arange(window, device=order.device).view(1, window, 1)
        masked = utility.masked_fill(placed, -math.inf)
        chosen = order[:, :window, None]
        normaliser = torch.logsumexp(masked, dim=2)
        ctx.save_for_backward(masked, normaliser, chosen)
        return (normaliser - masked.gather(2, chosen).squeeze(2)).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        masked, normaliser, chosen = ctx.saved_tensors
        softmax = (masked - normaliser.unsqueeze(2)).exp_()
        softmax.scatter_add_(2, chosen, torch.full(chosen.shape, -1.0, dtype=softmax.dtype, device=softmax.device))
        return softmax.mul_(grad.view(-1, 1, 1)), None


def _plackett_luce_nll(
    pred: torch.Tensor, order: torch.Tensor, context: Context | None = None, released_eps: bool = False
) -> torch.Tensor:
    """Per-row Plackett–Luce NLL of the order π under utilities ``pred``, summed over positions, [N].

    With a context, position k < K uses its utilities u_k(j) = pred_j + φ_k(j) over the items not yet placed —
    teacher forcing on π keeps this O(N·K·n); positions ≥ K keep the first-order terms, whose suffixes involve only
    those positions.
    """
    ascending = pred.gather(1, order.flip(1))
    if context is None:
        return _first_order_nll(ascending, released_eps)
    utility = context(order, pred)
    window, n = utility.shape[1:]
    return _WindowedChoiceNLL.apply(utility, order) + _first_order_nll(ascending[:, : n - window])


def _ranking_parts(
    batch: LocalBatch,
    scale: Scale,
    perm: torch.Tensor | None,
    image_context: Context | None = None,
    text_context: Context | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_CLIP, L_cross, L_in) over this rank's rows; the contexts add transitions over image / text candidates.

    L_cross = ½[listmle(S, Sᵀ) + listmle(Sᵀ, S)]/B and L_in = ½[listmle(G_I, G_T) + listmle(G_T, G_I)]/B, each a
    mean over rows, so a rank's value is its local loss. Rows of S rank texts, rows of Sᵀ and G_I rank images,
    rows of G_T rank texts — hence which context each term gets.
    """
    s_rows, st_rows = cross_logits(batch, scale)
    gi_rows = scale * (batch.image @ batch.all_image.T)
    gt_rows = scale * (batch.text @ batch.all_text.T)

    def term(pred: torch.Tensor, ref: torch.Tensor, context: Context | None) -> torch.Tensor:
        return _plackett_luce_nll(pred, reference_order(ref, perm), context).mean()

    n = batch.num_candidates
    cross = 0.5 * (term(s_rows, st_rows, text_context) + term(st_rows, s_rows, image_context)) / n
    inmodal = 0.5 * (term(gi_rows, gt_rows, image_context) + term(gt_rows, gi_rows, text_context)) / n
    return clip_from_logits(s_rows, st_rows, batch.offset), cross, inmodal


def _rank_loss_terms(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: Scale,
    rank_weight: Scale,
    lambda_cross: float,
    lambda_in: float,
    tie_seed: int | None,
    step: int,
    gather: bool,
    make_context: Callable[[torch.Tensor, Scale], Context] | None = None,
) -> LossTerms:
    """L_CLIP + rank_weight·(λ_c·L_cross + λ_i·L_in); ``make_context`` builds a candidate set's transitions from its
    embeddings and the logit scale."""
    with full_precision(image.device):
        batch, scale = prepare(image, text, scale, gather)
        perm = _tie_break(batch.num_candidates, tie_seed, step, image.device)
        contexts = (None, None)
        if make_context is not None:
            contexts = (make_context(batch.all_image, scale), make_context(batch.all_text, scale))
        clip, cross, inmodal = _ranking_parts(batch, scale, perm, *contexts)
        total = clip + rank_weight * (lambda_cross * cross + lambda_in * inmodal)
        return LossTerms(total, {"clip": clip.detach(), "rank_cross": cross.detach(), "rank_in": inmodal.detach()})


def listmle(
    pred: torch.Tensor,
    ref: torch.Tensor,
    *,
    tie_seed: int | None = 0,
    step: int = 0,
    released_eps: bool = False,
) -> torch.Tensor:
    """Plackett–Luce NLL of ref's descending order under pred, summed over positions, averaged over rows.

    pred, ref: [N, n]. No gradient reaches ref (only its sort order is used, so its scale is irrelevant). Ties in
    ref are ordered by `tie_permutation(n, tie_seed, step)`. Exact likelihood in fp32 (fp64 for fp64 pred) log
    space; ``released_eps=True`` instead reproduces RankCLIP's released eps-in-the-log variant, for comparison.
    """
    with full_precision(pred.device):
        order = reference_order(ref, _tie_break(pred.shape[1], tie_seed, step, pred.device))
        return _plackett_luce_nll(pred.to(compute_dtype(pred)), order, released_eps=released_eps).mean()


def rankclip_terms(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: Scale,
    rank_weight: Scale = 1.0,
    lambda_cross: float = 1 / 16,
    lambda_in: float = 1 / 16,
    *,
    tie_seed: int | None = 0,
    step: int = 0,
    gather: bool = False,
) -> LossTerms:
    """`rankclip_loss` with its parts ("clip", "rank_cross", "rank_in"; detached, unweighted)."""
    return _rank_loss_terms(image, text, scale, rank_weight, lambda_cross, lambda_in, tie_seed, step, gather)


def rankclip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: Scale,
    rank_weight: Scale = 1.0,
    lambda_cross: float = 1 / 16,
    lambda_in: float = 1 / 16,
    *,
    tie_seed: int | None = 0,
    step: int = 0,
    gather: bool = False,
) -> torch.Tensor:
    """RankCLIP: L_CLIP + rank_weight·(λ_c·L_cross + λ_i·L_in), each L the mean of its two listmle directions / B.

    image, text: L2-normalised [B, d]; scale = exp(logit_scale). Pass the training loop's (seed, global step) as
    (tie_seed, step). ``gather=True``: inputs are this rank's features and the result is its local loss (see
    `dinorankclip.losses.distributed`).
    """
    return rankclip_terms(
        image, text, scale, rank_weight, lambda_cross, lambda_in, tie_seed=tie_seed, step=step, gather=gather
    ).total


def _predecessors(order: torch.Tensor, window: int, lag: int, bos_index: int) -> torch.Tensor:
    """π(k − lag) for positions k < window, [N, window]; ``bos_index`` where k − lag < 0."""
    pad = order.new_full((order.shape[0], min(lag, window)), bos_index)
    return torch.cat([pad, order[:, : max(window - lag, 0)]], dim=1)


def _unit_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x [..., h·d_h] with each of its h heads scaled to unit norm (QK-norm)."""
    return F.normalize(x.unflatten(-1, (heads, -1)), dim=-1).flatten(-2)


class _Transition(nn.Module):
    """Weights of one order r ≥ 2: r−1 query factors W_Q, one key W_K (all d → h·d_h), a BOS vector, a gate g_r.

    W_Q, W_K, BOS ~ N(0, 1/d) (METHOD.md §2 [v2]). Queries and keys are normalised per head (after the product of
    the query factors), so φ_r = s·mean_h⟨q̂_h, k̂_h⟩ with the detached logit scale s: |φ_r| ≤ s whatever the norm
    of the weights (weight decay cannot switch an order off), and on random embeddings φ_r/s has std ≈
    1/(√d_h·√h), the order of the logits' own spread. γ_r = tanh(g_r) with g_r = 0: the order starts switched off
    while g_r still receives gradient (once the rank weight is non-zero).
    """

    def __init__(self, order: int, dim: int, width: int) -> None:
        super().__init__()
        std = dim**-0.5
        self.order = order
        self.query = nn.Parameter(torch.randn(order - 1, dim, width) * std)
        self.key = nn.Parameter(torch.randn(dim, width) * std)
        self.bos = nn.Parameter(torch.randn(dim) * std)
        self.gate = nn.Parameter(torch.zeros(()))

    @property
    def gamma(self) -> torch.Tensor:
        return torch.tanh(self.gate)


class _TransitionContext:
    """The transition utilities of every order over one candidate set (items [n, d], the embedding of each column),
    and the strength of each order over the rows it was called on.

    Projects every item (and each BOS) once; per reference order it only gathers the projected queries of the
    realised predecessors and multiplies them with all keys.
    """

    def __init__(self, transitions: nn.ModuleList, items: torch.Tensor, scale: Scale, window: int, heads: int,
                 strength: dict[int, list[torch.Tensor]]) -> None:
        self.n, self.window, self.heads, self.strength = items.shape[0], window, heads, strength
        scale = scale.detach() if isinstance(scale, torch.Tensor) else scale
        self.orders = [t.order for t in transitions]
        self.tables = [torch.cat([items, t.bos.to(items)[None]]) @ t.query.to(items) for t in transitions]
        # γ_r·s/h folded into the unit keys: one matmul per order then gives γ_r·φ_r
        self.keys = [_unit_heads(items @ t.key.to(items), heads) * (torch.tanh(t.gate.to(items)) * scale / heads)
                     for t in transitions]

    def __call__(self, order: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        window = min(self.window, self.n)
        utility = pred.unsqueeze(1).expand(-1, window, -1).clone()
        spread = pred.detach().std(dim=1, keepdim=True) if diagnostics.computed() else None
        for r, table, keys in zip(self.orders, self.tables, self.keys, strict=True):
            query = table[0][_predecessors(order, window, 1, self.n)]
            for lag in range(2, table.shape[0] + 1):
                query = query * table[lag - 1][_predecessors(order, window, lag, self.n)]
            phi = _unit_heads(query, self.heads) @ keys.T
            if spread is not None:
                self.strength[r].append((phi.detach().std(dim=2) / spread).mean())
            utility += phi
        return utility


class HighOrderRankLoss(nn.Module):
    """Order-R Plackett–Luce ranking loss (METHOD.md §2): 0 = CLIP, 1 = RankCLIP, R ≥ 2 adds transition terms.

    At ranking position k < window, candidate j's utility is u_k(j) = P_j + Σ_{r=2..R} γ_r·φ_r(j | π(k−1), …,
    π(k−r+1)), teacher-forced on the reference order π, with φ_r(j | a_1..a_{r−1}) = s·mean_h⟨q̂_h, k̂_h⟩ (QK-norm,
    METHOD.md §2 [v2]): q = ⊙_m W_Q^{r,m} e_{a_m} and k = W_K^r e_j cut into h heads of width d_h, each normalised,
    s the detached logit scale. Averaging per-head dot products of unit vectors equals one dot product over all
    h·d_h coordinates divided by h, which is how it is computed. e_j is the (not detached) embedding of candidate
    j; one set of weights per order serves all four ranking terms.

    Cost per term (N query rows, B candidates): O(N·window·B·(R−1)·h·d_h) time and O(N·window·(B + (R−1)·h·d_h))
    memory — linear in R, never O(B^R): only the realised predecessors are gathered. Nesting: order 1 runs
    `rankclip_loss`'s code path; every R ≥ 2 equals order 1 at initialisation (γ_r = 0) to float tolerance; zero
    gates for r > R′ give order R′.

    Under DDP include this module in the DDP-wrapped model (or all-reduce-mean its gradients) and call with
    ``gather=True`` (see `dinorankclip.losses.distributed`).
    """

    def __init__(
        self,
        order: int,
        dim: int,
        window: int = 32,
        heads: int = 4,
        head_dim: int = 64,
        lambda_cross: float = 1 / 16,
        lambda_in: float = 1 / 16,
    ) -> None:
        super().__init__()
        if order < 0 or window < 1 or heads < 1 or head_dim < 1 or dim < 1:
            raise ValueError(
                f"HighOrderRankLoss needs order >= 0 and positive dim/window/heads/head_dim, got order={order}, "
                f"dim={dim}, window={window}, heads={heads}, head_dim={head_dim}"
            )
        self.order = order
        self.window = window
        self.heads = heads
        self.lambda_cross = lambda_cross
        self.lambda_in = lambda_in
        self.transitions = nn.ModuleList(_Transition(r, dim, heads * head_dim) for r in range(2, order + 1))

    def extra_repr(self) -> str:
        return f"order={self.order}, window={self.window}, lambda_cross={self.lambda_cross}, lambda_in={self.lambda_in}"

    def terms(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: Scale,
        rank_weight: Scale = 1.0,
        *,
        tie_seed: int | None = 0,
        step: int = 0,
        gather: bool = False,
    ) -> LossTerms:
        """The loss with its parts: "clip" (order 0: the only part), "rank_cross", "rank_in", and for r ≥ 2
        "gamma_r" and "transition_strength_r"."""
        if self.order == 0:
            clip = clip_loss(image, text, scale, gather=gather)
            return LossTerms(clip, {"clip": clip.detach()})
        strength: dict[int, list[torch.Tensor]] = {t.order: [] for t in self.transitions}

        def make_context(items: torch.Tensor, scale: Scale) -> Context:
            return _TransitionContext(self.transitions, items, scale, self.window, self.heads, strength)

        result = _rank_loss_terms(image, text, scale, rank_weight, self.lambda_cross, self.lambda_in, tie_seed, step,
                                  gather, make_context if self.transitions else None)
        gammas = {f"gamma_{t.order}": t.gamma.detach() for t in self.transitions}
        strengths = {f"transition_strength_{r}": torch.stack(values).mean() for r, values in strength.items()
                     if values}  # none when the step computes no diagnostics
        return LossTerms(result.total, {**result.parts, **gammas, **strengths})

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: Scale,
        rank_weight: Scale = 1.0,
        *,
        tie_seed: int | None = 0,
        step: int = 0,
        gather: bool = False,
    ) -> torch.Tensor:
        """Total order-R loss. image, text: L2-normalised [B, d] (this rank's [b, d] with ``gather=True``, which
        returns the local loss); scale = exp(logit_scale); (tie_seed, step) seed the tie-break; order 0 ignores
        rank_weight and the tie-break."""
        return self.terms(image, text, scale, rank_weight, tie_seed=tie_seed, step=step, gather=gather).total
