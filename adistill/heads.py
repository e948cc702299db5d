"""A tenant's head: pooled encoder output -> scores over its own labels, plus an out-of-scope threshold."""

from __future__ import annotations

import torch
from torch import nn

from adistill.encoder import pool


class Head(nn.Module):
    """Linear classifier over the pooled hidden state; `labels[i]` names output i."""

    def __init__(
        self, hidden: int, labels: list[str], pooling: str = "mean", generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a head needs >= 2 distinct labels, got {labels!r}")
        self.labels = list(labels)
        self.pooling = pooling
        self.linear = nn.Linear(hidden, len(labels))
        with torch.no_grad():
            nn.init.normal_(self.linear.weight, std=0.02, generator=generator)
            nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, num_labels) logits."""
        return self.linear(pool(hidden, attention_mask, self.pooling))


def calibrate_threshold(top_prob_in: torch.Tensor, top_prob_oos: torch.Tensor, correct_in: torch.Tensor) -> float:
    """Out-of-scope threshold on the top probability that maximises balanced accuracy on validation data.

    A query is flagged out of scope when its top probability is below the threshold. Balanced accuracy is
    the mean of (in-scope queries answered correctly and not flagged) and (out-of-scope queries flagged).
    """
    candidates = torch.cat([top_prob_in, top_prob_oos, torch.tensor([0.0, 1.0 + 1e-6])]).unique()
    best, best_score = 0.0, -1.0
    for t in candidates.tolist():
        in_ok = ((top_prob_in >= t) & correct_in).float().mean().item()
        oos_ok = (top_prob_oos < t).float().mean().item()
        score = (in_ok + oos_ok) / 2
        if score > best_score:
            best, best_score = t, score
    return float(best)
