"""Reading one shard: fetch (cache or storage), verify, decode."""
