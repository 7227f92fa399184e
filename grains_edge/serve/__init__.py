"""`grains-edge serve`: an OpenAI-compatible HTTP server over one engine, with a steering vector per request.

slots.py holds the KV slots of the running batch, batcher.py schedules requests into it (continuous
batching), steering.py turns a request's `steering` field into a tensor, api.py is the HTTP layer.
"""
