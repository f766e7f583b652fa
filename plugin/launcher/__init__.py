"""Starting a real Triton server (from the nvidia-pytriton wheel; runs on CPU) for tests, demos and the
load tests. The sidecar never imports it."""
