"""Routers grouped by resource: edits (transfer, remove-attribute), latents (encode, decode, interpolate), meta."""
