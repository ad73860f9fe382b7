#!/usr/bin/env bash
# On hosting, as root: one message from every tenant (submitted as the tenant's user) and
# one from the hosting machine itself (as the vagrant user, who belongs to no tenant).
set -euo pipefail
. /etc/default/nsmail-rig
run=${1:?usage: send-all.sh RUN-ID}
send() { # USER SENDER
  printf 'From: %s\nTo: check@%s\nSubject: rig %s %s\n\nsent through nsmail\n' \
    "$2" "$RIG_RCPT_DOMAIN" "$run" "${2#*@}" |
    runuser -u "$1" -- env NSMAIL_CONFIG=/etc/nsmail/nsmail.toml \
      nsmail-sendmail -i -f "$2" "check@$RIG_RCPT_DOMAIN"
}
for tenant in $RIG_TENANTS; do
  domain=${tenant%%,*}
  send "${domain%%.*}" "alice@$domain"
done
send vagrant "vagrant@$RIG_HOST_NAME"
