#!/usr/bin/env bash
# Builds the sandbox image with no registry: FROM scratch + Debian's static
# busybox + the static sandbox-agent.
#
#   images/build.sh [--label KEY=VALUE]... [AGENT_BINARY] [TAG]
#   images/build.sh [--label KEY=VALUE]... --plain TAG
#                                    (busybox only, no agent: an image to
#                                     inject the agent into, see README.md)
#
# AGENT_BINARY defaults to the release build in $CARGO_TARGET_DIR (or
# ./target); TAG defaults to bridle-sandbox:base. Each --label is put on the
# image (the tests mark the images they build with it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
target_dir=${CARGO_TARGET_DIR:-$here/../target}
labels=()
while [ "${1:-}" = --label ]; do
  labels+=(--label "${2:?"--label needs KEY=VALUE"}")
  shift 2
done
plain=""
if [ "${1:-}" = --plain ]; then
  plain=1
  shift
  tag=${1:?"--plain needs a tag"}
  agent=""
else
  agent=${1:-$target_dir/x86_64-unknown-linux-gnu/release/sandbox-agent}
  tag=${2:-bridle-sandbox:base}
fi
cache=${BRIDLE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bridle}

die() { echo "images/build.sh: $*" >&2; exit 1; }

if [ -z "$plain" ]; then
  [ -x "$agent" ] || die "agent binary not found at $agent (cargo build --release -p sandbox-agent)"
  if ldd "$agent" 2>&1 | grep -q "=>"; then
    die "$agent is dynamically linked; build it with the workspace's .cargo/config.toml (crt-static)"
  fi
fi

# Debian's busybox-static: from the host if installed, else downloaded as a
# .deb (no root needed) into the cache.
busybox=""
if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  busybox=/bin/busybox
else
  mkdir -p "$cache"
  if [ ! -x "$cache/busybox" ]; then
    (
      cd "$cache"
      rm -f busybox-static_*.deb
      apt-get download busybox-static >/dev/null 2>&1 || {
        # The package lists may be missing on a fresh machine.
        if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null; fi
        apt-get download busybox-static >/dev/null
      }
      rm -rf extract && dpkg-deb -x busybox-static_*.deb extract
      cp extract/bin/busybox busybox
      rm -rf extract busybox-static_*.deb
    ) || die "cannot get Debian's busybox-static (apt-get download busybox-static failed)"
  fi
  busybox=$cache/busybox
fi
if ldd "$busybox" 2>&1 | grep -q "=>"; then
  die "$busybox is not static"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc,tmp,run,proc,sys,dev}
# Directories the sandbox user owns, copied with --chown so that the
# directories themselves (not only their contents) belong to uid 1000.
owned=$ctx/owned
mkdir -p "$owned"/{workspace,run/bridle}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list-full); do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$root/$(dirname "$applet")"
  ln -sf /bin/busybox "$root/$applet"
done
if [ -z "$plain" ]; then
  install -m 0755 "$agent" "$root/usr/local/bin/sandbox-agent"
  # Debug builds carry hundreds of MB of debuginfo the sandbox never needs.
  if command -v strip >/dev/null; then
    strip --strip-debug "$root/usr/local/bin/sandbox-agent"
  fi
  # Execute-only: a process started from a file its user cannot read is
  # non-dumpable from its first instruction (the kernel's would_dump), so
  # the spawner the agent re-executes is never open to ptrace, even for the
  # moment before it makes itself non-dumpable.
  chmod 0111 "$root/usr/local/bin/sandbox-agent"
fi
chmod 0755 "$root/bin/busybox"
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:sandbox:/workspace:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
sandbox:x:1000:
nogroup:x:65534:
GROUP
chmod 1777 "$root/tmp"
if [ -n "$plain" ]; then
  cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
CMD ["/bin/sh"]
DOCKERFILE
  if ! docker build -q -t "$tag" ${labels[@]+"${labels[@]}"} "$ctx" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log" >&2
    die "docker build failed"
  fi
  echo "$tag"
  exit 0
fi
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=1000:1000 owned/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/workspace
USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["/usr/local/bin/sandbox-agent"]
DOCKERFILE
# Docker's own notices go to a log shown only if the build fails.
if ! docker build -q -t "$tag" \
  --label org.opencontainers.image.title=bridle-sandbox \
  --label bridle.agent.sha256="$(sha256sum "$root/usr/local/bin/sandbox-agent" | cut -d' ' -f1)" \
  ${labels[@]+"${labels[@]}"} \
  "$ctx" >"$ctx/build.log" 2>&1; then
  cat "$ctx/build.log" >&2
  die "docker build failed"
fi
echo "$tag"
