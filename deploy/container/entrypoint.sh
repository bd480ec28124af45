#!/bin/sh
# The image's entrypoint. NOT FOR DIAGNOSTIC USE.
#   (no arguments)            ihd-node serve --config $IHD_NODE_CONFIG
#   serve|worker [OPTIONS]    ihd-node serve|worker OPTIONS --config $IHD_NODE_CONFIG (unless --config is given)
#   -OPTIONS                  ihd-node serve OPTIONS ... (e.g. --roles receive,deliver)
#   ihd-node ARGS / ARGS      ihd-node ARGS (status, db upgrade, check-config, ...: give --config yourself)
# `exec`: ihd-node becomes PID 1 and gets the SIGTERM of `podman stop` itself (serve and worker handle it
# and stop cleanly); no shell is left in between to swallow it.
set -eu
config="${IHD_NODE_CONFIG:-/etc/ihd-node/config.yaml}"

[ $# -eq 0 ] && set -- serve
case "$1" in
  -*) set -- serve "$@" ;;
  ihd-node) shift; [ $# -eq 0 ] && set -- --help ;;
esac

case "$1" in
  serve|worker)
    for arg in "$@"; do
      case "$arg" in --config|--config=*) exec ihd-node "$@" ;; esac
    done
    if [ ! -r "$config" ]; then
      echo "ihd-node-entrypoint: error: cannot read the configuration $config (user $(id -u):$(id -g)):" \
           "mount the folder holding config.yaml, e.g. -v /srv/ihd-node/etc:/etc/ihd-node:ro, readable by" \
           "UID 10001 (deploy/container/config.yaml is an example), or set IHD_NODE_CONFIG" >&2
      exit 2
    fi
    exec ihd-node "$@" --config "$config" ;;
  *)
    exec ihd-node "$@" ;;
esac
