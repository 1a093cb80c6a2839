"""Item-vector records: what the compacted ``item-vectors`` topic holds (the ANN index tails it).

Key: the item id (UTF-8), so compaction keeps each item's latest vector. Value: JSON
``{"item_id", "model", "vector": [float, ...], "updated_at", "version"}``; a ``null`` value
(tombstone) retires the item. ``version`` is the model version of a nearline model (the
trainer's ``item-vectors.<model>`` topics); 0 for online models, whose vectors move per event.

Example
-------
>>> record = ItemVector("i1", "mf", [0.5, -1.0], 1700000000.0)
>>> decode(encode(record)) == record
True
"""

from __future__ import annotations

import msgspec


class ItemVector(msgspec.Struct, frozen=True):
    item_id: str
    model: str
    vector: list[float]
    updated_at: float
    version: int = 0


encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder(ItemVector).decode  # raises msgspec errors when malformed
