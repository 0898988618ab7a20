"""SD3.5-Medium zeroth-order reward fine-tuning: Flow-GRPO / TempFlow-GRPO baseline and the RSM redesign."""
