"""Class metadata: dataset category ids <-> contiguous thing/stuff ids, names and colours."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sepsnet.errors import DataError


@dataclass
class ClassMetadata:
    """``things``/``stuff``: lists of ``{"id", "name", "color"}`` in contiguous order."""

    things: list[dict[str, Any]] = field(default_factory=list)
    stuff: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_coco_categories(cls, categories: list[dict[str, Any]]) -> "ClassMetadata":
        """From COCO panoptic ``categories`` (``isthing`` 1/0); order = ascending id."""
        things, stuff = [], []
        for c in sorted(categories, key=lambda c: int(c["id"])):
            if "id" not in c or "isthing" not in c:
                raise DataError(f"category entry without id/isthing: {c}")
            entry = {"id": int(c["id"]), "name": str(c.get("name", c["id"])),
                     "color": [int(v) for v in c.get("color", [128, 128, 128])]}
            (things if c["isthing"] else stuff).append(entry)
        return cls(things, stuff)

    @classmethod
    def cityscapes(cls) -> "ClassMetadata":
        """8 thing and 11 stuff train classes from ``cityscapesscripts`` label definitions."""
        from cityscapesscripts.helpers.labels import labels

        things, stuff = [], []
        for lab in sorted((lab for lab in labels if not lab.ignoreInEval and 0 <= lab.trainId < 255),
                          key=lambda lab: lab.trainId):
            entry = {"id": int(lab.id), "name": lab.name, "color": list(lab.color)}
            (things if lab.hasInstances else stuff).append(entry)
        return cls(things, stuff)

    def to_dict(self) -> dict[str, Any]:
        return {"things": [dict(t) for t in self.things], "stuff": [dict(s) for s in self.stuff]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassMetadata":
        return cls([dict(t) for t in d["things"]], [dict(s) for s in d["stuff"]])

    def categories(self) -> list[dict[str, Any]]:
        """COCO panoptic ``categories`` list."""
        return ([{**t, "isthing": 1} for t in self.things] + [{**s, "isthing": 0} for s in self.stuff])

    def lookup(self) -> dict[int, tuple[bool, int]]:
        """dataset category id -> (isthing, contiguous id)."""
        out = {int(t["id"]): (True, i) for i, t in enumerate(self.things)}
        out.update({int(s["id"]): (False, i) for i, s in enumerate(self.stuff)})
        return out
