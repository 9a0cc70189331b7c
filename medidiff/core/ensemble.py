"""Ensembles: N members per item, each from its own derived seed, batched through the network.

A diffusion sample depends on its noise. Running ``n_members`` samples of each of ``n_items`` inputs
gives an ensemble whose centre (mean or median) is a more stable estimate and whose spread (standard
deviation or median absolute deviation) says where the model is unsure: anomaly detection's healthy
reconstructions, segmentation's mask samples (Wolleb et al. 2022, sec. 3), reconstruction's posterior
samples.

- ``member_seed(seed, *parts)``: a well-mixed seed per member, the same on every platform;
- ``run_members(fn, n_items, n_members, ...)``: the ``(item, member)`` jobs in batches of
  ``batch_size``; ``fn`` gets the item indices, member indices and one ``torch.Generator`` per job,
  so every member depends only on ``(seed, stream, member, item)``, never on the batch size;
- ``reduce`` / ``spread``: the centre and the spread over the member axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["REDUCTIONS", "SPREADS", "member_seed", "run_members", "reduce", "spread"]

REDUCTIONS = ("median", "mean")
SPREADS = ("std", "mad")

MemberFn = Callable[[torch.Tensor, torch.Tensor, list[torch.Generator]], torch.Tensor]


def member_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. ``seed, stream, member, item``), the same everywhere."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def run_members(fn: MemberFn, n_items: int, n_members: int, *, seed: int = 0, stream: int = 0,
                batch_size: int = 16, device: torch.device | str = "cpu", progress: bool = False,
                desc: str = "members", jobs: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Run every member of every item, batched, each with its own generator.

    Args:
        fn: ``fn(items, members, generators) -> (len(items), ...)``: items and members are ``(J,)`` long
            tensors of the batch's jobs, ``generators`` one per job, seeded with
            ``member_seed(seed, stream, member, item)``.
        n_items: items (e.g. images).
        n_members: members per item.
        seed: the base seed.
        stream: a further seed part (e.g. a noise level's index), so several ensembles differ.
        batch_size: jobs per call of ``fn``.
        device: where the generators live.
        progress: show a progress bar over the batches.
        desc: its label.
        jobs: the ``(item, member)`` jobs in the order they are run (default: every member of item 0,
            then of item 1...).

    Returns:
        ``(n_members, n_items, ...)``: member ``k`` of item ``i`` at ``[k, i]``.

    Raises:
        ValueError: counts or the batch size are below 1.
    """
    if n_items < 1 or n_members < 1 or batch_size < 1:
        raise ValueError(f"need at least one item, member and job per batch, got {n_items}, {n_members}, "
                         f"{batch_size}")
    order = list(jobs) if jobs is not None else [(i, k) for i in range(n_items) for k in range(n_members)]
    out: torch.Tensor | None = None
    for first in tqdm(range(0, len(order), batch_size), total=math.ceil(len(order) / batch_size), desc=desc,
                      disable=not progress, leave=False):
        batch = order[first:first + batch_size]
        items = torch.tensor([i for i, _ in batch], dtype=torch.long)
        members = torch.tensor([k for _, k in batch], dtype=torch.long)
        gens = [torch.Generator(device=device).manual_seed(member_seed(seed, stream, k, i)) for i, k in batch]
        result = fn(items, members, gens)
        if out is None:
            out = torch.empty((n_members, n_items, *result.shape[1:]), dtype=result.dtype, device=result.device)
        out[members.to(out.device), items.to(out.device)] = result
    return out


def reduce(stack: torch.Tensor, how: str = "median") -> torch.Tensor:
    """The centre of an ensemble over its first axis: ``median`` or ``mean``."""
    if how == "median":
        return stack.quantile(0.5, dim=0) if stack.is_floating_point() else stack.median(dim=0).values
    if how == "mean":
        return stack.mean(dim=0)
    raise ValueError(f"unknown reduction {how!r}; choose one of {REDUCTIONS}")


def spread(stack: torch.Tensor, how: str = "std") -> torch.Tensor:
    """The spread of an ensemble over its first axis: population ``std`` or ``mad`` (median absolute deviation).

    A single member has zero spread.
    """
    if how not in SPREADS:
        raise ValueError(f"unknown spread {how!r}; choose one of {SPREADS}")
    if stack.shape[0] == 1:
        return torch.zeros_like(stack[0])
    if how == "mad":
        return (stack - stack.quantile(0.5, dim=0)).abs().quantile(0.5, dim=0)
    return stack.std(dim=0, correction=0)
