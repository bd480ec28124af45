"""The paper's model: a CNN per CT slice, feature selection, a BiLSTM over the slices, Grad-CAM.

Submodules are imported where used; importing this package does not import torch.
"""
