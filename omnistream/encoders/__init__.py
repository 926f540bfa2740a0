"""omnistream.encoders."""
