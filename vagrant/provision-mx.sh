#!/usr/bin/env bash
# Provision `mx` (mx.test): the lab DNS server (nsmail.lab.dnsserver) with A/AAAA/MX/PTR for
# every name, and Postfix accepting mail for the recipient domain only from clients whose
# name is forward-confirmed, with a HELO that resolves and equals that name (the policy of
# tests/support/lab/helo_policy.py), the way tests/support/lab/postfix.py configures the
# namespace lab's.
. /nsmail/vagrant/lib.sh
common_setup mx
ensure_packages postfix python3-venv
install_nsmail_venv

install -d -m 755 /etc/nsmail-rig
/opt/nsmail/venv/bin/python /nsmail/vagrant/records.py >/etc/nsmail-rig/records.json
cat >/etc/systemd/system/nsmail-rig-dns.service <<UNIT
[Unit]
Description=nsmail rig: the lab DNS server for every name of the rig
After=nsmail-rig-net.service
Requires=nsmail-rig-net.service

[Service]
ExecStart=/opt/nsmail/venv/bin/python -m nsmail.lab.dnsserver \
  --records /etc/nsmail-rig/records.json --listen $RIG_MX_V4:53 --listen [$RIG_MX_V6]:53
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable nsmail-rig-dns.service >/dev/null 2>&1
systemctl restart nsmail-rig-dns.service
echo "nameserver $RIG_MX_V4" >/etc/resolv.conf

install -m 644 /nsmail/tests/support/lab/helo_policy.py /etc/postfix/helo_policy.py
install -d -m 755 -o nobody -g nogroup /var/mail/rig
policy="check_policy_service unix:private/helo-policy"
policy_argv="argv=/usr/bin/python3 -I /etc/postfix/helo_policy.py"
postconf -e \
  "myhostname = $RIG_MX_NAME" \
  "mydomain = ${RIG_MX_NAME#*.}" \
  'myorigin = $myhostname' \
  'mydestination =' \
  'mynetworks = 127.0.0.0/8 [::1]/128' \
  'inet_interfaces = all' \
  'inet_protocols = all' \
  'alias_maps =' \
  'alias_database =' \
  'relayhost =' \
  "virtual_mailbox_domains = $RIG_RCPT_DOMAIN" \
  'virtual_mailbox_base = /var/mail/rig' \
  'virtual_mailbox_maps = static:Maildir/' \
  "virtual_uid_maps = static:$(id -u nobody)" \
  "virtual_gid_maps = static:$(getent group nogroup | cut -d: -f3)" \
  'smtpd_helo_required = yes' \
  'smtpd_client_restrictions = reject_unknown_client_hostname' \
  "smtpd_helo_restrictions = reject_unknown_helo_hostname, $policy" \
  'smtpd_relay_restrictions = reject_unauth_destination' \
  'smtpd_recipient_restrictions =' \
  'unknown_client_reject_code = 550' \
  'unknown_hostname_reject_code = 550'
# No chroot: smtpd must read the rig's resolv.conf, not a copy in the spool.
postconf -F '*/*/chroot = n'
postconf -M "helo-policy/unix=helo-policy unix - n n - 0 spawn user=nobody $policy_argv"
postfix check || fail "postfix check failed"
systemctl enable postfix.service >/dev/null 2>&1
systemctl restart postfix.service || fail "postfix did not start"
