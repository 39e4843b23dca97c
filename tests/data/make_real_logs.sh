#!/bin/bash
# Regenerate the real firmware logs of tests/data/ (see README.md here).
#
# usage: tests/data/make_real_logs.sh FV_DIR EBSPROBE_EFI
#   FV_DIR        a DEBUG GCC5 build of the patched OvmfPkgX64 (OVMF_CODE.fd,
#                 OVMF_VARS.fd), e.g. Build/OvmfX64/DEBUG_GCC5/FV
#   EBSPROBE_EFI  EbsProbe.efi from the same build (Build/.../X64/EbsProbe.efi)
# Needs qemu-system-x86_64 and mtools. Each boot runs under TCG until the
# probe prints "EBST probe-parked", then QEMU is killed.
set -euo pipefail
FV=$1
PROBE=$2
OUT=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

run() { # NAME CFG-TEXT [QEMU ARGS...]
  local name=$1 cfg=$2
  shift 2
  local img=$WORK/$name.img log=$WORK/$name.log
  printf '%b' "$cfg" > "$WORK/ebs-probe.cfg"
  head -c 3000 /dev/urandom | base64 -w0 | sed 's/^/CANARY-/' > "$WORK/canary.bin"
  truncate -s 16M "$img"
  mformat -i "$img" ::
  mmd -i "$img" ::/EFI ::/EFI/BOOT
  mcopy -i "$img" "$PROBE" ::/EFI/BOOT/BOOTX64.EFI
  mcopy -i "$img" "$WORK/ebs-probe.cfg" ::/ebs-probe.cfg
  mcopy -i "$img" "$WORK/canary.bin" ::/canary.bin
  cp "$FV/OVMF_VARS.fd" "$WORK/vars.fd"
  qemu-system-x86_64 -machine q35,accel=tcg -m 512 -nographic -no-reboot \
    -display none -monitor none -serial none \
    -drive if=pflash,format=raw,unit=0,readonly=on,file="$FV/OVMF_CODE.fd" \
    -drive if=pflash,format=raw,unit=1,file="$WORK/vars.fd" \
    -debugcon file:"$log" -global isa-debugcon.iobase=0x402 \
    -drive if=none,id=d0,format=raw,file="$img" \
    -device virtio-blk-pci,drive=d0,bootindex=0,disable-legacy=on,iommu_platform=on \
    "$@" &
  local qemu=$! waited=0
  until grep -q "EBST probe-parked" "$log" 2>/dev/null; do
    sleep 0.2
    waited=$((waited + 1))
    if [ $waited -gt 300 ]; then echo "$name: timeout" >&2; break; fi
  done
  kill $qemu; wait $qemu 2>/dev/null || true
  # Trim the noisiest DEBUG families; every EBST and "Loading driver" line stays.
  grep -av -e '^InstallProtocolInterface' -e '^ProtectUefiImageCommon' \
    -e '^  - 0x' -e '^PixelBlueGreenRedReserved' -e '^Select Item' \
    -e '^SetUefiImageMemoryAttributes' "$log" > "$OUT/$name.log"
  echo "$name: $(wc -l < "$OUT/$name.log") lines"
}

EMU="-fw_cfg name=opt/org.ebs-harness/emulation,string=1"
MODE="name=opt/org.ebs-harness/ebs-mode,string"
DEPTH="name=opt/org.ebs-harness/requeue-depth,string"
run callback-depth2 'canary=canary.bin\n' $EMU -fw_cfg $MODE=callback -fw_cfg $DEPTH=2
run legacy-depth2 'canary=canary.bin\n' $EMU -fw_cfg $MODE=legacy -fw_cfg $DEPTH=2
run legacy-depth1 'canary=canary.bin\n' $EMU -fw_cfg $MODE=legacy -fw_cfg $DEPTH=1
run none-leak 'canary=canary.bin\nleak-mapping=1\n' $EMU -fw_cfg $MODE=none
run callback-stale 'canary=canary.bin\nleak-mapping=1\nstale-mapkey=1\n' $EMU
run stock-noknobs 'canary=canary.bin\n'
