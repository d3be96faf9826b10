"""Prepared datasets: readers for raw scans, writers and readers of the on-disk format.

Other packages read prepared data only through this package: the shard stream
(:mod:`data_prep.shard_reader`) for pretraining and the zarr store of labeled slices
(:mod:`data_prep.zarr_store`) for fine-tuning, both described by the manifest
(:mod:`data_prep.manifest`).
"""
