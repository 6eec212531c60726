"""Layer 6: collision analysis of hashed ID sets."""
