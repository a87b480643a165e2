"""Hashed semantic-ID prefix tables of a fixed size, trained through the rows one catalogue uses.

A prefix n-gram of a semantic ID (its first n codes, n = 2..K-1 by default; Singh et al. 2023)
is hashed into one of ``buckets`` rows, so the tables never grow with the catalogue and a
prefix lands in the same row in every domain and run (:func:`prefix_hash`).

What is saved and transferred is three fixed-size tables: input embeddings ``inp_table`` [B, H],
output embeddings ``out_table`` [B, H] (none when tied to the input ones) and output biases
``out_bias_table`` [B]. What *trains* is a compact copy of the rows that the bound catalogue's
prefixes hash to (:meth:`PrefixTables.bind`, a few thousand of 32,768 on Instruments). No
training step can touch another row, so Adam, gradient clipping and the weight average over the
compact rows equal those over the whole table (an unused row has zero gradient and zero moments;
only weight decay would move it, and it cannot change this catalogue's outputs). The saving is
the dense work on the unused rows: zero-filling, clipping and updating 2 x 32,768 x H every step
took about a fifth of a fine-tuning step on Instruments (docs/method.md, "Speed").
"""

from __future__ import annotations

import torch
from torch import nn

_HASH_MULT = 0x9E3779B97F4A7C15 - (1 << 64)  # 64-bit golden-ratio multiplier, as a signed int64
TABLES = ("inp_table", "out_table", "out_bias_table")


def prefix_hash(codes: torch.Tensor, lengths: list[int], buckets: int) -> torch.Tensor:
    """[N, K] code tuples -> [N, len(lengths)] bucket of each item's prefix of each length.

    A deterministic multiply-xorshift hash of (length, c_1, ..., c_n) in int64 arithmetic, so
    the bucket of a prefix is the same in every domain and every run (the vocabulary transfers).
    """
    codes = torch.as_tensor(codes, dtype=torch.long)
    out = []
    for n in lengths:
        h = torch.full((codes.shape[0],), n, dtype=torch.long)
        for level in range(n):
            h = (h * _HASH_MULT + codes[:, level] + 1) & 0x7FFFFFFFFFFFFFFF
            h = h ^ (h >> 29)
        out.append(h % buckets)
    return torch.stack(out, 1) if out else torch.zeros(codes.shape[0], 0, dtype=torch.long)


class PrefixTables(nn.Module):
    """The hashed prefix tables (``with_out``: also the output embeddings and biases of the
    catalogue head; ``tied``: the output embeddings are the input rows, only the biases are
    separate). Tables start at zero: a prefix no step touches contributes nothing.

    After :meth:`bind`, the trainable parameters are ``inp`` [U + 1, H] (its last row is the
    blank of padding and [MASK], never trained), ``out`` [U, H] (untied only) and ``out_bias`` [U],
    where U is the number of distinct buckets of the bound catalogue. ``state_dict`` writes them
    back into the tables first and holds only the tables; loading refreshes the compact rows in place, so an
    optimizer built on them stays valid.
    """

    def __init__(self, buckets: int, hidden: int, with_out: bool, tied: bool = False):
        super().__init__()
        if buckets < 1:
            raise ValueError(f"prefix_buckets must be >= 1, got {buckets}")
        self.buckets, self.hidden, self.with_out, self.tied = int(buckets), int(hidden), with_out, tied and with_out
        own_out = with_out and not self.tied
        self.register_buffer("inp_table", torch.zeros(self.buckets, hidden))
        self.register_buffer("out_table", torch.zeros(self.buckets, hidden) if own_out else None)
        self.register_buffer("out_bias_table", torch.zeros(self.buckets) if with_out else None)
        self.register_buffer("rows", torch.zeros(0, dtype=torch.long), persistent=False)
        self.inp = nn.Parameter(torch.zeros(1, hidden))
        self.out = nn.Parameter(torch.zeros(0, hidden)) if own_out else None
        self.out_bias = nn.Parameter(torch.zeros(0)) if with_out else None

    @property
    def blank(self) -> int:
        """Row of ``inp`` that padding and [MASK] positions use (zero, excluded from every bag)."""
        return int(self.rows.numel())

    @property
    def out_rows(self) -> torch.Tensor:
        """Output embeddings [U, H] of the bound rows: ``out``, or the input rows when tied."""
        return self.inp[: self.blank] if self.tied else self.out

    def _tables(self) -> list[tuple[str, nn.Parameter | None]]:
        return [("inp_table", self.inp), ("out_table", self.out), ("out_bias_table", self.out_bias)]

    @torch.no_grad()
    def flush(self) -> None:
        """Write the trained compact rows back into the tables."""
        for name, param in self._tables():
            if param is not None and self.rows.numel():
                getattr(self, name)[self.rows] = param[: self.rows.numel()].detach()

    @torch.no_grad()
    def gather(self) -> None:
        """Refresh the compact rows from the tables, in place."""
        for name, param in self._tables():
            if param is not None:
                param[: self.rows.numel()] = getattr(self, name)[self.rows]

    def bind(self, buckets: torch.Tensor) -> torch.Tensor:
        """Train the rows of ``buckets`` [N, P] (a catalogue's prefix buckets) from now on; returns
        their compact indices [N, P]. Creates new parameters: build optimizers after binding."""
        self.flush()
        device = self.inp_table.device
        rows, compact = torch.unique(torch.as_tensor(buckets, device=device), return_inverse=True)
        self.rows = rows
        self.inp = nn.Parameter(torch.cat([self.inp_table[rows], self.inp_table.new_zeros(1, self.hidden)]))
        if self.with_out:
            if not self.tied:
                self.out = nn.Parameter(self.out_table[rows].clone())
            self.out_bias = nn.Parameter(self.out_bias_table[rows].clone())
        return compact

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 (nn.Module hook)
        self.flush()
        for name, _ in self._tables():
            table = getattr(self, name)
            if table is not None:
                destination[prefix + name] = table if keep_vars else table.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs):
        for name, _ in self._tables():
            table, key = getattr(self, name), prefix + name
            if table is None:  # e.g. the output table of untied rows, offered to tied ones
                if strict and key in state_dict:
                    unexpected_keys.append(key)
                continue
            if key not in state_dict:
                missing_keys.append(key)
            elif tuple(state_dict[key].shape) != tuple(table.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(state_dict[key].shape)}, the shape in current model is {tuple(table.shape)}.")
            else:
                with torch.no_grad():
                    table.copy_(state_dict[key])
        self.gather()
