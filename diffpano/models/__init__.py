"""Model components: the EA adapter, LoRA, seamless padding, text encoders, builders and loading."""
