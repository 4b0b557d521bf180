"""The content store (`DIR/xx/yyyy…`, files named by fs-verity digest): importing objects into
it (`objects`) and reading backing files out of it, confined and verified (`backing`).

Frontends import file data through `objects`; the FUSE server, fsck-store and the CRFS
frontend read through `backing`.
"""
