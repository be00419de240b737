"""`autoopt optimize --script`: an unmodified training script driven in its own process per configuration."""
