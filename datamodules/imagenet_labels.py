"""ImageNet's class names: the file that names each class folder (wnid), and its reader. Read by the datamodule
(``imagenet``) and written by the quickstart data (``quickstart``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from datamodules.common import DatasetError

log = logging.getLogger(__name__)
# ImageNet's class names, one ``<wnid> <name>[, <synonym>...]`` line per class (in the Kaggle download, three
# folders above the CLS-LOC folder that holds train/ and val/).
SYNSET_MAPPING = "LOC_synset_mapping.txt"


def synset_names(path: Path, wnids: list[str]) -> list[str]:
    """The first name of each wnid in ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca`` -> "tench").

    A name that two classes share (ImageNet's "crane" bird and machine) gets its wnid added, so every class
    has its own; a wnid the file lacks keeps the wnid, with a warning naming the file.
    """
    names = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        wnid, _, synonyms = line.strip().partition(" ")
        name = synonyms.split(",")[0].strip()
        if not wnid:
            continue
        if not name:
            raise DatasetError(f"{path}:{number}: expected '<wnid> <name>[, <other names>]', got {line!r}")
        names[wnid] = name
    missing = [wnid for wnid in wnids if wnid not in names]
    if missing:
        log.warning("%s names %d of the %d classes; the others keep their folder names (%s, ...)", path,
                    len(wnids) - len(missing), len(wnids), missing[0])
    chosen = [names.get(wnid, wnid) for wnid in wnids]
    count = Counter(chosen)
    return [f"{name} ({wnid})" if count[name] > 1 else name for wnid, name in zip(wnids, chosen)]
