"""The teacher cache: HDF5 shards plus a manifest, named by a key that hashes what made them.

Layout and fields are documented in docs/cache-format.md. `schema` names a shard's datasets,
`codec` encodes and decodes the [CLS] vectors (float16 or int8), `manifest` is the typed manifest
and the key's inputs, `fingerprint` computes keys, `writer` writes shards, `reader` reads and
streams them, `verify` checks a cache end to end, `local` finds, locks and tidies caches under the
cache root, `store` moves them to and from a shared store.
Nothing here imports model code.
"""
