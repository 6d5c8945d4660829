"""Built-in tier manifests (TOML), shipped as ``outlier_runtime.builtin_tiers``."""
