# RAUC in the image (sourced by build.sh): the keyring, the mount point of the ESP, and
# the first grubenv (root A good, root B empty). The slot layout is in
# overlay/etc/rauc/system.conf, the boot selection in grub.cfg.
#
# The signing material: RAUC_KEYRING (the trust anchors the image holds), RAUC_KEY and
# RAUC_CERT (what `make update-bundle` signs with). By default the development ones that
# rauc-keys.sh makes in .cache/rauc-keys/ (git ignores it); a release build sets the
# three to the release files.
rauc_keys=$repo/.cache/rauc-keys
[ -n "${RAUC_KEYRING:-}" ] || bash "$here/rauc-keys.sh" "$rauc_keys"
RAUC_KEYRING=${RAUC_KEYRING:-$rauc_keys/keyring.pem}
RAUC_KEY=${RAUC_KEY:-$rauc_keys/signing.key}
RAUC_CERT=${RAUC_CERT:-$rauc_keys/signing.pem}

# rauc_root ROOT DATA: the keyring and mount points in the root, RAUC's folder on /data.
rauc_root() {
  [ "$(grep -c 'BEGIN CERTIFICATE' "$RAUC_KEYRING")" -ge 2 ] ||
    { echo "$RAUC_KEYRING: the keyring needs two trust anchors (rollover)" >&2; return 1; }
  install -D -m 0644 "$RAUC_KEYRING" "$1/etc/rauc/keyring.pem"
  mkdir -p "$1/boot/efi"
  mkdir -p "$2/rauc" && chmod 0700 "$2/rauc"
}

# rauc_esp ESP_FAT: the grubenv GRUB and RAUC share (1024 bytes, written in place).
rauc_esp() {
  local env=$work/grubenv
  grub-editenv "$env" create
  grub-editenv "$env" set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0
  mcopy -i "$1" "$env" ::/EFI/BOOT/grubenv
}
