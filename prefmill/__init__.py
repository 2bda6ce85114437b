"""prefmill: synthetic preference data for LLM post-training.

The layers live in the repository's top-level folders and are installed under this one name:
`prefmill.flows` (Prefect flows and the CLI), `prefmill.operators` (the algorithms), `prefmill.serving`
(vLLM, Ray, embeddings), `prefmill.storage` (the DuckLake catalog) and `prefmill.schemas` (tables, configs).
Importing it costs nothing (the wheel's .pth imports `prefmill._torch_builds` at every interpreter start):
`__version__` is read from the installed metadata when first asked for.
"""


def __getattr__(name: str) -> str:
    if name != "__version__":
        raise AttributeError(f"module 'prefmill' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefmill")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
