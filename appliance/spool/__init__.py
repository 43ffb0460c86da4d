"""Spool: received instances, sealed and durable, until they are packed."""
