"""omnistream.kernels."""
