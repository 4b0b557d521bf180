"""CRFS / stargz / eStargz / zstd:chunked TOC JSON: the big-document slicer (`slices`) and the
TOC → tree frontend (`toc`)."""
