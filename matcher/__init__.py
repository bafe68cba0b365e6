"""Matcher's shared library: everything the programs in service/, train/, export/ and bench/ use.

Image checks, the artefact layout, the backbones and their preprocessing, the feature backends,
extraction over files, the classifier and its search, and the matching core (batching, hot
reload). No gRPC server lives here; a transport converts its messages and calls the core.
"""
