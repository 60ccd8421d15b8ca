"""The files stages exchange, each with one owner: a typed record and its read / write.

    model file (*.safetensors)      mobile_vmoe.checkpoint   ModelMeta
    RUN/heldout.txt (file lists)    files.file_list          read_file_list / write_file_list
    superclasses.json               files.superclass_map     SuperclassMap
    FILE.<ext>.json export sidecar  files.sidecar            Sidecar
    OUT/stages/<stage>.json         files.stage_marker       StageMarker
    caption sets (LIMoE):           files.captions           CaptionRow, CaptionClasses
      captions.csv|tsv, *.tar shards, classes.json
    bench results                   mobile_vmoe.bench.schema

Stage code reads and writes these records, never their JSON keys; docs/FILES.md describes the formats. A path a
record holds is absolute in memory and, on disk, relative to the file when inside the directory that moves with it
(``common.store_path`` / ``load_path``): moved or copied run and pipeline directories keep working.
"""

from __future__ import annotations
