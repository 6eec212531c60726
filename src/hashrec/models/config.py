"""What the configs of the models over one fused table share (``RankerConfig``,
``TwoTowerConfig``): the embedding width, the number of actions, and the JSON form a
checkpoint stores (``to_dict`` / ``from_dict``), written once so the two stay in step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, ClassVar, TypeVar

from hashrec.hashing.config import HashConfig
from hashrec.nn.transformer import TransformerConfig

__all__ = ["HashedModelConfig"]

C = TypeVar("C", bound="HashedModelConfig")


def _transformer(d: dict) -> TransformerConfig:
    return TransformerConfig(**d)


class HashedModelConfig:
    """Mixin for a model config dataclass with ``hash``, ``transformer`` and ``actions`` fields.

    ``KIND`` names the model in errors; ``NESTED`` maps more nested config fields to their
    parsers from JSON (``hash`` and ``transformer`` are always parsed). The JSON form is the
    dataclass's ``asdict`` with the hash config's own ``to_dict``.

    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class TinyConfig(HashedModelConfig):
    ...     hash: HashConfig = field(default_factory=HashConfig)
    ...     transformer: TransformerConfig = field(default_factory=TransformerConfig)
    ...     actions: tuple[str, ...] = ("click", "like")
    ...     KIND = "tiny"
    >>> cfg = TinyConfig.from_dict(TinyConfig().to_dict())
    >>> cfg == TinyConfig(), cfg.num_actions, cfg.dim
    (True, 2, 128)
    >>> TinyConfig.from_dict({**cfg.to_dict(), "colour": 1})
    Traceback (most recent call last):
    ...
    ValueError: unknown tiny config fields ['colour']
    """

    KIND: ClassVar[str] = "model"
    NESTED: ClassVar[dict[str, Callable[[dict], Any]]] = {}

    hash: HashConfig
    transformer: TransformerConfig
    actions: tuple[str, ...]

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def dim(self) -> int:
        """The embedding (and transformer) width D."""
        return self.transformer.dim

    def to_dict(self) -> dict:
        """The JSON form stored in checkpoints."""
        d = asdict(self)  # type: ignore[call-overload]
        d["hash"] = self.hash.to_dict()
        return d

    @classmethod
    def from_dict(cls: type[C], d: dict) -> C:
        """The config from its JSON form; a field missing (an older checkpoint) takes its
        default, an unknown one is refused, ``hash`` and ``transformer`` are required."""
        unknown = set(d) - set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        if unknown:
            raise ValueError(f"unknown {cls.KIND} config fields {sorted(unknown)}")
        missing = {"hash", "transformer"} - set(d)
        if missing:
            raise ValueError(f"{cls.KIND} config lacks {sorted(missing)}")
        parsers = {"hash": HashConfig.from_dict, "transformer": _transformer, **cls.NESTED}
        return cls(**{k: parsers[k](v) if k in parsers else v for k, v in d.items()})
