"""Core: what every stage stands on: config, errors, crypto, durable writes, logging, Part-10 structure."""
