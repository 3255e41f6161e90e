#!/usr/bin/env python3
"""SFT validation harness: `python run_validation.py --models gemma-3-4b-it,gemma-3n-E4B-it`."""

import sys

from harness.gate.cli import main

if __name__ == "__main__":
    sys.exit(main())
