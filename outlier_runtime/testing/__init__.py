"""Test tooling that ships with the package: tiny models and tokenizers built offline."""
