"""The registry: the four layers (prompt, inference scaling, fine-tune, model artifact), stacks, datasets and
evaluation runs."""
