"""Editing Python source with LibCST and writing unified diffs: the leaf every transform's
patch face writes through. Imports nothing else of autoopt."""
