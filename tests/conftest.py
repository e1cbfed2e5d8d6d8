"""Suite-wide settings."""

import os

# As elemta.service runs (UMask=0027): files the tests write, such as TLS and DKIM keys, are
# not readable by others, which elemta requires of its secrets.  Tests that need a file
# readable by another user set its mode themselves.
os.umask(0o027)
