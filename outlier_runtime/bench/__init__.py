"""``outlier bench``, ``outlier sweep-k`` and ``outlier routing``: measurements with provenance."""
