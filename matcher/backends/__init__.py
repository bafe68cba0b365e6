"""Feature backends: the SavedModel in this process (`embedded`), or TF Serving (`tfserving`).

`matcher.factory.make_backend` picks one from settings; each imports only what it needs.
"""
