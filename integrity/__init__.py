"""Integrity manifests: the sha256 and size of every file of a model artefact directory.

`export` writes one into each SavedModel version and `train` into each classifier folder; the
service verifies the folder against it before loading anything from it. `python -m integrity
write|verify DIR` does the same for an operator (see `integrity.manifest`).
"""
