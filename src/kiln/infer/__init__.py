"""The inference core: one loader (`load`), one generation function and the `Engine` (`generate`),
the continuous batch (`engine`), the fused decode step (`decode`), reading Hugging Face directories (`hf`)."""
