"""Evaluation: DDIM generation, FID (Inception) and CLIP score, distributed and offline (MLPerf rules)."""
