#!/usr/bin/env bash
# Install the Debian packages sub8 needs, if missing: the synthetic corpus's TTS engines and their English voices, and
# a C compiler with the Python headers for the package's one compiled module (lib/sub8/quant/_kernels.c).
# Usage: install_system_packages.sh [PYTHON] (the interpreter the venv is made from; its headers are checked).
# Runs apt-get as root (or through passwordless sudo); otherwise says exactly what to install and fails.
set -euo pipefail

python=${1:-python3}
packages=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts gcc libc6-dev)
if ! "$python" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  packages+=(python3-dev)  # Debian's own Python: its headers come separately
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "sub8: installing Debian packages for the speech corpus: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  apt=(apt-get)
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  apt=(sudo apt-get)
else
  echo "sub8: these Debian packages are missing and this user cannot install them: ${missing[*]}" >&2
  echo "      run as root:  apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" update -qq
"${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}"
