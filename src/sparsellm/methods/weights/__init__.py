"""Weight sparsity: mask math, scores and the pruning methods."""
