#!/bin/bash
# Builds image-build/out/appliance.img: a raw GPT disk that boots the appliance (UEFI).
#
#   1 ESP         64 MiB  FAT32: the standalone GRUB (EFI/BOOT/BOOTX64.EFI, config embedded)
#   2 root A    1536 MiB  ext4 (sized to its content, ~1 GiB), read-only at run time: Debian 12 + /opt/appliance/venv
#   3 root B    1536 MiB  empty (not formatted): the slot an update (RAUC, later) writes
#   4 APPLCONFIG  16 MiB  FAT: where a technician puts appliance.toml (imported at boot)
#   5 data       512 MiB  ext4, /data: spool, queue, keys, journal (grown to the disk at the first boot)
#
# No loop mounts: each file system is made in a file (mkfs.ext4 -d from a directory,
# mkfs.vfat + mtools) and written into the disk at its partition's offset; sfdisk
# writes the GPT. The Debian base (base.sh) is cached in .cache/image/; the rest is
# redone each build from a copy of it. Also writes out/appliance.sbom.json (sbom.py).
#
# usage: build.sh PYTHON   (as root; PYTHON: the venv whose installed versions are pinned)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "build.sh needs root (mmdebstrap, chroot, file owners)" >&2; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=$1
cache=$repo/.cache/image
out=$here/out
work=$cache/work
start=$(date +%s)

# Fixed identities: GRUB finds the ESP by its FAT volume id and the root slots as
# partitions 2 and 3 of the same disk; the kernel and fstab find partitions by their
# GPT partition UUID.
root_a_fsuuid=7d3a1c2e-5b1f-4f0a-9c61-0b0000000002
data_fsuuid=7d3a1c2e-5b1f-4f0a-9c61-0b0000000005
esp_fsuuid=7D3A-0001  # the FAT volume id: the embedded GRUB config finds the ESP by it
partuuid() { echo "7d3a1c2e-5b1f-4f0a-9c61-0a000000000$1"; }
# name size(MiB) GPT type
parts=(
  "esp 64 C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
  "root-a 1536 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
  "root-b 1536 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
  "APPLCONFIG 16 EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
  "data 512 0FC63DAF-8483-4772-8E79-3D69D8477DE4"
)

source "$here/steps/rauc.sh"
step() { echo "[$(( $(date +%s) - start ))s] $*"; }

# --- the Debian base, cached -------------------------------------------------------
mkdir -p "$cache" "$out"
exec 9> "$cache/.lock"
flock 9  # one build at a time: they share .cache/image/work
key=$(sha256sum "$here/base.sh" | cut -c1-16)
base=$cache/base-$key
if [ ! -d "$base" ]; then
  step "building the Debian base (mmdebstrap, a few minutes)"
  rm -rf "$cache"/.base-partial "$cache"/base-*
  bash "$here/base.sh" "$cache/.base-partial"
  mv "$cache/.base-partial" "$base"
fi

# --- the wheelhouse: the appliance and the versions this checkout's venv runs --------
rm -rf "$work" && mkdir -p "$work"
step "building the wheelhouse"
"$python" -m pip freeze --exclude-editable --disable-pip-version-check > "$work/constraints.txt"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$work/wheelhouse" \
  -c "$work/constraints.txt" "$repo"

# --- root A ----------------------------------------------------------------------------
step "root file system"
root=$work/root
cp -a "$base" "$root"
tar -C "$here/overlay" --owner=0 --group=0 -c . | tar -C "$root" -x
install -m 0644 "$repo/systemd/appliance.service" "$root/usr/lib/systemd/system/"
install -m 0644 "$repo"/systemd/appliance-update-install.{path,service} "$root/usr/lib/systemd/system/"  # remote updates, root side (update/handoff.py)
install -D -m 0644 "$repo/README.md" "$root/opt/appliance/README.md"  # the unit's Documentation=
systemd-sysusers --root="$root"
systemctl --root="$root" enable appliance.service appliance-keys.service appliance-identity.service \
  systemd-networkd.service chrony.service appliance-update-gate.service appliance-machine-id.service
systemctl --root="$root" enable appliance-update-install.path
# Timers that would fetch packages or write to the read-only root.
systemctl --root="$root" mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer
cp -r "$work/wheelhouse" "$root/opt/wheelhouse"
# pip with a clean environment and --no-index: nothing comes from PyPI.
chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin python3 -m venv /opt/appliance/venv
chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin /opt/appliance/venv/bin/pip install --quiet \
  --no-index --no-cache-dir --find-links /opt/wheelhouse appliance
