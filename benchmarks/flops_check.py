"""FLOPs check: FD-MobileNet's multiply-adds and parameters against the paper (144 / 40 / 12 M).

Same as ``python -m fdmobilenet.flops``; exits non-zero on a mismatch. See ``--help`` for other widths and
resolutions.
"""
import sys

from fdmobilenet.flops import main

if __name__ == "__main__":
    sys.exit(main())
