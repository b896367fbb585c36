"""GRPO: advantages, policy-loss maths and the training loop."""