rm -rf "$root/opt/wheelhouse"
# The default config checks clean, as the appliance user, with keys made the way the
# first boot makes them (in a /data/keys thrown away after: each box makes its own).
mkdir -p "$root/data/keys"
chroot "$root" chown appliance:appliance /data/keys
as_appliance() {
  chroot --userspec=appliance:appliance "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/ \
    /opt/appliance/venv/bin/appliance "$@" --config /etc/appliance/appliance.toml
}
if ! { as_appliance keys init && as_appliance config check; } > "$work/config-check.txt" 2>&1; then
  cat "$work/config-check.txt"; echo "the image's default config does not check" >&2; exit 1
fi
rm -rf "$root/data/keys"
# Our units as the image has them (drop-ins included): systemd-analyze verify says
# nothing, and each scores at most 2.0 in the offline security review.
for unit in appliance.service appliance-keys.service appliance-config-import@boot.service \
    appliance-identity.service appliance-machine-id.service; do
  said=$(systemd-analyze verify --root="$root" "$unit" 2>&1)
  [ -z "$said" ] || { echo "$said"; echo "systemd-analyze verify: $unit" >&2; exit 1; }
  systemd-analyze security --offline=yes --root="$root" --threshold=20 "$unit" > "$work/security.txt" ||
    { tail -3 "$work/security.txt"; echo "$unit scores above 2.0 (systemd-analyze security)" >&2; exit 1; }
done
# Root by necessity (mount(8)), so not held to 2.0: verified only.
said=$(systemd-analyze verify --root="$root" appliance-config-media@boot.service 2>&1)
[ -z "$said" ] || { echo "$said"; echo "systemd-analyze verify: appliance-config-media@boot.service" >&2; exit 1; }
said=$(systemd-analyze verify --root="$root" appliance-update-install.path appliance-update-install.service 2>&1); [ -z "$said" ] || { echo "$said"; echo "systemd-analyze verify: appliance-update-install" >&2; exit 1; }  # root by necessity (RAUC, reboot)
bash "$here/steps/vpn.sh" "$root"  # the WireGuard VPN (docs/vpn.md)
# Mount points: the read-only root cannot make them at boot.
mkdir -p "$root/var/lib/appliance"
rauc_root "$root" "$work/data"
# An empty machine-id: PID 1 makes a transient one at the first boot, which
# appliance-machine-id.service keeps on /data for GRUB to pass at the next ones.
: > "$root/etc/machine-id"
# What must not be in the image.
if [ -e "$root/usr/sbin/sshd" ]; then echo "sshd is in the image" >&2; exit 1; fi
if awk -F: '$2 !~ /^[!*]/ {bad=1; print "user " $1 " has a password"} END {exit bad}' \
  "$root/etc/shadow"; then :; else exit 1; fi
mkdir -p "$root/usr/share/appliance"
"$python" "$here/sbom.py" "$root" > "$out/appliance.sbom.json"
install -m 0644 "$out/appliance.sbom.json" "$root/usr/share/appliance/sbom.cdx.json"

# --- /data: the folders the fstab bind mounts need, owned by the image's users ----------
data=$work/data
uid=$(awk -F: '$1 == "appliance" {print $3}' "$root/etc/passwd")
# outbox: the default config's directory destination, which the appliance does not
# create (a missing folder there means an unmounted share).
mkdir -p "$data/appliance/outbox" "$data/keys" "$data/config/remote.d"
chown "$uid:$uid" "$data/appliance" "$data/appliance/outbox" "$data/keys" "$data/config" "$data/config/remote.d"
chmod 0700 "$data/appliance" "$data/appliance/outbox" "$data/keys" "$data/config" "$data/config/remote.d"
cp -a "$root/var/lib/systemd" "$data/systemd"
# chrony's drift file and NTS keys (/var/lib/chrony, a bind mount of /data/chrony).
cp -a "$root/var/lib/chrony" "$data/chrony"
# The persistent journal (/var/log/journal, a bind mount of /data/journal).
mkdir -p "$data/journal"
chown "0:$(awk -F: '$1 == "systemd-journal" {print $3}' "$root/etc/group")" "$data/journal"
chmod 2755 "$data/journal"

