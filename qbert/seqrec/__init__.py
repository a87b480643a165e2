"""Sequence models: the ID-only baselines (SASRec, BERT4Rec), shared transformer layers and the
Q-BERT4Rec stage-3 model. Kept import-light: import the submodule you need."""
