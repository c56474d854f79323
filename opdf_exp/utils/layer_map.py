"""The one uniform layer-map rule, shared by the student builder (``models/``) and the tensor alignment loss
(``mpo/``), which must not import each other."""
from __future__ import annotations

from opdf_exp.errors import ConfigError


def uniform_layer_map(num_student: int, num_teacher: int, error: str | None = None) -> list[int]:
    """Teacher layer for each student layer: ``round((i + 1) * T / S) - 1``, spread uniformly, last maps to last.

    6 of 12 gives 1, 3, 5, 7, 9, 11 (the OPDF code's ``2i + 1``); 3 of 6 gives 1, 3, 5; equal depths give the
    identity. Python's round is half to even (4 of 6: 1, 2, 3, 5). ``error`` replaces the message raised when the
    student is deeper than the teacher, so each caller can name its own fix.
    """
    if not 1 <= num_student <= num_teacher:
        raise ConfigError(error or f"num_student={num_student} must be between 1 and num_teacher={num_teacher}")
    return [round((i + 1) * num_teacher / num_student) - 1 for i in range(num_student)]
