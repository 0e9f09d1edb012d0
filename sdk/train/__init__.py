"""Reference PyTorch models (teacher embedder) and their training recipes (needs `sdk[export]`)."""
