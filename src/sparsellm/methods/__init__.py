"""Every sparsification method, one file each, by family: weights/ (unstructured and N:M
pruning), structured/ (smaller dense models), activation/ (input-dependent skipping),
attention/ (sparse prefill and KV-cache methods). Each method file holds its frozen
config and its handler, registered with `sparsellm.registry.register`."""
