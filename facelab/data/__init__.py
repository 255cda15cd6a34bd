"""Sample schema, webdataset shards, DataModules, synthetic corpus, preprocessing (issue #4)."""
