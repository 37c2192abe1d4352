"""Framework integrations. ``tbfast.integrations.hf``: Hugging Face ``Trainer`` (needs transformers);
``tbfast.integrations.lightning``: Lightning ``TempBalanceCallback`` (needs lightning).

Submodules are imported on use so that ``import tbfast.integrations`` stays light.
"""

__all__ = ["hf", "lightning"]


def __getattr__(name: str):
    if name in ("hf", "lightning"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tbfast.integrations' has no attribute {name!r}")
