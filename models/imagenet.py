"""ImageNet-1k class identities: the 1000 WordNet ids (wnids) in the order of every ImageNet-1k
classifier's head (sorted wnids, index 0 = n01440764 'tench').

The list is read from the copy `tensorflow-datasets` (a runtime requirement) installs for its
`imagenet2012` builder; nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re

_WNID = re.compile(r"^n\d{8}$")


@functools.lru_cache(maxsize=1)
def wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in head order."""
    spec = importlib.util.find_spec("tensorflow_datasets")  # located, not imported (it is slow)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the ImageNet class list comes with tensorflow-datasets: "
                           "pip install -r requirements.txt")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "datasets/imagenet2012/labels.txt"
    ids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(ids) != 1000 or list(ids) != sorted(ids):
        raise RuntimeError(f"{path} is not the sorted list of 1000 ImageNet wnids")
    return ids


def is_wnid(name: str) -> bool:
    return bool(_WNID.match(str(name)))


def head_indices(class_names) -> list[int] | None:
    """Rows of an ImageNet-1k head for `class_names` when every one is an ImageNet-1k wnid (then
    the head sliced to these rows classifies the data with no training); None otherwise (no
    wnids, or wnids outside ImageNet-1k such as ImageNet-21k classes: the head is replaced).

    Raises ValueError when some names are wnids and others are not (one line naming a few).
    """
    names = [str(n) for n in class_names]
    others = [n for n in names if not is_wnid(n)]
    if len(others) == len(names):
        return None
    if others:
        raise ValueError(f"{len(others)} of the {len(names)} data classes are not ImageNet wnids "
                         f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) while "
                         f"{len(names) - len(others)} are; name the class folders all by wnid "
                         "(the ImageNet head is sliced to them) or none (the head is replaced)")
    index = {w: i for i, w in enumerate(wnids())}
    if any(n not in index for n in names):
        return None
    return [index[n] for n in names]
