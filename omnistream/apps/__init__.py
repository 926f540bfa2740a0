"""omnistream.apps."""
