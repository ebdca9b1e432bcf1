"""The modelpool gateway: a stateless OpenAI-compatible front door over the pool's instances."""
