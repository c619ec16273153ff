"""A gallery: images, their instances and a search over them, durable on disk.

gallery.py   Gallery: S shards (1 by default) searched as one; GalleryMeta; creating, opening
shard.py     Shard: one SQLite file and its search index, one writer, kill-safe
database.py  the SQLite schema, connections, upgrades and the writer lock
records.py   what goes in (NewImage) and what comes out (Hit)
ingest.py    adding image files, resumably (Gallery.add_images, `reir index`)
tags.py      image tags as posting lists, for filtered search
sync.py      keeping a shard's index in step with SQLite: catch up or rebuild
check.py     `reir gallery check`: SQLite, index rows and agreement, measured
info.py      typed reports: GalleryInfo, ShardInfo, IndexInfo, Measurement
"""
