"""Canonical dataset, readers and the leave-one-out split."""

from qbert.data.dataset import SeqDataset, from_sequences, is_canonical_dir
from qbert.data.errors import DataError
from qbert.data.split import LeaveOneOutSplit, windows

__all__ = ["SeqDataset", "DataError", "LeaveOneOutSplit", "windows", "from_sequences", "is_canonical_dir"]
