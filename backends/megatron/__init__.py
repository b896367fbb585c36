"""The megatron-core trainer backend (issue 10, in progress): model families and HF <-> Megatron weight conversion."""
