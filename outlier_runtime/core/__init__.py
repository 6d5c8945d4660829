"""The core: hooks, plugin manager, options, manifests, catalog, runtime and errors. Never imports a plugin."""
