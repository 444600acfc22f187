"""Batches of token windows: training batches as a pure function of (seed, step), fixed eval sets.

Training windows start at offsets drawn by ``numpy.random.default_rng([seed, step, micro])``,
so the data of any step is known without replaying the ones before it: a resumed run
sees exactly the batches an uninterrupted run would. Validation and the routing probe
are fixed windows spread evenly over the validation stream (so both domains appear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from routelab.core.errors import InputError


@dataclass
class Batch:
    """``inputs``/``targets`` ``[batch, seq]`` int64 and the domain of every target token."""

    inputs: torch.Tensor
    targets: torch.Tensor
    domains: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())


def windows(tokens: np.ndarray, labels: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """The windows ``tokens[s : s + seq_len + 1]`` as an (inputs, targets) batch."""
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    domains = torch.from_numpy(np.asarray(labels[index[:, 1:]], dtype=np.int64))
    return Batch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(), domains)


def check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if tokens.shape[0] < seq_len + 2:
        raise InputError(
            f"the {split} split has {tokens.shape[0]} tokens, too few for seq_len={seq_len}; "
            "use a larger corpus (or a larger val_fraction) or a shorter seq_len."
        )


class TrainSampler:
    """Random training windows, a deterministic function of ``(seed, step, micro)``."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        check_length(tokens, seq_len, "train")
        self.tokens, self.labels = tokens, labels
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def starts(self, step: int, micro: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, micro])
        return rng.integers(0, self.tokens.shape[0] - self.seq_len - 1, size=self.batch_size)

    def batch(self, step: int, micro: int = 0) -> Batch:
        return windows(self.tokens, self.labels, self.starts(step, micro), self.seq_len)


def spread_starts(num_tokens: int, seq_len: int, num_windows: int) -> np.ndarray:
    """``num_windows`` window starts spread evenly over a stream of ``num_tokens`` tokens."""
    last = num_tokens - seq_len - 1
    num_windows = max(1, min(num_windows, last + 1))
    return np.linspace(0, last, num_windows).round().astype(np.int64)


def eval_batches(tokens: np.ndarray, labels: np.ndarray, seq_len: int, batch_size: int, max_tokens: int) -> list[Batch]:
    """The fixed validation set: about ``max_tokens`` target tokens in windows spread over the split."""
    check_length(tokens, seq_len, "val")
    starts = spread_starts(tokens.shape[0], seq_len, max(1, max_tokens // seq_len))
    return [windows(tokens, labels, starts[i : i + batch_size], seq_len) for i in range(0, len(starts), batch_size)]


def probe_batch(tokens: np.ndarray, labels: np.ndarray, seq_len: int, num_sequences: int) -> Batch:
    """The fixed routing probe: ``num_sequences`` windows spread over the validation split."""
    check_length(tokens, seq_len, "val")
    return windows(tokens, labels, spread_starts(tokens.shape[0], seq_len, num_sequences), seq_len)
