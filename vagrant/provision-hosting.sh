#!/usr/bin/env bash
# Provision `hosting` (abc.test): nsmail from its Debian package (scripts/build-deb on the
# host), its hardened nsmail.service started once a configuration names three tenants, one
# IPv6 only.
. /nsmail/vagrant/lib.sh
common_setup hosting
install_nsmail_package
# The package starts nothing without a configuration, and makes the system users.
! systemctl is-active --quiet nsmail.service || [ -f /etc/nsmail/nsmail.toml ] ||
  fail "nsmail.service runs without a configuration"
for user in nsmail-dns nsmail-submit; do
  id -u "$user" >/dev/null || fail "the package made no $user user"
done

config=/etc/nsmail/nsmail.toml
cat >"$config.new" <<TOML
[host]
name = "$RIG_HOST_NAME"
resolvers = ["$RIG_MX_V4"]

[network]
mode = "bridge"
bridge = "nsbr0"
gateway4 = "$RIG_BRIDGE_V4"
gateway6 = "$RIG_BRIDGE_V6"
subnet4 = "$RIG_TENANT_NET4"
subnet6 = "$RIG_TENANT_NET6"

[delivery]
scan_interval = 5
timeout = 10
TOML
for tenant in $RIG_TENANTS; do
  IFS=, read -r domain ipv4 ipv6 <<<"$tenant"
  user=${domain%%.*}
  home=/srv/tenants/$domain
  id -u "$user" >/dev/null 2>&1 ||
    useradd --home-dir "$home" --no-create-home --shell /usr/sbin/nologin "$user"
  install -d -m 700 -o "$user" -g "$user" "$home"
  {
    printf '\n[[tenant]]\ndomain = "%s"\n' "$domain"
    [ -z "$ipv4" ] || printf 'ipv4 = "%s"\n' "$ipv4"
    [ -z "$ipv6" ] || printf 'ipv6 = "%s"\n' "$ipv6"
    printf 'user = "%s"\nhome = "%s"\nusers = ["alice"]\n' "$user" "$home"
  } >>"$config.new"
done
# World-readable: nsmail-sendmail reads it as the submitting user.
chmod 644 "$config.new"
mv "$config.new" "$config"
# As an admin would: the global option after the verb, no sudo (root's shell).
nsmail check --config "$config" || fail "nsmail check rejected $config"

# Restart, not start: a second provisioning run brings a changed package or config.
systemctl restart nsmail.service ||
  { journalctl -u nsmail --no-pager -n 40 >&2; fail "nsmail.service did not start"; }
nsmail status
# The hardened unit, as systemd rates it (README: 4.9).
systemd-analyze security nsmail.service --no-pager | tail -n 1
