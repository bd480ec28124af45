"""Training for ihd-node: the paper's three stages on RSNA-layout data, evaluation, and the phantom recipe
that builds the shipped default model. Not part of the installed package (needs scikit-learn and time)."""