# --- file systems, each in a file --------------------------------------------------------
step "file systems"
# size NAME, offset NAME: a partition's size and start in MiB (the first starts at 1 MiB).
size() { local want=$1 p; for p in "${parts[@]}"; do set -- $p; if [ "$1" = "$want" ]; then echo "$2"; fi; done; }
offset() {
  local want=$1 at=1 p
  for p in "${parts[@]}"; do set -- $p; if [ "$1" = "$want" ]; then echo $at; fi; at=$((at + $2)); done
}
# mkfs.ext4 -d copies each file's owner and mode from the directory.
# Root A's file system is only as large as its content (+5 %, +64 MiB for the journal and
# metadata, a quarter more inodes than files), not its 1536 MiB slot: the root is
# read-only, so free space in it is never used, and an update (RAUC writes the whole
# image, out/rootfs.ext4, into the other slot) writes only this much.
root_kb=$(du -s --block-size=1K "$root" | cut -f1)
root_files=$(find "$root" | wc -l)
root_mb=$(( root_kb * 105 / 100 / 1024 + 64 ))
[ "$root_mb" -le "$(size root-a)" ] ||
  { echo "the root file system ($root_mb MiB) does not fit its slot ($(size root-a) MiB)" >&2; exit 1; }
mkfs.ext4 -q -F -L root-a -U "$root_a_fsuuid" -N $(( root_files + root_files / 4 + 1024 )) -d "$root" \
  "$work/root-a.ext4" "${root_mb}M"
mkfs.ext4 -q -F -L data -U "$data_fsuuid" -d "$data" "$work/data.ext4" "$(size data)M"
sed -e "s/@ROOT_A_PARTUUID@/$(partuuid 2)/" -e "s/@ROOT_B_PARTUUID@/$(partuuid 3)/" \
  "$here/grub.cfg" > "$work/grub.cfg"
grub-script-check "$work/grub.cfg"
# (without its comments: GRUB runs an embedded config without normal mode, which knows no "#")
sed -e "s/@ESP_FSUUID@/$esp_fsuuid/" -e "/^#/d" "$here/grub-early.cfg" > "$work/grub-early.cfg"
grub-mkimage --format=x86_64-efi --output="$work/BOOTX64.EFI" --prefix=/EFI/BOOT \
  --config="$work/grub-early.cfg" part_gpt fat ext2 search search_fs_uuid normal linux boot \
  serial terminal echo test efi_gop loadenv regexp
truncate -s "$(size esp)M" "$work/esp.fat"
mkfs.vfat -F 32 -n ESP -i "${esp_fsuuid/-/}" "$work/esp.fat" > /dev/null
mmd -i "$work/esp.fat" ::/EFI ::/EFI/BOOT
mcopy -i "$work/esp.fat" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$work/esp.fat" "$work/grub.cfg" ::/EFI/BOOT/grub.cfg
rauc_esp "$work/esp.fat"
truncate -s "$(size APPLCONFIG)M" "$work/applconfig.fat"
mkfs.vfat -n APPLCONFIG "$work/applconfig.fat" > /dev/null
mcopy -i "$work/applconfig.fat" "$here/APPLCONFIG-README.txt" ::/README.txt

# --- the disk: GPT, then each file system at its offset -------------------------------------
step "disk"
img=$work/appliance.img
total=2  # 1 MiB before the first partition, 1 MiB for the backup GPT
for p in "${parts[@]}"; do set -- $p; total=$((total + $2)); done
truncate -s "${total}M" "$img"
{
  echo "label: gpt"
  echo "label-id: 7D3A1C2E-5B1F-4F0A-9C61-0A0000000000"
  echo "unit: sectors"
  i=1
  for p in "${parts[@]}"; do
    set -- $p
    echo "start=$(($(offset "$1") * 2048)), size=$(($2 * 2048)), type=$3, uuid=$(partuuid $i), name=\"$1\""
    i=$((i + 1))
  done
} | sfdisk --quiet "$img"
put() { dd if="$1" of="$img" bs=1M seek="$2" conv=notrunc,sparse status=none; }
put "$work/esp.fat" "$(offset esp)"
put "$work/root-a.ext4" "$(offset root-a)"
put "$work/applconfig.fat" "$(offset APPLCONFIG)"
put "$work/data.ext4" "$(offset data)"
mv "$img" "$out/appliance.img"
mv "$work/root-a.ext4" "$out/rootfs.ext4"  # what `make update-bundle` puts in a bundle
rm -rf "$work"

step "done: $out/appliance.img"
du -h --apparent-size "$out/appliance.img" | sed 's/^/  raw size /'
du -h "$out/appliance.img" | sed 's/^/  allocated /'
