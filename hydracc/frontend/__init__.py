"""Front end: load a checkpoint lazily (``checkpoint``), build its transformers model on meta tensors and
match the weights (``model``), capture the graph and find the attention sites (``capture``)."""
