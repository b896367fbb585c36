"""How a model trains and generates: the torch trainer, rollout engines (imported lazily)."""
