"""Storage: fsspec URLs, atomic writes, image codecs, the screen index and its importers."""
