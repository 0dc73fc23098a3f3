"""Compute: model loading, the parse engine, the Redis parse cache and the core pipeline step."""
