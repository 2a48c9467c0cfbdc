"""Parallelism over device meshes."""
