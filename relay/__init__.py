"""comfy-relay: live ComfyUI task progress, polled once upstream and pushed to every browser."""

__version__ = "0.1.0"
