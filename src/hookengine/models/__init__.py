"""Model loading (``loader``) and juggling under a memory budget (``cache``)."""
