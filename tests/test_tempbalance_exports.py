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
