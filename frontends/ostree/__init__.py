"""OSTree commits read straight from a repository: the GVariant codec (`gvariant`), the
repository reader (`repo`) and the commit → tree frontend (`commit`)."""
