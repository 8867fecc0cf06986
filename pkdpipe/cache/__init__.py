"""The teacher cache: HDF5 shards plus a manifest, named by a key that hashes what made them.

Layout and fields are documented in docs/cache-format.md. `fingerprint` computes keys,
`manifest` reads and checks manifests, `writer` writes shards, `reader` streams them,
`verify` checks a cache end to end, `store` moves caches to and from a shared store.
"""
