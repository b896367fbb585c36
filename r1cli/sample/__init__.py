"""r1 sample: rejection sampling (DeepSeek-R1 stage 3)."""
