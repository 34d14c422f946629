"""The VM tier (``make vm-test``): see ``runner.py`` and docs/guest-image.md."""
