# Shared by the provisioning scripts (sourced, in the guest, from the synced checkout).
set -euo pipefail
rig=/nsmail/vagrant
venv=/opt/nsmail/venv

fail() { echo "provision: $*" >&2; exit 1; }

# The rig's names and addresses (from rig.rb via the Vagrantfile) for later runs, the network
# unit and the checks; the mail network's addresses and routes, now and at every boot; nsmail
# in a venv (the mx runs its lab DNS server).
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
  ensure_packages postfix python3-venv
  install_nsmail
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

install_nsmail() {
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if compgen -G "/wheels/nsmail-*.whl" >/dev/null; then
    # Offline: the guests have no route out.
    "$venv/bin/pip" install -q --no-index --find-links /wheels --force-reinstall --no-deps \
      /wheels/nsmail-*.whl
    "$venv/bin/pip" install -q --no-index --find-links /wheels /wheels/nsmail-*.whl
  else
    "$venv/bin/pip" install -q /nsmail
  fi
  "$venv/bin/python" -m nsmail.submit.launcher "$venv/bin/nsmail-sendmail"
  ln -sf "$venv/bin/nsmail" "$venv/bin/nsmail-sendmail" /usr/local/bin/
}
