//! gguf (to be written)
