"""Tar archives and OCI layers: the one-pass stream reader (`stream`), file contents arriving
from it (`contents`) and the layer merge that lowers them to a tree (`layers`)."""
