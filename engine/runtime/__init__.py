"""The bundle and its ONNX Runtime sessions.

bundle.py       the directory `reir export bundle` writes: manifest, graphs, tokenizer, query sample
engine.py       Engine: text -> query vectors (with an LRU cache), images -> detections
encoders.py     the ONNX Runtime sessions of the two graphs, and execution providers
tokenizer.py    tokenisation with the `tokenizers` package alone
expressions.py  expression cleaning, shared with training
image.py        decoding and resizing images exactly as training did
detections.py   one image's instances in its own pixels
"""
