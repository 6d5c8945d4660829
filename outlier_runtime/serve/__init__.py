"""``outlier serve``: the OpenAI-compatible HTTP server over the tiers."""
