# Two commands for a new user on Debian 12 (as root, or with sudo for the apt step):
#   make run    install what is needed and run the appliance in the foreground (dev config)
#   make test   install what is needed, including the Debian test peers, and run the suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEV_CONFIG := config/appliance.dev.toml
# Debian packages the tests talk to: the modality (dcmtk), the PACS (orthanc, and its
# DICOMweb plugin orthanc-dicomweb for the dicomweb transport), the SFTP server
# (openssh-server), the WAN tools (iproute2, nftables; wireguard-go and wireguard-tools
# for the VPN path, as this kernel has no WireGuard), and what boots the systemd unit in
# a Debian container (mmdebstrap, systemd-container for systemd-nspawn; util-linux for
# nsenter/unshare), the MQTT broker of the ops link (mosquitto; the tests start their own
# on a loopback port, so the system service the package enables is stopped and disabled),
# and what builds and boots the appliance image (grub-efi-amd64-bin, mtools, dosfstools,
# fdisk for sfdisk; qemu-system-x86 and ovmf; rauc and squashfs-tools for the update
# bundle); prometheus: `promtool check metrics` on
# a scrape of the metrics endpoint, `promtool check/test rules` on config/ops-center/, and a
# real Prometheus in tests/test_alerts_fleet.py (its system service is stopped and disabled too);
# chromium, the headless browser that reads and screenshots the fleet page; and the
# hospital's audit record repository, rsyslog with its TLS driver (rsyslog-gnutls; the
# tests start their own on a loopback port, so the system service is stopped and disabled).
PEERS := dcmtk orthanc orthanc-dicomweb openssh-server iproute2 nftables wireguard-go \
	wireguard-tools mmdebstrap systemd-container util-linux mosquitto grub-efi-amd64-bin \
	mtools dosfstools fdisk qemu-system-x86 ovmf prometheus chromium rauc squashfs-tools \
	rsyslog rsyslog-gnutls
PYTEST_ARGS ?=
# `make test` runs its tests on this many processes (pytest-xdist; 0: in one process).
# Most of its tests wait on peers and daemons, so two share 2 cores well. A test file runs
# whole on one process (--dist loadfile), in its order, with its module fixtures set up
# once, as in one process.
TEST_WORKERS ?= 2

.PHONY: run test test-field test-ops test-rabbitmq peers-rabbitmq test-boot test-wan image image-test \
	update-bundle image-update-test peers venv bench bench-receive bench-pack bench-wan \
	bench-failover lint clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python 3.11 or newer is needed (Debian 12: apt-get install python3 python3-venv)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
	  { echo "cannot create a virtualenv: apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

venv: $(BIN)/.installed

peers:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	dpkg -s orthanc-dicomweb >/dev/null 2>&1 || missing="$$missing orthanc-dicomweb"; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v wireguard-go >/dev/null || missing="$$missing wireguard-go"; \
	command -v wg >/dev/null || missing="$$missing wireguard-tools"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	command -v systemd-nspawn >/dev/null || missing="$$missing systemd-container"; \
	command -v nsenter >/dev/null || missing="$$missing util-linux"; \
	test -x /usr/sbin/mosquitto || missing="$$missing mosquitto"; \
	test -d /usr/lib/grub/x86_64-efi || missing="$$missing grub-efi-amd64-bin"; \
	command -v mcopy >/dev/null || missing="$$missing mtools"; \
	command -v mkfs.vfat >/dev/null || missing="$$missing dosfstools"; \
	command -v sfdisk >/dev/null || missing="$$missing fdisk"; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	test -f /usr/share/OVMF/OVMF_CODE_4M.fd || missing="$$missing ovmf"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v rauc >/dev/null || missing="$$missing rauc"; \
	command -v mksquashfs >/dev/null || missing="$$missing squashfs-tools"; \
	test -x /usr/sbin/rsyslogd || missing="$$missing rsyslog"; \
	dpkg -s rsyslog-gnutls >/dev/null 2>&1 || missing="$$missing rsyslog-gnutls"; \
	if [ -n "$$missing" ]; then \
	  echo "installing test peers:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  case "$$missing" in *mosquitto*) \
	    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
	      $$SUDO systemctl disable --now mosquitto.service >/dev/null 2>&1 || true; \
	    fi;; \
	  esac; \
	  case "$$missing" in *prometheus*) \
	    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
	      $$SUDO systemctl disable --now prometheus.service prometheus-node-exporter.service >/dev/null 2>&1 || true; \
	    fi;; \
	  esac; \
	  case "$$missing" in *"rsyslog "*|*rsyslog) \
	    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
	      $$SUDO systemctl disable --now rsyslog.service >/dev/null 2>&1 || true; \
	    fi;; \
	  esac; \
	fi

