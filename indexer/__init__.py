"""The corpus, the vector index and versioned releases that bind an index to its model."""
