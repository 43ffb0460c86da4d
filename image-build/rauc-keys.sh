#!/bin/bash
# Makes the development signing material for update bundles, once, in a folder that git
# ignores (.cache/rauc-keys/ by default): never commit a private key.
#
#   ca-1.pem, ca-1.key      the development trust anchor (100 years)
#   ca-2.pem, ca-2.key      a second anchor, so the keyring always holds two (rollover:
#                           a new anchor ships in the keyring one release before it signs)
#   signing.pem, .key       the signing certificate, issued by ca-1: 30 years (beyond the
#                           box's service life), extendedKeyUsage codeSigning (RAUC's
#                           check-purpose=codesign)
#   keyring.pem             ca-1.pem + ca-2.pem: what the image trusts
#
# A release build names its own files instead (RAUC_KEY, RAUC_CERT, RAUC_KEYRING: see
# image-build/steps/rauc.sh); the release key never lives in a checkout.
#
# usage: rauc-keys.sh DIR
set -euo pipefail
dir=$1
[ -f "$dir/keyring.pem" ] && exit 0
mkdir -p "$dir" && chmod 0700 "$dir"
tmp=$(mktemp -d "$dir/.partial.XXXXXX")
anchor() {  # anchor N
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 36500 \
    -subj "/O=Teleradiology edge appliance (development)/CN=update anchor $1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$tmp/ca-$1.key" -out "$tmp/ca-$1.pem" 2>/dev/null
}
anchor 1
anchor 2
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/O=Teleradiology edge appliance (development)/CN=update signing" \
  -keyout "$tmp/signing.key" -out "$tmp/signing.csr" 2>/dev/null
printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
  'extendedKeyUsage=critical,codeSigning' 'subjectKeyIdentifier=hash' \
  'authorityKeyIdentifier=keyid' > "$tmp/signing.ext"
openssl x509 -req -in "$tmp/signing.csr" -CA "$tmp/ca-1.pem" -CAkey "$tmp/ca-1.key" \
  -CAcreateserial -days 10950 -extfile "$tmp/signing.ext" -out "$tmp/signing.pem" 2>/dev/null
cat "$tmp/ca-1.pem" "$tmp/ca-2.pem" > "$tmp/keyring.pem"
rm -f "$tmp/signing.csr" "$tmp/signing.ext" "$tmp"/*.srl
mv "$tmp"/* "$dir/" && rmdir "$tmp"
