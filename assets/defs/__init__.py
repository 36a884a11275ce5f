"""The graph by domain, one module each (ingestion, teachers, embeddings, scoring, releases) with the
resources they share, the GE check helper and the automation conditions."""