run: venv
	@mkdir -p var/outbox
	$(BIN)/appliance keys init --config $(DEV_CONFIG)
	$(BIN)/appliance config check --config $(DEV_CONFIG) >/dev/null
	@echo "appliance: listening on 127.0.0.1:11112 (AE title EDGE); bundles go to var/outbox/"
	@echo "  try: storescu -aec EDGE 127.0.0.1 11112 FILE.dcm"
	exec $(BIN)/appliance run --config $(DEV_CONFIG)

# The whole suite but its slow tiers, each its own target that CI (.ci/run) runs after it:
# `make test-field`, `make test-ops`, `make test-boot`, `make image-test`,
# `make image-update-test`, `make test-wan` and `make test-rabbitmq`.
# The slowest tests are listed at the end, so that a test that grows is seen before
# `make test` outgrows its ~20 minutes.
test: venv peers
	$(BIN)/python -m pytest -m "not wan and not systemd_boot and not image and not field and not ops and not rabbitmq" \
	  -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

# The field tier (marker field): the real daemon and real peers killed (kill -9, SIGTERM),
# cut and restarted for minutes: tests/test_end_to_end.py, test_durability.py,
# test_failover_peers.py, test_pack_isolation.py, test_forward_isolation.py,
# test_routing_peers.py (41 tests, 8.5 minutes from a clean clone on 2026-12-07).
test-field: venv peers
	$(BIN)/python -m pytest -m field --durations=10 $(PYTEST_ARGS)

# The operations-center tier (marker ops): the ops link, signed commands, desired config,
# the fleet view and the alert rules with a real Mosquitto, Prometheus and headless
# Chromium (tests/test_ops_link.py, test_ops_commands.py, test_ops_desired_live.py,
# test_fleet_peers.py, test_alerts_fleet.py, test_update_handoff_ops.py,
# test_ops_diagnostics_sftp.py; 93 tests, 7.5 minutes from a clean clone on 2026-12-07).
test-ops: venv peers
	$(BIN)/python -m pytest -m ops --durations=10 $(PYTEST_ARGS)

# Only the WAN tier (marker wan, root): the emulated WAN of tests/wan.py and the appliance
# over it (tests/test_wan_bed.py ~15 s, tests/test_wan_scenarios.py ~3.5 min,
# tests/test_wan_failover.py ~50 s, tests/test_wan_refused.py ~45 s,
# tests/test_wan_bench_smoke.py ~30 s; docs/wan.md).
test-wan: venv peers
	$(BIN)/python -m pytest -m wan $(PYTEST_ARGS)

# RabbitMQ's MQTT plugin for the ops link, for this target only (not in PEERS: `make test`
# does not need it). The tests start a node of their own; the system service the package
# enables is stopped and disabled, and so is the epmd it starts.
peers-rabbitmq:
	@if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then \
	  echo "installing test peers: rabbitmq-server"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null; \
	  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
	    $$SUDO systemctl disable --now rabbitmq-server.service epmd.socket epmd.service >/dev/null 2>&1 || true; \
	  fi; \
	fi

