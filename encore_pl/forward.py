"""Generic forward-pass helpers: token rows padded into a batch (`pad_right`, `pad_left`), a forward
pass ended early by a hook (`StopForward`, `run_to_stop`), a decoder block's hidden state
(`block_output`), and stand-ins for blocks whose output is known (`Replay`, `replayed`).
"""

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .layouts import LocatedModel


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every needed layer has run."""


def pad_right(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [len(seqs), longest] padded on the right with `pad_id`, and the attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")  # built on the host, moved once
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device="cpu")
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_left(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """As `pad_right`, padded on the left (for generation: every row's next token is at the end).
    Empty rows (and no rows) are allowed: all padding."""
    width = max([len(s) for s in seqs] + [0])
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long, device="cpu")
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def block_output(output) -> torch.Tensor:
    """The hidden state of a decoder block's output (a tensor, or a tuple holding it first)."""
    return output[0] if isinstance(output, tuple) else output


def run_to_stop(lm: LocatedModel, **inputs) -> None:
    """Run the model's body (no head, no cache) until a hook raises StopForward."""
    try:
        lm.model.base_model(**inputs, use_cache=False)
    except StopForward:
        pass


class Replay(nn.Module):
    """Stands in for a decoder block whose result is known: returns `output`, or its input if None."""

    def __init__(self, arity: int, output: Optional[torch.Tensor] = None):
        super().__init__()
        self.arity = arity  # the real block returns a tuple of this length (0: a bare tensor)
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.output is None else self.output
        return (out,) + (None,) * (self.arity - 1) if self.arity else out


@contextmanager
def replayed(lm: LocatedModel, upto: int, arity: int, output: Optional[torch.Tensor] = None):
    """Blocks 0..upto replaced by stand-ins (block `upto`'s returns `output`); yields that stand-in."""
    originals = [lm.blocks[i] for i in range(upto + 1)]
    stand_ins = [Replay(arity) for _ in originals]
    stand_ins[-1].output = output
    try:
        for i, s in enumerate(stand_ins):
            lm.blocks[i] = s
        yield stand_ins[-1]
    finally:
        for i, b in enumerate(originals):
            lm.blocks[i] = b
