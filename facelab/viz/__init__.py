"""Overlays, image grids and mesh export."""
