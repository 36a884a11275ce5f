"""Teacher embeddings of validated samples: loader, engine and sinks."""
