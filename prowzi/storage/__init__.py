"""Persistence in three small contracts and one format.

- :mod:`prowzi.storage.blob`: the blob store contract (get, put with create-only / if-match,
  list, delete, head) and the in-memory reference; :mod:`prowzi.storage.local` plain files;
  :mod:`prowzi.storage.remote` S3 and Azure Blob.
- :mod:`prowzi.storage.lease`: session leases with fencing tokens, over any blob store.
- :mod:`prowzi.storage.catalog`: a SQLite catalog of checkpoints, derived from the blobs.
- :mod:`prowzi.storage.format`: the checkpoint container (pure: no I/O).
- :mod:`prowzi.storage.files`: the one atomic-write helper and permission policy.
- :mod:`prowzi.storage.conformance`: the checks every backend passes.

:func:`prowzi.storage.remote.open_store` turns a location (a path, ``file://``, ``s3://``,
``az://``) into a store.
"""

from __future__ import annotations
