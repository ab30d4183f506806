"""Cloud GPU offers: GPU name normalization, the offer table and its catalog loaders."""
