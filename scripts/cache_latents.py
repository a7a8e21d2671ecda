#!/usr/bin/env python
"""Encode a dataset once into latent shards: see ``ldm/cli/cache_latents.py`` (``--help``)."""
import sys

from ldm.cli.cache_latents import main

if __name__ == "__main__":
    sys.exit(main())
