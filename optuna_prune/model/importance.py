"""Per-layer importance from the dense pass: ShortGPT's block influence, BI_i = 1 - cos(h_in, h_out).

A layer that barely turns its input is a cheap one to drop. Computed from the hidden states the
fitness already keeps, so it costs no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from optuna_prune.model.fitness import Fitness


def block_influence(fitness: Fitness) -> list[float]:
    """Mean over calibration tokens of 1 - cos(input, output) of every decoder layer."""
    totals = torch.zeros(fitness.num_layers, dtype=torch.float64)
    count = 0
    for hidden in fitness.dense_hidden_states():
        for i in range(fitness.num_layers):
            cos = F.cosine_similarity(hidden[i].float(), hidden[i + 1].float(), dim=-1)
            totals[i] += (1 - cos).sum().double().cpu()
        count += hidden[0].shape[0] * hidden[0].shape[1]
    return (totals / count).tolist()


def lowest(scores: Sequence[float], k: int, protected: Sequence[int] = ()) -> tuple[int, ...]:
    """The k layers of lowest importance (ShortGPT's choice), never a protected one."""
    order = sorted((i for i in range(len(scores)) if i not in set(protected)), key=lambda i: scores[i])
    if k > len(order):
        raise ValueError(f"cannot choose {k} of {len(order)} unprotected layers")
    return tuple(sorted(order[:k]))
