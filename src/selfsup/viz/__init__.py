"""Pictures: attention maps, PCA of patch features, curves."""
