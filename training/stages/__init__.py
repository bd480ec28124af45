"""The paper's training stages (cnn, features, sequence) and the out-of-fold option, one module each."""
