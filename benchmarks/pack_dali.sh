#!/usr/bin/env bash
# Pack NVIDIA DALI 2.4.0 for the offline GPU host (CPython 3.12, x86-64, NVIDIA driver, torch preinstalled,
# no DALI, no network), one upload folder per part: OUTDIR/NN/dali.tar.xz.part-NN + OUTDIR/NN/SHA256SUMS.
# benchmarks/unpack_dali.py puts the parts back together there; benchmarks/run_gpu.sh's header gives the
# device calls that carry them.
#
#   bash benchmarks/pack_dali.sh .dali          # from the repo's root; .dali/ is git-ignored; CUDA=13 for 3 parts
#
# Parts: as few as the upload limit allows - each part, its SHA256SUMS and the repo's own files (what git
# would send: tracked and untracked, not ignored; measured here at pack time) within 64 MiB.
#
# Env: CUDA=12         DALI's CUDA 12 build (the one measured on the GPU host, benchmarks/RESULTS.md), or 13:
#                      the CUDA 13 build, half the size (the host's torch is cu130, its driver 580 runs CUDA
#                      13), not yet run on the host
#      PART_MB=N       parts of at most N MiB even where the limit allows more
#      WHEELS=DIR      keep the downloaded wheels there and reuse them (default: a temporary folder)
#      KEEP_PY="311"   also keep the extension modules for these CPython versions (tests on this machine)
#      XZ_OPTS="..."   compression options (default: -T0 --x86 --lzma2=preset=9)
#
# What travels: nvidia-dali-cuda120 2.4.0, nvidia-nvimgcodec-cu12 0.9.0.20, nvidia-nvjpeg-cu12 12.4.0.76 (CUDA=13:
# nvidia-dali-cuda130, nvidia-nvimgcodec-cu13, nvidia-nvjpeg 13.0), astunparse, gast, makefun and the cp312 wheel
# of optree. The host image has numpy, six, packaging, pyyaml, typing-extensions. What is left out, and why it
# is safe for this project (JPEGs through fn.readers.file or fn.readers.webdataset, fn.decoders.image /
# image_random_crop on 'cpu' or 'mixed'):
# * the TIFF and JPEG 2000 codecs: nvImageCodec's nvjpeg2k, nvtiff and libtiff extensions with the libraries
#   they dlopen (nvjpeg2k, nvtiff, and libnvcomp, which only libnvtiff loads). nvImageCodec registers the
#   extensions it finds in its extensions folder; JPEG goes to libnvjpeg_ext (GPU) and libjpeg_turbo_ext
#   (CPU), PNG and the other formats to libopencv_ext, all kept. No DALI library lists them as needed
#   (readelf -d); only these extensions name them.
# * libcst and nvtx: imported only by DALI's experimental dynamic mode (nvidia.dali.experimental.dynamic)
#   and the experimental torch proxy, neither of which the project imports.
# * nvImageCodec's own Python binding (nvimgcodec_impl): DALI loads the C library libnvimgcodec.so.0 (its
#   RUNPATH) and never imports nvidia.nvimgcodec.
# * symbol tables (.symtab/.strtab) of the shared libraries (strip --strip-unneeded): the dynamic linker and
#   the CUDA runtime use .dynsym and the allocated sections (the fatbins among them), which stay.
# * extension modules for other Pythons, C headers, cmake files, the wheels' scripts (as the device kit did).
# The four-part kit (all codecs, no stripping) unpacks with the same unpack_dali.py: a different part count
# only changes how many upload calls there are.
set -euo pipefail
out=${1:?usage: pack_dali.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pys="312 ${KEEP_PY:-}"
start=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/dali-pack.XXXXXX")
trap 'rm -rf "$work"' EXIT
wheels=${WHEELS:-$work/wheels}
mkdir -p "$wheels"
stage=$work/stage

# the bytes of the repo that travel with every upload: what git would list (tracked + untracked, not ignored)
tree_bytes=$(cd "$repo" && git ls-files -co --exclude-standard -z 2>/dev/null | du -cb --files0-from=- | tail -1 |
             cut -f1 || echo 0)
max=$(( 64 * 1048576 - tree_bytes - 65536 ))   # 64 KiB: SHA256SUMS and the upload's own bookkeeping
if [[ -n ${PART_MB:-} ]] && (( PART_MB * 1048576 < max )); then max=$(( PART_MB * 1048576 )); fi

# Pinned, from DALI's METADATA (nvjpeg for CUDA 13: the newest 13.0 release, the host's CUDA 13.0).
case ${CUDA:-12} in
  12) any=(nvidia-dali-cuda120==2.4.0 nvidia-nvimgcodec-cu12==0.9.0.20 nvidia-nvjpeg-cu12==12.4.0.76) ;;
  13) any=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.0.4.44) ;;
  *) echo "pack_dali.sh: CUDA=12 or CUDA=13, not '$CUDA'" >&2; exit 2 ;;
