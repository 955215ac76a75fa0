//! kv_cache (to be written)
