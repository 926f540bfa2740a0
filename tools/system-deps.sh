#!/usr/bin/env bash
# System libraries the tests use: Mesa EGL (MuJoCo's headless rendering), PortAudio (sounddevice, for
# real microphones/speakers), Chromium (the browser tests), HAProxy (the load balancer in front of `serve`
# replicas: tests/test_haproxy.py, benchmarks/scale.py). As root with apt they are
# installed; otherwise one line says what is missing, and the tests that need it skip with a reason.
set -uo pipefail
missing=()
ldconfig -p 2>/dev/null | grep -q libEGL_mesa || missing+=(libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libglx-mesa0 libopengl0)
ldconfig -p 2>/dev/null | grep -q libportaudio || missing+=(libportaudio2)
command -v chromium >/dev/null || missing+=(chromium)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null && exit 0
  echo "system-deps: apt-get could not install: ${missing[*]} (the tests that need them will skip)" >&2
else
  echo "system-deps: not installed: ${missing[*]} (install them with apt as root; the tests that need them skip)" >&2
fi
exit 0
