"""Class metadata: dataset category ids <-> contiguous thing/stuff ids, names and colours.

Contiguous order (docs/INTERFACES.md "Class metadata"): things 0..T-1 and stuff 0..S-1, each in
ascending dataset category id for COCO panoptic, in trainId order for Cityscapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sepsnet.errors import DataError


def _entry(c: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        color = [int(v) for v in c.get("color", [128, 128, 128])]
        entry = {"id": int(c["id"]), "name": str(c.get("name", c["id"])), "color": color}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: invalid category entry {c!r} ({exc})") from None
    if len(color) != 3:
        raise DataError(f"{where}: category {entry['id']} colour must be [r, g, b], got {color}")
    return entry


@dataclass
class ClassMetadata:
    """``things``/``stuff``: lists of ``{"id", "name", "color"}`` in contiguous order."""

    things: list[dict[str, Any]] = field(default_factory=list)
    stuff: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        ids = [int(c["id"]) for c in self.things + self.stuff]
        if len(ids) != len(set(ids)):
            raise DataError(f"duplicate category ids in class metadata: {sorted(ids)}")

    @classmethod
    def from_coco_categories(cls, categories: list[dict[str, Any]], where: str = "categories") -> ClassMetadata:
        """From COCO panoptic ``categories`` (``isthing`` 1/0); order = ascending id."""
        if not isinstance(categories, list) or not categories:
            raise DataError(f"{where}: 'categories' must be a non-empty list")
        things, stuff = [], []
        for c in categories:
            if not isinstance(c, dict) or "id" not in c or "isthing" not in c:
                raise DataError(f"{where}: category entry without id/isthing: {c!r}")
            (things if int(c["isthing"]) else stuff).append(_entry(c, where))
        return cls(sorted(things, key=lambda e: e["id"]), sorted(stuff, key=lambda e: e["id"]))

    @classmethod
    def cityscapes(cls) -> ClassMetadata:
        """8 thing and 11 stuff train classes from ``cityscapesscripts`` label definitions
        (``ignoreInEval`` labels dropped; contiguous order = trainId; ids = label ids)."""
        from cityscapesscripts.helpers.labels import labels

        things, stuff = [], []
        for lab in sorted((lab for lab in labels if not lab.ignoreInEval and 0 <= lab.trainId < 255),
                          key=lambda lab: lab.trainId):
            entry = {"id": int(lab.id), "name": lab.name, "color": [int(v) for v in lab.color]}
            (things if lab.hasInstances else stuff).append(entry)
        return cls(things, stuff)

    from_cityscapes = cityscapes

    @property
    def num_things(self) -> int:
        return len(self.things)

    @property
    def num_stuff(self) -> int:
        return len(self.stuff)

    @property
    def thing_names(self) -> list[str]:
        return [t["name"] for t in self.things]

    @property
    def stuff_names(self) -> list[str]:
        return [s["name"] for s in self.stuff]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"things": [...], "stuff": [...]}`` (checkpoints, export manifest)."""
        return {"things": [dict(t) for t in self.things], "stuff": [dict(s) for s in self.stuff]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassMetadata:
        """Inverse of :meth:`to_dict`; DataError when keys are missing."""
        if not isinstance(d, dict) or not isinstance(d.get("things"), list) or not isinstance(d.get("stuff"), list):
            raise DataError(f"class metadata must be a dict with 'things' and 'stuff' lists, got {type(d).__name__}")
        return cls([_entry(t, "metadata.things") for t in d["things"]],
                   [_entry(s, "metadata.stuff") for s in d["stuff"]])

    def categories(self) -> list[dict[str, Any]]:
        """COCO panoptic ``categories`` list (things first)."""
        return [{**t, "isthing": 1} for t in self.things] + [{**s, "isthing": 0} for s in self.stuff]

    def lookup(self) -> dict[int, tuple[bool, int]]:
        """dataset category id -> (isthing, contiguous id)."""
        out = {int(t["id"]): (True, i) for i, t in enumerate(self.things)}
        out.update({int(s["id"]): (False, i) for i, s in enumerate(self.stuff)})
        return out

    def to_contiguous(self, category_id: int) -> tuple[bool, int]:
        """dataset category id -> (isthing, contiguous id); DataError for an unknown id."""
        found = self.lookup().get(int(category_id))
        if found is None:
            raise DataError(f"unknown dataset category id {category_id}")
        return found

    def to_dataset_id(self, isthing: bool, contiguous_id: int) -> int:
        """(isthing, contiguous id) -> dataset category id."""
        table = self.things if isthing else self.stuff
        if not 0 <= int(contiguous_id) < len(table):
            raise DataError(f"contiguous {'thing' if isthing else 'stuff'} id {contiguous_id} out of "
                            f"range [0, {len(table)})")
        return int(table[int(contiguous_id)]["id"])
