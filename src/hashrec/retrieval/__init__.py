"""Layer 7: retrieval over a corpus of post embeddings: the corpus, exact and ANN top-k."""

from hashrec.retrieval.corpus import Corpus, CorpusConfig
from hashrec.retrieval.index import ExactIndex, FaissIndex, SearchResult, reference_top_k

__all__ = ["Corpus", "CorpusConfig", "ExactIndex", "FaissIndex", "SearchResult", "reference_top_k"]
