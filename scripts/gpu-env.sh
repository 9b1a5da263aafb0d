# Sourced by the GPU scripts (gpu-check.sh, gpu-tune.sh) from the repository root with ROOT set: on a machine
# without package access or ../shared, uses what scripts/gpu-pack.sh put in .gpu (the Debian packages unpacked
# into .gpu/root, llama-27m and the data slices). Sets SHARED to the folder of models and data. ROOT defaults to the
# current folder (unset, SHARED pointed at /.gpu/shared and the model tests found no models).
ROOT="${ROOT:-$(pwd)}"
SHARED="$ROOT/../shared"
if [ -d .gpu/debs ]; then
  mkdir -p .gpu/root
  for f in .gpu/debs/*.deb; do dpkg-deb -x "$f" .gpu/root; done
  export CMAKE_PREFIX_PATH="$ROOT/.gpu/root/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export LD_LIBRARY_PATH="$ROOT/.gpu/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ ! -d "$SHARED/models" ] && [ -d .gpu/shared ]; then
  SHARED="$ROOT/.gpu/shared"
  [ -d "$SHARED/models/llama-27m" ] || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    "$SHARED/models/llama-27m.tar.xz" "$SHARED/models"
fi
