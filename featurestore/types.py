"""The array and column types every layer shares, named once.

Entities   join-key name -> one value per entity row (ints or strings)
Ids        int64 entity ids
Floats     float32 arrays: vectors, model matrices, scores
Statuses   uint8 Feast FieldStatus numbers (1 PRESENT, 2 NULL_VALUE, 3 NOT_FOUND,
           4 OUTSIDE_MAX_AGE)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Entities", "Floats", "Ids", "Statuses"]

Entities = Mapping[str, Sequence[int] | Sequence[str] | npt.NDArray[Any]]
Ids = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float32]
Statuses = npt.NDArray[np.uint8]
