"""Framework integrations. ``tbfast.integrations.hf``: Hugging Face ``Trainer`` (needs transformers).

Submodules are imported on use so that ``import tbfast.integrations`` stays light.
"""

__all__ = ["hf"]


def __getattr__(name: str):
    if name == "hf":
        import importlib

        return importlib.import_module(f"{__name__}.hf")
    raise AttributeError(f"module 'tbfast.integrations' has no attribute {name!r}")
