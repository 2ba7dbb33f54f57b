"""Recovery after pruning with the masks frozen: distillation and masked LoRA."""
