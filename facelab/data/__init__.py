"""Data: the sample schema, webdataset shards, DataModules, the synthetic corpus and the
preprocessing of real photos and videos. Knows nothing of methods."""
