"""lora_lab's Hydra plugins: the Optuna sweeper with pruning, failure reasons and resume."""
