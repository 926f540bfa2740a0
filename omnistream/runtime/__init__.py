"""omnistream.runtime."""
