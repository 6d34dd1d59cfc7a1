"""`TokenRows`: a token grid's rows dealt to N ranks, and the token bookkeeping of their gathers.

A diffusion transformer's image tokens are a grid of `rows` x `width` in raster order; rank r
holds the contiguous rows [offset_r, offset_r + count_r) (`exact_rows.split_rows`: the first
`rows % N` ranks get one row more), i.e. a contiguous run of tokens. Gathers need equal shapes,
so each rank pads its tokens to the largest patch's and the receivers drop the padding; when N
divides the rows there is no padding, and padding and joining are views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .exact_rows import split_rows


@dataclass(frozen=True)
class TokenRows:
    """The row patches of a `rows` x `width` token grid over `parts` ranks, seen from `rank`."""

    rows: int
    width: int
    parts: int
    rank: int

    @property
    def counts(self) -> list[int]:
        """Tokens of each rank's patch."""
        return [n * self.width for n in split_rows(self.rows, self.parts)]

    @property
    def offsets(self) -> list[int]:
        """Index of each rank's first token in the whole sequence."""
        counts = self.counts
        return [sum(counts[:r]) for r in range(self.parts)]

    @property
    def largest(self) -> int:
        """Tokens of the largest patch: what every rank sends in a gather."""
        return self.counts[0]

    @property
    def even(self) -> bool:
        return self.rows % self.parts == 0

    def take(self, tokens: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of a whole sequence whose tokens lie along `dim` (a view)."""
        return tokens.narrow(dim, self.offsets[self.rank], self.counts[self.rank])

    def pad(self, mine: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens (along `dim`) padded with zeros to `largest`; itself when no padding is needed."""
        missing = self.largest - mine.shape[dim]
        if missing == 0:
            return mine
        widths = [0, 0] * (mine.ndim - 1 - dim % mine.ndim) + [0, missing]
        return F.pad(mine, widths)

    def join(self, gathered: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's tokens in sequence order, from a gather whose ranks lie along `dim` and
        padded tokens along `dim + 1`; those two dimensions become one (a view for even splits
        of a contiguous gather along its leading dimensions)."""
        if self.even:
            return gathered.flatten(dim, dim + 1)
        parts = [gathered.select(dim, r).narrow(dim, 0, n) for r, n in enumerate(self.counts)]
        return torch.cat(parts, dim)
