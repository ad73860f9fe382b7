#!/usr/bin/env bash
# On hosting, as root, after check-mx.py saw the mail arrive: the delivery history as each
# tenant's user sees it (its own attempts only, another tenant's refused with 77), as root
# sees it (every tenant's, JSON), and the tenants' namespaces as an operator reaches them
# while the hardened nsmail.service runs.
set -euo pipefail
. /etc/default/nsmail-rig
fail() { echo "check-hosting: $*" >&2; exit 1; }
domains=()
for tenant in $RIG_TENANTS; do domains+=("${tenant%%,*}"); done
for domain in "${domains[@]}"; do
  user=${domain%%.*}
  seen=$(runuser -u "$user" -- nsmail log --to "check@$RIG_RCPT_DOMAIN" --since 1h)
  grep -q "tenant=$domain .*status=sent" <<<"$seen" || fail "$user: no sent attempt in its log"
  ! grep -v "tenant=$domain " <<<"$seen" | grep -q . || fail "$user sees other tenants' mail"
  other=${domains[0]}; [ "$other" != "$domain" ] || other=${domains[1]}
  code=0; runuser -u "$user" -- nsmail log "$other" >/dev/null 2>&1 || code=$?
  [ "$code" = 77 ] || fail "$user reading $other's log: exit $code, not 77"
  ip netns exec "nsm-$domain" ip -brief address show dev eth0 >/dev/null ||
    fail "the namespace of $domain is not reachable from the host"
done
sent=$(nsmail log --json | grep -c '"status":"sent"')
[ "$sent" -ge $((${#domains[@]} + 1)) ] || fail "root's nsmail log --json: $sent sent, too few"
echo "check-hosting: each tenant's history is its own; namespaces reachable" >&2
