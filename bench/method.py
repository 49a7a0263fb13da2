"""The base every method dataclass derives from (through its family base in ``tokenbench.families``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class Method:
    """A token-reduction method. Subclasses are dataclasses whose fields are the method's parameters."""

    family: ClassVar[str] = ""
    registered_name: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.registered_name

    def nominal_budget(self) -> dict[str, Any]:
        """The budget as configured (e.g. ``{"keep_ratio": 0.5}``), recorded next to the achieved one."""
        return {}

    def is_noop(self) -> bool:
        """True when the method keeps everything (the family runner may then skip its machinery)."""
        return False