# The telemetry tests of the ops link against RabbitMQ (marker rabbitmq;
# tests/test_ops_link_rabbitmq.py, docs/operations.md "A clustered broker") and the fleet
# view's (tests/test_fleet_rabbitmq.py): 25 tests, 4 minutes in CI on 2026-12-07.
test-rabbitmq: venv peers peers-rabbitmq
	$(BIN)/python -m pytest -m rabbitmq $(PYTEST_ARGS)

# The boot tier (tests/test_systemd_boot.py, marker systemd_boot; ~2.5 minutes, plus ~40-60 s
# the first time to build the container's root file system, cached in .cache/nspawn/;
# docs/systemd.md): the unit booted under systemd in a Debian 12 container.
test-boot: venv peers
	$(BIN)/python -m pytest -m systemd_boot $(PYTEST_ARGS)

# The appliance image: image-build/out/appliance.img, a raw GPT disk, and its SBOM
# (root; image-build/README.md; ~1 min, plus ~2 min the first time for the Debian base,
# cached in .cache/image/).
image: venv peers
	image-build/build.sh $(BIN)/python

# A signed RAUC update bundle (verity) of the root file system `make image` built:
# image-build/out/update.raucb (docs/updates.md). VERSION names it (default: the
# appliance's version and the build's UTC time); RAUC_KEY, RAUC_CERT, RAUC_KEYRING name
# release signing files (default: development ones, made in .cache/rauc-keys/).
update-bundle: image
	image-build/update-bundle.sh image-build/out/rootfs.ext4 image-build/out/update.raucb \
	  "$${VERSION:-$$($(BIN)/python -c 'import appliance; print(appliance.__version__)')-$$(date -u +%Y%m%d%H%M%S)}"

# The image tier (marker image; .ci/run runs it), after a build of the image: the image
# booted in QEMU (TCG, OVMF), a C-ECHO and C-STORE from the host answered and /data grown
# to a bigger disk (tests/test_image.py, one boot), a site config imported from a USB stick,
# the watchdog's reset, the machine id and journal kept across it
# (tests/test_image_config.py, one boot), and the WireGuard tunnel (tests/test_image_vpn.py,
# one boot): 25 tests, 7 minutes with the build on 2026-12-07. Measured times:
# docs/benchmarks.md.
image-test: image
	$(BIN)/python -m pytest -m "image and not image_update" --durations=10 $(PYTEST_ARGS)

# The RAUC update scenarios (tests/test_image_update.py, marker image_update: one update
# installed and kept, a broken one falling back by itself after a power cut in its trial
# boot; two installs, five boots): 6.5 minutes on an idle machine (2026-12-07 evening),
# ~11-14.5 on a loaded one. The reboot after the gate's rejection is a power-on again, not
# QEMU's warm reset, which crawled for 7.5 to more than 15 minutes in the firmware under
# load (docs/benchmarks.md, "The stall after the rejection"). .ci/run runs it after
# image-test.
image-update-test: update-bundle
	$(BIN)/python -m pytest -m image_update $(PYTEST_ARGS)

bench: bench-receive bench-pack

bench-receive: venv peers
	$(BIN)/python bench/receive_bench.py

bench-pack: venv peers
	$(BIN)/python bench/pack_bench.py

# Time to center over the emulated WAN at 5, 20 and 100 Mbit/s (root; ~12 min).
bench-wan: venv peers
	$(BIN)/python bench/wan_bench.py

# Failover over the emulated WAN: cut -> first instance at center B, 5 runs (root; ~7 min).
bench-failover: venv peers
	$(BIN)/python bench/failover_bench.py

lint: venv
	$(BIN)/pip install --quiet ruff mypy
	$(BIN)/ruff check appliance tests bench docs
	$(BIN)/mypy
	$(BIN)/mypy --strict docs/gen_conformance.py

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .cache
