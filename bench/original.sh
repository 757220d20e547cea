#!/usr/bin/env bash
# Build the original C++ migfra daemon for bench/speed.py's "original" row (issue 20) and print
# the path of the binary on stdout (everything else goes to stderr). Never part of the tests.
#
#   bench/original.sh            # clone (or reuse) the sources, build once, print the path
#   MIGFRA_ORIGINAL=$(bench/original.sh) python -m bench.speed --only original
#
# Sources (a URL or a local git directory each; the default is GitHub over https):
#   MIGFRA_GIT    RWTH-OS/migration-framework   pinned at HEAD cd13007 (2020-01-16)
#   FASTLIB_GIT   fast-project/fast-lib         pinned at HEAD 0b78c8e (2020-01-16)
#   LIBPONCI_GIT  lrr-tum/libponci              pinned at HEAD 4349499 (2018-09-17)
# Cache: $ASYNCMIGFRA_BENCH_CACHE/original (default ~/.cache/asyncmigfra-bench/original).
#
# Why not migfra's own CMakeLists: it downloads Boost 1.58, libssh 0.7.5, libponci and fast-lib at
# configure time, and it pins fast-lib v0.4.8, with which migfra HEAD does not compile (HEAD uses
# Start::pci_addrs, added in fast-lib's next commit). So: fast-lib HEAD and libponci with their
# own CMake (fast-lib builds its vendored mosquitto 1.4.12 and yaml-cpp), then migfra's sources
# compiled and linked here against the system's Boost, libssh and libvirt. Everything is built
# optimised (CMAKE_BUILD_TYPE=Release, -O2); as shipped, the vendored libraries and migfra itself
# get no optimisation flags at all. The logging stays compiled in, as shipped (spdlog at trace
# level to stdout; the daemon has no option to lower it).
#
# Debian packages it needs: git cmake g++ libvirt-dev libssh-dev libboost-dev
# libboost-program-options-dev libboost-regex-dev.
set -euo pipefail

MIGFRA_GIT=${MIGFRA_GIT:-https://github.com/RWTH-OS/migration-framework.git}
FASTLIB_GIT=${FASTLIB_GIT:-https://github.com/fast-project/fast-lib.git}
LIBPONCI_GIT=${LIBPONCI_GIT:-https://github.com/lrr-tum/libponci.git}
MIGFRA_REV=cd13007ffdac4e100510db6577d0983c9d66000b
FASTLIB_REV=0b78c8e1c7a992df055f7f2a1ea5666e82b5742d
LIBPONCI_REV=434949968110561bc638270bcda7800916785172

cache_root=${ASYNCMIGFRA_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/asyncmigfra-bench}
cache=$cache_root/original
binary=$cache/bin/migfra
stamp="$MIGFRA_REV $FASTLIB_REV $LIBPONCI_REV"

say() { echo "original.sh: $*" >&2; }

if [[ -x $binary && -f $cache/bin/stamp && $(cat "$cache/bin/stamp") == "$stamp" ]]; then
    echo "$binary"
    exit 0
fi

missing=()
for tool in git cmake g++ make; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
for header in libvirt/libvirt.h libssh/libssh.h boost/program_options.hpp boost/regex.hpp \
    boost/property_tree/ptree.hpp; do
    [[ -f /usr/include/$header ]] || missing+=("/usr/include/$header")
done
if ((${#missing[@]})); then
    say "missing: ${missing[*]}"
    say "on Debian: apt-get install git cmake g++ libvirt-dev libssh-dev libboost-dev" \
        "libboost-program-options-dev libboost-regex-dev"
    exit 1
fi

# A checkout of $2 at $3 in $cache/src/$1 (cloned once, from a URL or a local git directory).
checkout() {
    local name=$1 url=$2 rev=$3 dir=$cache/src/$1
    if [[ ! -d $dir/.git ]]; then
        say "cloning $name from $url"
        rm -rf "$dir"
        if ! git clone -q "$url" "$dir" >&2; then
            say "cannot clone $url; set ${4}=<a local clone or mirror of it>"
            exit 1
        fi
    fi
    if ! git -C "$dir" cat-file -e "$rev^{commit}" 2>/dev/null; then
        git -C "$dir" fetch -q "$url" >&2 || true
    fi
    if ! git -C "$dir" -c advice.detachedHead=false checkout -q "$rev" >&2; then
        say "$name has no commit $rev (fetched from $url)"
        exit 1
    fi
}

mkdir -p "$cache/src" "$cache/build" "$cache/bin"
checkout migfra "$MIGFRA_GIT" "$MIGFRA_REV" MIGFRA_GIT
checkout fast-lib "$FASTLIB_GIT" "$FASTLIB_REV" FASTLIB_GIT
checkout libponci "$LIBPONCI_GIT" "$LIBPONCI_REV" LIBPONCI_GIT

prefix=$cache/prefix
rm -rf "$prefix" "$cache/build"
mkdir -p "$cache/build"
jobs=$(nproc)
# CMAKE_BUILD_TYPE in the environment (CMake >= 3.22) also reaches fast-lib's ExternalProjects.
export CMAKE_BUILD_TYPE=Release

cmake_build() {
    local name=$1
    shift
    say "building $name (log: $cache/build/$name.log)"
    if ! {
        cmake -S "$cache/src/$name" -B "$cache/build/$name" -DCMAKE_INSTALL_PREFIX="$prefix" "$@" &&
            cmake --build "$cache/build/$name" -j "$jobs" &&
            cmake --install "$cache/build/$name"
    } >"$cache/build/$name.log" 2>&1; then
        tail -20 "$cache/build/$name.log" >&2
        say "building $name failed"
        exit 1
    fi
}

cmake_build fast-lib -DBUILD_TESTS=OFF -DCMAKE_CXX_FLAGS=-fpic
cmake_build libponci

say "building migfra (log: $cache/build/migfra.log)"
sources=()
for f in "$cache/src/migfra/src/"*.cpp; do
    [[ $(basename "$f") == benchmark_main.cpp ]] || sources+=("$f")
done
if ! g++ -std=c++11 -O2 -pthread -DFASTLIB_ENABLE_LOGGING \
    -I"$prefix/include" -isystem "$prefix/include/fast-lib/external" \
    "${sources[@]}" -o "$binary.tmp" \
    "$prefix/lib/libfastlib.a" "$prefix/lib/libponcri.a" \
    -lssh -lvirt -lboost_program_options -lboost_regex -lrt >"$cache/build/migfra.log" 2>&1; then
    tail -20 "$cache/build/migfra.log" >&2
    say "building migfra failed"
    exit 1
fi
mv "$binary.tmp" "$binary"
echo "$stamp" >"$cache/bin/stamp"
echo "$binary"
