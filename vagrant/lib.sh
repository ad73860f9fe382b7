# Shared by the provisioning scripts (sourced, in the guest, from the synced checkout).
set -euo pipefail
rig=/nsmail/vagrant
venv=/opt/nsmail/venv

fail() { echo "provision: $*" >&2; exit 1; }

# The rig's names and addresses (from rig.rb via the Vagrantfile) for later runs, the network
# unit and the checks; the mail network's addresses and routes, now and at every boot. Each
# role then installs nsmail its own way: hosting the Debian package, mx a venv (for its lab
# DNS server, beside Postfix, which the package would replace).
common_setup() {
  local role=$1
  local v
  for v in ${!RIG_@}; do printf '%s="%s"\n' "$v" "${!v}"; done >/etc/default/nsmail-rig
  install -m 755 "$rig/rig-net" /usr/local/sbin/nsmail-rig-net
  cat >/etc/systemd/system/nsmail-rig-net.service <<UNIT
[Unit]
Description=nsmail rig: mail network addresses and routes ($role)
After=network-online.target
Wants=network-online.target
Before=nsmail.service nsmail-rig-dns.service postfix.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/nsmail-rig-net $role

[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable nsmail-rig-net.service >/dev/null 2>&1
  systemctl restart nsmail-rig-net.service || fail "the $role network setup failed"
  # The management network's DHCP must not replace the resolver the rig sets.
  printf 'make_resolv_conf() { :; }\n' >/etc/dhcp/dhclient-enter-hooks.d/nsmail-rig
}

# The offline box has them; a stock box needs a route out (NSMAIL_VAGRANT_MGMT=nat).
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null ||
    fail "cannot install ${missing[*]}: the box lacks them and the guest has no route out"
}

# The package from the host's scripts/build-deb (in /wheels), as an admin would install it;
# its dependencies are in the offline box (vagrant/build-box), or come by NAT.
install_nsmail_package() {
  local deb
  deb=$(ls /wheels/nsmail_*_all.deb 2>/dev/null | head -n1)
  [ -n "$deb" ] || fail "no nsmail package in /wheels (scripts/build-deb makes it)"
  if [ -n "$(ls /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null)" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$deb" \
    >/dev/null || fail "cannot install $deb"
}

install_nsmail_venv() {
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if compgen -G "/wheels/nsmail-*.whl" >/dev/null; then
    # Offline: the guests have no route out.
    "$venv/bin/pip" install -q --no-index --find-links /wheels --force-reinstall --no-deps \
      /wheels/nsmail-*.whl
    "$venv/bin/pip" install -q --no-index --find-links /wheels /wheels/nsmail-*.whl
  else
    "$venv/bin/pip" install -q /nsmail
  fi
}
