"""One shard's search: what returns the exact top-k for a query vector, fast.

index.py        SearchIndex: the files under G/index/, catch-up, exact re-rank, calibration
vectors.py      VectorStore: every stored vector, memory-mapped; the exact scan
query_space.py  the few directions text queries use, fitted to a sample of them
candidates.py   the CandidateIndex protocol and the registry of designs
projected.py    `projected-pq`: 4-bit fast-scan codes, then 8-bit codes, in the query space
agreement.py    agreement with the exact ranking, and the self-check that sizes candidates
"""
