"""Training data: procedural indoor scenes, their renderer and captions, the dataset manifest, import and loaders."""
