#!/usr/bin/env sh
# The local dev cluster: a Ray head (dashboard and job server on 127.0.0.1) plus a moto S3 server.
#   cluster/dev_cluster.sh up [--state-dir DIR] [--dashboard-port 8265] [--s3-port 9000] [--bucket raypose]
#   eval "$(cluster/dev_cluster.sh env)"
#   cluster/dev_cluster.sh down
# All the logic lives in raypose/cluster/dev.py (`raypose cluster --help`).
set -eu
if command -v raypose >/dev/null 2>&1; then
    exec raypose cluster "$@"
fi
exec "${PYTHON:-python3}" -m raypose.cli cluster "$@"
