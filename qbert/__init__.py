"""qbert: the reference implementation of Q-BERT4Rec and the platform that runs it."""

__version__ = "0.1.0"
