"""Loss functions: plain functions of tensors, one module per loss family."""
