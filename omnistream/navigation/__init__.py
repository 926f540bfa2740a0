"""omnistream.navigation."""
