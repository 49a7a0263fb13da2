"""The base every method dataclass derives from (through its family base in ``tokenbench.families``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.errors import TokenbenchError


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

    def check_int(self, name: str, low: int, optional: bool = False) -> None:
        """One-line error unless the field ``name`` is an integer >= ``low`` (or None, when ``optional``)."""
        v = getattr(self, name)
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            unset = " (or unset)" if optional else ""
            raise TokenbenchError(f"method '{self.label}': {name} must be an integer >= {low}{unset}, got {v!r}")

    def nominal_budget(self) -> dict[str, Any]:
        """The budget as configured (e.g. ``{"keep_ratio": 0.5}``), recorded next to the achieved one."""
        return {}

    def is_noop(self) -> bool:
        """True when the method keeps everything (the family runner may then skip its machinery)."""
        return False


class KeepAll:
    """Mixin for a family's ``none`` baseline (put it before the family base): no reduction at all.

    The family's budget fields stay in the schema, so a sweep whose shared budget override reaches the
    baseline (``-m method=none,tome method.r=8``) composes, but only their keep-all values (``keep_all``) are
    accepted, with a one-line error otherwise."""

    takes_budget: ClassVar[bool] = False
    keep_all: ClassVar[dict[str, Any]] = {}  # each budget field and its keep-everything value

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]
        got = {k: getattr(self, k) for k in self.keep_all}
        if got != self.keep_all:
            shown = ", ".join(f"{k}={v}" for k, v in got.items())
            label = self.label  # type: ignore[attr-defined]
            raise TokenbenchError(f"method '{label}' keeps every token and takes no budget (got {shown}); "
                                  "run it once as the baseline")

    def is_noop(self) -> bool:
        return True

    def nominal_budget(self) -> dict[str, Any]:
        return dict(self.keep_all)
