"""Which models the worker serves and where their files are."""
