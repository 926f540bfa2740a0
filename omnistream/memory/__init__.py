"""omnistream.memory."""
