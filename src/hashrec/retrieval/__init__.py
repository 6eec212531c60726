"""Layer 7: the retrieval index over a corpus of post embeddings (exact and ANN top-k)."""

from hashrec.retrieval.index import ExactIndex, FaissIndex, SearchResult, reference_top_k

__all__ = ["ExactIndex", "FaissIndex", "SearchResult", "reference_top_k"]
