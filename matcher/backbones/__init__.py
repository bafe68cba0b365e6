"""The backbone CNNs as Keras models (EfficientNet-Lite, Inception v3), in fp32 or bf16.

Built by `builder.build_backbone`; `export` writes them as SavedModels, and benchmarks time
them. Most modules here import TensorFlow and Keras; the server imports none of them (the
SavedModel carries the network).
"""
