"""omnistream.talker."""
