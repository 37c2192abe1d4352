"""`tbfast.TempBalance` / `tbfast.Tempbalance` are public: in __all__, dir(tbfast), help(tbfast), star-import."""
import pydoc

import tbfast
import tbfast.tempbalance


def test_tempbalance_is_exported():
    for name in ("TempBalance", "Tempbalance"):
        assert name in tbfast.__all__
        assert name in dir(tbfast)
        assert getattr(tbfast, name) is getattr(tbfast.tempbalance, name)
    ns = {}
    exec("from tbfast import *", ns)
    assert ns["TempBalance"] is tbfast.tempbalance.TempBalance
    text = pydoc.render_doc(tbfast, renderer=pydoc.plaintext)
    assert "class TempBalance" in text
    assert "build_optimizer_param_group" in text


def test_scheduler_is_one_package():
    """The scheduler lives in tbfast/tempbalance/ (no top-level scheduler modules) and every option
    attribute is defined in the class body (not attached after the definition)."""
    import importlib
    import pathlib

    import tbfast.tempbalance.options as opts

    root = pathlib.Path(tbfast.__file__).parent
    assert (root / "tempbalance" / "__init__.py").is_file()
    for old in ("tempbalance_options", "plan", "schedule", "param_layout", "_untuned_lr", "background"):
        assert not (root / f"{old}.py").exists(), old
        try:
            importlib.import_module(f"tbfast.{old}")
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError(f"tbfast.{old} still importable")
    body = tbfast.TempBalance.__dict__
    for name in opts.OPTION_NAMES + ("backend",):
        assert isinstance(body.get(name), opts.Option), name
