#!/usr/bin/env bash
# Provision `hosting` (abc.test): nsmail from the synced checkout as a systemd service (as
# README.md "Running it as a service" says) with three tenants, one IPv6 only.
. /nsmail/vagrant/lib.sh
common_setup hosting
ensure_packages nftables  # nft: the supervisor's firewall table

# As scripts/bootstrap: the host's own worker runs as nsmail, the DNS relay as nsmail-dns.
for user in nsmail nsmail-dns; do
  id -u "$user" >/dev/null 2>&1 ||
    useradd --system --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "$user"
done

install -d -m 755 /etc/nsmail
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
/opt/nsmail/venv/bin/nsmail check || fail "nsmail check rejected $config"

install -m 644 /nsmail/README.md /opt/nsmail/README.md
install -m 644 /nsmail/systemd/nsmail.service /etc/systemd/system/nsmail.service
systemctl daemon-reload
systemctl enable nsmail.service >/dev/null 2>&1
# Restart, not start: a second provisioning run brings a changed checkout or config.
systemctl restart nsmail.service ||
  { journalctl -u nsmail --no-pager -n 40 >&2; fail "nsmail.service did not start"; }
nsmail status
