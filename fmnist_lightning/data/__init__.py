"""The data: the official files and their checks, the DataModule, in-memory batches, augmentation, image files
and their decoding. Nothing is imported here, so `data.decode` stays free of torch (ONNX serving uses it)."""
