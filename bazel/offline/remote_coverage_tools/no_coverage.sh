#!/bin/sh
echo "bazel coverage is not available offline: @remote_coverage_tools is a local stand-in (bazel/offline/README.md)." >&2
exit 1
