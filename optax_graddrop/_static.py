"""Static options of the jitted cores, hashable whatever the user passes."""

from __future__ import annotations

from typing import Any


class Static:
  """A static argument of a jitted function: equal by value when hashable,
  else by identity (a user's keep function need not be hashable)."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def _key(self) -> Any:
    try:
      hash(self.value)
    except TypeError:
      return ("id", id(self.value))
    return ("value", self.value)

  def __hash__(self) -> int:
    return hash(self._key())

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Static) and (self.value is other.value or self._key() == other._key())
