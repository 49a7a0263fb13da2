"""The base every method dataclass derives from (through its family base in ``tokenbench.families``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class Method:
    """A token-reduction method. Subclasses are dataclasses whose fields are the method's parameters."""

    family: ClassVar[str] = ""
    registered_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def name(self) -> str:
        return self.registered_name

    @property
    def label(self) -> str:
        """The name for messages: the registered name, else the class name."""
        return self.name or type(self).__name__

    def validate(self) -> None:
        """Raise ``TokenbenchError`` (one line) on bad parameters; runs at construction. Families extend it."""

    def nominal_budget(self) -> dict[str, Any]:
        """The budget as configured (e.g. ``{"keep_ratio": 0.5}``), recorded next to the achieved one."""
        return {}

    def is_noop(self) -> bool:
        """True when the method keeps everything (the family runner may then skip its machinery)."""
        return False
