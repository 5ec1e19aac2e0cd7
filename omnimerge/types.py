"""Types shared by the checkpoint layer and the merge methods (neither imports the other for them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """An exact low-rank factorisation of a task vector: ``tau = scale * B @ A`` (B: m x r, A: r x n).

    Given for LoRA inputs, so that spectral methods can take the SVD from the factors (QR of B and A^T, then an
    r x r SVD) instead of from the dense m x n matrix.
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD of ``scale * B @ A`` from the factors: ``U`` m x r, ``S`` r, ``Vh`` r x n (exact)."""
        qb, rb = torch.linalg.qr(self.B)
        qa, ra = torch.linalg.qr(self.A.T)
        core = (rb @ ra.T) * self.scale
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        return qb @ u, s, vh @ qa.T
