"""Robot deployment: hardware interfaces, the ZeroMQ robot link, its robot-side bridge, the simulated robot."""
