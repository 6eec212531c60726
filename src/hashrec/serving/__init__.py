"""Layer 7: serving. ``pipeline.py`` is retrieve -> rank -> score; ``rank.py`` scores raw
requests (no web framework needed); ``store.py`` builds a checkpoint's side-feature store;
``app.py``, ``schemas.py`` and ``batcher.py`` are the HTTP service (the ``serve`` extra:
FastAPI, uvicorn)."""
