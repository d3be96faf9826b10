"""Where data lives: local paths and object-store URLs behind one small set of calls.

Every path medssl hands from one stage to the next (a prepared dataset, a run folder, an
export, a sweep's storage) may be a local path or an ``s3://bucket/prefix`` URL on any
S3-compatible store. Endpoint, region and credentials come from the standard AWS places
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` / ``~/.aws``, instance roles) through s3fs; medssl
never reads or logs them. ``file://`` URLs are local paths.

- :mod:`.urls`: telling URLs from paths, joining them.
- :mod:`.objects`: whole-object and ranged reads, atomic writes, listing, transfers; every
  call retried on transient failures (:mod:`.retry`), errors naming the URL.
- :mod:`.mirror`: a local run folder kept in step with its URL.
- :mod:`.lease`: one holder at a time (a sweep's driver), by compare-and-swap.
"""

from cluster.storage.errors import StorageError
from cluster.storage.urls import is_url, join, local_path, name_of, parent_of

__all__ = ["StorageError", "is_url", "join", "local_path", "name_of", "parent_of"]
