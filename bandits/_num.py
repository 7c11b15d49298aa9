"""Runtime number checks that do not narrow types.

``isinstance(x, numbers.Real)`` is the right runtime test (numpy scalars pass, ``bool`` is excluded
separately), but type checkers do not see ``float``/``int`` as subclasses of the ``numbers`` ABCs, so
the test on a parameter annotated ``float`` or ``int`` would mark the rest of the function unreachable
and leave it unchecked. These helpers return a plain ``bool`` and so keep the annotations intact.

Examples
--------
>>> import numpy as np
>>> is_real(0.5), is_real(np.float32(2)), is_real(True), is_real("1")
(True, True, False, False)
>>> is_real(True, allow_bool=True)
True
>>> is_integral(3), is_integral(np.int64(3)), is_integral(False), is_integral(3.0)
(True, True, False, False)
"""

from __future__ import annotations

import numbers

__all__ = ["is_integral", "is_real"]


def is_real(x: object, *, allow_bool: bool = False) -> bool:
    """True for a real number that is not a ``bool`` (``bool`` too where ``allow_bool``)."""
    return isinstance(x, numbers.Real) and (allow_bool or not isinstance(x, bool))


def is_integral(x: object) -> bool:
    """True for an integer that is not a ``bool``."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
