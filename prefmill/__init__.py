"""prefmill: synthetic preference data for LLM post-training.

The layers live in the repository's top-level folders and are installed under this one name:
`prefmill.flows` (Prefect flows and the CLI), `prefmill.operators` (the algorithms), `prefmill.serving`
(vLLM, Ray, embeddings), `prefmill.storage` (the DuckLake catalog) and `prefmill.schemas` (tables, configs).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prefmill")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
