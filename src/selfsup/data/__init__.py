"""Data: sources, built-in sets, multi-crop views, masks, loaders."""
