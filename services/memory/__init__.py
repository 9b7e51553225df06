"""The memory service: explicit memories by id from an in-process LRU, Redis and the S3 bank."""
