"""Glue between sparsellm's method families and the libraries that run models.

Modules here adapt framework-neutral method protocols (e.g.
`sparsellm.methods.attention.protocols`) to one library's extension points; they import only those
protocols and generic helpers, never a concrete method, so methods stay plain files.
"""
