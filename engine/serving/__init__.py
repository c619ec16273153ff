"""The search contract and everything that speaks it.

contract.py       SearchRequest, SearchResponse, RequestError: one validation, one JSON form
retriever.py      Retriever: one gallery, in this process
service.py        SearchService: galleries named under a root (what Triton's `retrieve` runs); Plan
batching.py       Batcher: many threads' requests answered in batches; Admission: fast refusal past a bound
metrics.py        Metrics: Prometheus text of requests, stages, batches, queue, galleries
triton_client.py  TritonRetriever: the contract against Triton's `retrieve` model
serve_client.py   ServeRetriever: the contract against the Ray Serve app
triton_server.py  a local tritonserver on CPU (nvidia-pytriton's), for tests and `reir triton serve`
"""
