"""Bundle: the encrypted bundle format (docs/bundle-format.md): write, read, extract."""
