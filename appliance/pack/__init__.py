"""Pack: segments into bundles; lossless codecs, worker pool, streaming of large instances."""
