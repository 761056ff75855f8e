"""DMNSP: Dynamic Multi-Layer Null Space Projection for class-incremental CLIP.

Importing the package has no side effects: models, datasets and configs load on first use.
"""

__version__ = "0.1.0"
