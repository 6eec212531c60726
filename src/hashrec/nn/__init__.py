"""Layers 2-3: batch containers and neural pieces (table, optimizer, reducers, transformer)."""