esac
any+=(astunparse==1.6.3 gast==0.7.0 makefun==1.16.0)
per_py=(optree==0.20.0)   # CPython-specific wheels

dl() {  # dl PYVER PKG...   (PYVER like 312)
  local v=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" \
    --python-version "${v:0:1}.${v:1}" --implementation cp --abi "cp$v" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@" 2>&1 \
    | { grep -v 'is ignored: it is neither' || true; }   # noise from a local pip config
}
echo "== download (into $wheels)"
dl 312 "${any[@]}" "${per_py[@]}"
for v in ${KEEP_PY:-}; do dl "$v" "${per_py[@]}"; done

echo "== unzip"   # wheels are zips; keep the executable bits
wanted=()
for spec in "${any[@]}" "${per_py[@]}"; do
  name=${spec%%==*}; version=${spec#*==}
  for whl in "$wheels/${name//-/_}-$version-"*.whl; do
    [[ -f $whl ]] && wanted+=("$whl")
  done
done
python3 - "$stage" "${wanted[@]}" <<'EOF'
import os, sys, zipfile
for whl in sys.argv[2:]:
    print(f"  {os.path.getsize(whl):>11,} {os.path.basename(whl)}")
    with zipfile.ZipFile(whl) as z:
        for i in z.infolist():
            path = z.extract(i, sys.argv[1])
            if i.external_attr >> 16 and not i.is_dir():
                os.chmod(path, (i.external_attr >> 16) & 0o755)
EOF

echo "== prune"
cd "$stage"
keep="cpython-($(echo $pys | tr ' ' '|'))-"
other=$(find . -name '*.cpython-*.so' | grep -Ev "$keep" || true)
echo "  $(echo "$other" | grep -c . || true) extension modules for other Pythons"
echo "$other" | xargs -r rm -f
rm -rf ./*.data nvidia/*/include rec2idx.py wds2idx.py
rm -f nvidia/nvimgcodec/extensions/lib{nvjpeg2k,nvtiff,tiff}_ext.so* nvidia/nvimgcodec/nvimgcodec_impl.*.so
# nvimgcodec's wheel ships an empty nvidia/__init__.py that would hide the host's other nvidia/* packages
# (torch's CUDA wheels): pkgutil.extend_path merges this tree's nvidia/ with site-packages' nvidia/.
echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" > nvidia/__init__.py
before=$(du -sb . | cut -f1)
find . -name '*.so*' -type f -print0 | while IFS= read -r -d '' lib; do
  if file "$lib" | grep -q 'not stripped'; then strip --strip-unneeded "$lib"; fi
done
echo "  stripped symbol tables: $(( (before - $(du -sb . | cut -f1)) / 1048576 )) MiB;" \
     "staged: $(du -sh . | cut -f1), $(find . -type f | wc -l) files"

echo "== tar | xz (a few minutes)"
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner -cf - . \
  | xz ${XZ_OPTS:--T0 --x86 --lzma2=preset=9} > "$work/dali.tar.xz"
# as few parts as fit, of even size; each in its own upload folder with the checksums
total=$(stat -c %s "$work/dali.tar.xz")
n=$(( (total + max - 1) / max ))
rm -rf "$out"/[0-9][0-9]
split -b $(( (total + n - 1) / n )) -d -a 2 "$work/dali.tar.xz" "$work/dali.tar.xz.part-"
(cd "$work" && sha256sum dali.tar.xz.part-*) > "$work/SHA256SUMS"
for part in "$work"/dali.tar.xz.part-*; do
  k=${part##*-}
  mkdir -p "$out/$k" && mv "$part" "$out/$k/" && cp "$work/SHA256SUMS" "$out/$k/"
done
cd "$out"
ls -l [0-9][0-9]/dali.tar.xz.part-* | awk '{n++; s+=$5; printf "  %s %10d (%.1f MiB)\n", $9, $5, $5/1048576}
  END {printf "%d parts, %.1f MiB in all\n", n, s/1048576}'
echo "repo files that travel with each upload: $((tree_bytes / 1024)) KiB; largest part allowed:" \
     "$(( max / 1024 )) KiB"
echo "done in $((SECONDS - start)) s -> $out (one device call per folder $out/NN, in order)"
