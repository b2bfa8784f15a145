"""Serving: streaming of a request's steps, continuous batching, and an OpenAI-compatible server."""
