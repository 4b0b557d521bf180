"""CRFS / stargz / eStargz / zstd:chunked TOC JSON: the big-document slicer (`slices`) and the
TOC → tree frontend (`toc`, with its entry-value parsers in `fields` and its column-wise fast
path in `columns`)."""
