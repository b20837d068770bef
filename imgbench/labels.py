"""Class names made safe for a service's label rules, one rule set for every provider.

Datasets name classes after their folders, which may hold spaces, dots or
non-ASCII letters that a service rejects. ``safe_labels`` maps every class
name to a label the service accepts, deterministically: NFKD-decompose,
drop combining marks, replace each run of characters outside the allowed set
with ``_``, trim ``_`` from both ends and cut to the maximum length. Two
classes that end up with the same label are an error that names both,
because predictions could no longer be distinguished. The provider records the
mapping, and maps predicted labels back with ``ClassLabels.class_of``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from imgbench.errors import InvalidInputError


@dataclass(frozen=True)
class ClassLabels:
    """The mapping between a dataset's class names and a service's labels."""

    by_class: dict[str, str]

    def label_of(self, class_name: str) -> str:
        return self.by_class[class_name]

    def class_of(self, label: str) -> str:
        """Return the class name of a label a service predicted; unknown labels pass through unchanged."""
        for class_name, safe in self.by_class.items():
            if safe == label:
                return class_name
        return label

    @property
    def changed(self) -> dict[str, str]:
        """The class names whose label differs from the name, as recorded in the case record."""
        return {name: label for name, label in self.by_class.items() if name != label}


def safe_labels(classes: tuple[str, ...] | list[str], *, service: str, allowed: str = r"A-Za-z0-9_",
                max_length: int = 64) -> ClassLabels:
    """Map each class name to a label of characters in the regex class ``allowed``.

    Raises ``InvalidInputError`` when a class name leaves no allowed character
    or when two names map to the same label.
    """
    outside = re.compile(f"[^{allowed}]+")
    by_class: dict[str, str] = {}
    owners: dict[str, str] = {}
    for name in classes:
        ascii_name = "".join(ch for ch in unicodedata.normalize("NFKD", name) if not unicodedata.combining(ch))
        label = outside.sub("_", ascii_name).strip("_")[:max_length]
        if not label:
            raise InvalidInputError(f"class name {name!r} has no character that {service} accepts in a label "
                                    f"(allowed: [{allowed}]); rename the class folder")
        if label in owners:
            raise InvalidInputError(f"class names {owners[label]!r} and {name!r} both become the {service} label "
                                    f"{label!r}; rename one of the class folders")
        owners[label] = name
        by_class[name] = label
    return ClassLabels(by_class)
