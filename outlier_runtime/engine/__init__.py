"""Engine building blocks plugins may use: checkpoint parsing, the expert index, packs, file I/O, buffers."""
