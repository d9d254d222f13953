"""Data: synthetic dataset, LAION webdataset loaders, image decode backends, precompute, COCO prompts."""
