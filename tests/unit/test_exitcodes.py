"""nsmail.core.exitcodes: the table is sysexits(3), as the C library and Python know it."""

from __future__ import annotations

import os

from nsmail.core import exitcodes


def test_every_sysexits_name_has_its_value() -> None:
    named = {name: value for name, value in vars(exitcodes).items() if name.startswith("EX_")}
    sysexits = {name: value for name, value in named.items() if hasattr(os, name)}
    assert sysexits == {name: getattr(os, name) for name in sysexits}
    # Those that are not sysexits are nsmail's own, and clash with none of it.
    own = set(named) - set(sysexits)
    assert own == {"EX_PROBLEMS", "EX_NOTFOUND"}
    assert not {named[name] for name in own} & set(sysexits.values())
